"""Reading a run's files safely: one clear TrainError per damaged or mismatched file.

A truncated safetensors file, a JSON file cut short or a checkpoint of another architecture are
what a killed job, a full disk or a changed command leave behind; each becomes one line naming
the file, the problem and the fix (exit 2), never a traceback.
"""

from __future__ import annotations

from pathlib import Path

from ant_dist.runtime.safe_read import read_json
from ant_dist.train import TrainError

STATE = "state.json"
# What a resumed run must share with the checkpoint: the data plan and the model's shapes. Other
# options (lr, steps, logging) may change on resume.
RESUME_KEYS = ("seed", "batch_size", "loss", "hidden", "n_layers", "n_heads", "max_len", "ffn_mult", "n_experts",
               "mode", "item_repr", "ablate")


def bad_checkpoint_fix(ckpt: Path) -> str:
    return (f"delete {ckpt} to resume from the checkpoint before it, or start another run "
            f"(another run_name, or resume=never)")


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

