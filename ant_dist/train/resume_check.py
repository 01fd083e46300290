"""Reading a run's files safely: one clear TrainError per damaged or mismatched file.

A truncated safetensors file, a JSON file cut short or a checkpoint of another architecture are
what a killed job, a full disk or a changed command leave behind; each becomes one line naming
the file, the problem and the fix (exit 2), never a traceback.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from . import TrainError

STATE = "state.json"
# What a resumed run must share with the checkpoint: the data plan and the model's shapes. Other
# options (lr, steps, logging) may change on resume.
RESUME_KEYS = ("seed", "batch_size", "loss", "hidden", "n_layers", "n_heads", "max_len", "n_experts",
               "mode", "item_repr", "ablate")


def read_json(path: Path, what: str, fix: str) -> dict:
    """A JSON object from `path`, or a TrainError naming the file, the problem and the fix."""
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise TrainError(f"{path}: unreadable {what} ({exc}); {fix}") from None
    if not isinstance(obj, dict):
        raise TrainError(f"{path}: not a {what} (not a JSON object); {fix}")
    return obj


def read_weights(path: Path, fix: str) -> dict[str, torch.Tensor]:
    """A safetensors file (no code runs on load); a truncated or damaged one is a TrainError."""
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise TrainError(f"{path}: unreadable weights ({exc}); {fix}") from None


def torch_load(path: Path, fix: str):
    """An optimizer or scheduler state: weights_only (tensors and plain containers, never pickle)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError) as exc:
        problem = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TrainError(f"{path}: unreadable ({problem}); {fix}") from None


def bad_checkpoint_fix(ckpt: Path) -> str:
    return (f"delete {ckpt} to resume from the checkpoint before it, or start another run "
            f"(another run_name, or resume=never)")


def model_fix(d: Path) -> str:
    return f"export it again (pre-training or re-learning writes {d.name}/ at its end), or point at another model"


def check_resume(ckpt: Path, cfg) -> None:
    """Refuse, before anything is loaded, a resume whose data plan or model shapes differ from the
    checkpoint's, naming every differing option (a shape mismatch would otherwise surface as a
    state-dict size error deep in the load)."""
    saved = read_json(Path(ckpt) / STATE, "checkpoint state", bad_checkpoint_fix(Path(ckpt))).get("config") or {}
    diffs = [f"{k}={saved[k]!r} (this run: {getattr(cfg, k)!r})" for k in RESUME_KEYS
             if k in saved and hasattr(cfg, k) and saved[k] != getattr(cfg, k)]
    if diffs:
        raise TrainError(f"{ckpt}: was trained with {', '.join(diffs)}; resume with the same values or use "
                         f"another run_name")


def check_safetensors(path: Path, fix: str) -> None:
    """A safetensors file whose header reads and whose size is what the header says (truncation
    shows), without reading the tensors."""
    import struct

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
        raise TrainError(f"{path}: unreadable weights ({exc}); {fix}") from None
    if 8 + n + end != size:
        raise TrainError(f"{path}: truncated or padded ({size} bytes, its header describes {8 + n + end}); {fix}")
