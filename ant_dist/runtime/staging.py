"""Transactional output folders: build beside the folder, swap in only when complete.

A stage that writes a whole folder (pack, the exports, the report) must never leave a mix of
old and new files behind: a typo in an input, a crash or a SIGKILL halfway would otherwise
destroy a good earlier output. So the stage writes into a hidden sibling,
`<parent>/.<name>.staging`, and only when every file is in place is the sibling exchanged with
the folder in one atomic rename (Linux `renameat2(RENAME_EXCHANGE)`); the old content, now
under the sibling's name, is then deleted. Until that rename the folder is byte-identical to
what it was; after it, it is the complete new output.

The single-writer lock (`<folder>/.lock`, locking.py) must survive the swap: the staging folder
gets a hard link to the same lock file, so whoever opens `<folder>/.lock` after the swap meets
the very inode the writer still holds, and is refused until it releases.

Where the atomic exchange is missing (not Linux, an old kernel, a filesystem without it) the
swap is two renames through `<parent>/.<name>.old`; a crash between them leaves the old content
there, and the next `begin` on the folder puts it back.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import sys
from pathlib import Path

from ant_dist.runtime.locking import LOCK_NAME

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2  # from <linux/fs.h>


def staging_path(final: str | os.PathLike) -> Path:
    final = Path(final)
    return final.parent / f".{final.name}.staging"


def _old_path(final: Path) -> Path:
    return final.parent / f".{final.name}.old"


def begin(final: str | os.PathLike) -> Path:
    """An empty staging folder for `final` (a killed run's leftovers are removed first).

    Call it while holding `final`'s lock: the staging folder's name is fixed, so two writers
    of one folder would share it."""
    final = Path(final)
    old = _old_path(final)
    if old.exists():
        if _is_empty_or_lock_only(final):
            # a crash between the two fallback renames: the old content goes back first (not
            # its lock file: the caller holds the one in `final`)
            final.mkdir(parents=True, exist_ok=True)
            for entry in old.iterdir():
                if entry.name != LOCK_NAME:
                    os.rename(entry, final / entry.name)
        shutil.rmtree(old, ignore_errors=True)
    staging = staging_path(final)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    lock = final / LOCK_NAME
    if lock.exists():
        try:
            os.link(lock, staging / LOCK_NAME)
        except OSError:
            pass  # no hard links here: the lock then covers the old folder only (see the docstring)
    return staging


def commit(final: str | os.PathLike, staging: str | os.PathLike) -> None:
    """Swap the finished `staging` in as `final` and delete the old content."""
    final, staging = Path(final), Path(staging)
    _fsync_tree(staging)
    if not final.exists():
        os.rename(staging, final)
    elif not _exchange(staging, final):
        _swap_by_renames(staging, final)
        staging = _old_path(final)
    _fsync_dir(final.parent)
    shutil.rmtree(staging, ignore_errors=True)


def abort(staging: str | os.PathLike) -> None:
    """Throw an unfinished staging folder away (the output folder was never touched)."""
    shutil.rmtree(staging, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    renameat2.restype = ctypes.c_int
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    return False  # EINVAL/ENOSYS: no exchange here; any real problem shows in the fallback's renames


def _swap_by_renames(new: Path, final: Path) -> None:
    old = _old_path(final)
    shutil.rmtree(old, ignore_errors=True)
    os.rename(final, old)
    os.rename(new, final)


def _is_empty_or_lock_only(folder: Path) -> bool:
    return not folder.exists() or {p.name for p in folder.iterdir()} <= {LOCK_NAME}


def _fsync_tree(folder: Path) -> None:
    """Flush the files before the rename that publishes them (a power cut must not publish holes)."""
    for root, _dirs, files in os.walk(folder):
        for name in files:
            if name == LOCK_NAME:
                continue
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(root))


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
