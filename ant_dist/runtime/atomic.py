"""Atomic file writes: a reader sees the old file or the complete new one, never a half.

The content goes to `<name>.tmp` beside the file and is renamed over it (rename is atomic on
POSIX within a filesystem). A crash leaves at most a stray `.tmp`; a failed write removes it.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


@contextmanager
def atomic_path(path: str | os.PathLike, fsync: bool = False) -> Iterator[Path]:
    """Yields the temporary path to write; on success it replaces `path` (after an fsync of its
    bytes when asked: a file another program reads after a power cut), on error it is removed."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | os.PathLike, text: str, fsync: bool = False) -> None:
    with atomic_path(path, fsync) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | os.PathLike, obj: Any, indent: int = 2, sort_keys: bool = True) -> None:
    """JSON with a final newline (the reports, manifests and results of every stage)."""
    write_text_atomic(path, json.dumps(obj, indent=indent, sort_keys=sort_keys) + "\n")
