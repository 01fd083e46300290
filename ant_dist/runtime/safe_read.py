"""Reading the files a run depends on, safely: nothing that executes code on load (JSON,
safetensors, `torch.load(weights_only=True)`), and one clear error per damaged file that names
the file, the problem and the fix the caller knows."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ant_dist.runtime.exit_codes import BadInput


class UnreadableFile(BadInput):
    """A file is missing, damaged or not what it should be; the message names it and the fix."""


def read_json(path: Path, what: str, fix: str) -> dict:
    """A JSON object from `path`, or an UnreadableFile naming the file, the problem and the fix."""
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UnreadableFile(f"{path}: unreadable {what} ({exc}); {fix}") from None
    if not isinstance(obj, dict):
        raise UnreadableFile(f"{path}: not a {what} (not a JSON object); {fix}")
    return obj


def read_weights(path: Path, fix: str) -> dict[str, torch.Tensor]:
    """A safetensors file (no code runs on load); a truncated or damaged one is an UnreadableFile."""
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise UnreadableFile(f"{path}: unreadable weights ({exc}); {fix}") from None


def torch_load(path: Path, fix: str):
    """An optimizer or scheduler state: weights_only (tensors and plain containers, never pickle)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError) as exc:
        problem = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UnreadableFile(f"{path}: unreadable ({problem}); {fix}") from None


def check_safetensors(path: Path, fix: str) -> None:
    """A safetensors file whose header reads and whose size is what the header says (truncation
    shows), without reading the tensors."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            if n > size - 8:
                raise ValueError(f"header of {n} bytes in a file of {size}")
            header = json.loads(fh.read(n))
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    except (OSError, ValueError, struct.error, KeyError, TypeError, IndexError) as exc:
        raise UnreadableFile(f"{path}: unreadable weights ({exc}); {fix}") from None
    if 8 + n + end != size:
        raise UnreadableFile(f"{path}: truncated or padded ({size} bytes, its header describes {8 + n + end}); {fix}")
