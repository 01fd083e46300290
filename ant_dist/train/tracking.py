"""Monitoring: W&B or TensorBoard through Accelerate's trackers, and metrics.jsonl (always).

W&B without network: with no API key configured (no WANDB_API_KEY, no `wandb login` entry in
~/.netrc) and no WANDB_MODE, wandb would stop at once asking for a login; we choose offline
mode instead, which writes `<run>/wandb/offline-run-*` for a later `wandb sync`. The run id is
derived from the run folder, so a resumed or requeued run continues the same W&B run.
"""

from __future__ import annotations

import hashlib
import json
import netrc
import os
import time
from pathlib import Path
from typing import Optional

import torch

from ant_dist.config import TRACKERS
from ant_dist.train import TrainError


def wandb_key_configured() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def choose_wandb_mode() -> str:
    """Set WANDB_MODE=offline unless the user chose a mode or configured a key; returns the mode."""
    if not os.environ.get("WANDB_MODE") and not wandb_key_configured():
        os.environ["WANDB_MODE"] = "offline"
    os.environ.setdefault("WANDB_SILENT", "true")
    return os.environ.get("WANDB_MODE", "online")


def wandb_run_id(run_dir: str | Path) -> str:
    return hashlib.sha1(str(Path(run_dir).resolve()).encode()).hexdigest()[:16]


def accelerate_log_with(tracker: str) -> Optional[str]:
    if tracker not in TRACKERS:
        raise TrainError(f"tracker must be one of {TRACKERS}, got {tracker!r}")
    if tracker == "tensorboard":
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            try:
                import tensorboardX  # noqa: F401
            except ImportError:
                raise TrainError("tracker=tensorboard needs the tensorboard package: pip install tensorboard") from None
    if tracker == "wandb":
        choose_wandb_mode()
    return None if tracker == "none" else tracker


def start_trackers(accelerator, tracker: str, project: str, run_dir: Path, run_name: str, config: dict) -> None:
    if tracker == "none":
        return
    kwargs = {}
    if tracker == "wandb":
        kwargs = {"wandb": {"dir": str(run_dir), "id": wandb_run_id(run_dir), "resume": "allow", "name": run_name}}
    accelerator.init_trackers(project, config=config, init_kwargs=kwargs)
    if tracker == "wandb" and os.environ.get("WANDB_MODE") == "offline" and accelerator.is_main_process:
        # offline is our choice when no key is configured: say where the run went and how to upload it
        run = accelerator.get_tracker("wandb", unwrap=True)
        where = Path(run.dir).parent if getattr(run, "dir", None) else run_dir / "wandb"
        print(f"W&B: offline (no API key configured); the run is in {where}; upload it with: wandb sync {where}",
              flush=True)


def validation_line(stage: str, step: int, epoch: int, flat: dict) -> str:
    """One console line per validation: each domain's main figures (the log has them all)."""
    shown = [f"{key.split('/')[1]} NDCG@10 {value:.4f}" for key, value in flat.items()
             if key.startswith("val/") and key.endswith("/ndcg@10")]
    best = [f"best {key.split('/best_')[1]} {value:.4f}" for key, value in flat.items() if "/best_" in key]
    return f"{stage}: validation at step {step} (epoch {epoch}): {', '.join(shown + best)}"


class MetricsLog:
    """Appends one JSON object per line to <run>/metrics.jsonl (main process only)."""

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = path, enabled

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"time": round(time.time(), 3), **record}, sort_keys=True) + "\n")


def memory_figures() -> dict:
    """Host memory of this process (anonymous RSS excludes memory-mapped feature pages) and GPU peak."""
    out = {}
    try:
        with open("/proc/self/status") as f:  # anonymous memory: memory-mapped feature pages excluded
            for line in f:
                if line.startswith(("RssAnon:", "VmHWM:")):
                    key = "rss_anon_mib" if line.startswith("RssAnon") else "peak_rss_mib"
                    out[key] = round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    if torch.cuda.is_available():
        out["cuda_max_allocated_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def param_digest(model: torch.nn.Module) -> str:
    """A short hash of every parameter and buffer: equal digests on all processes show they agree."""
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def memory_record(world: int, gather) -> dict:
    """Collective: this process's memory figures as `mem/<name>` (the main process's are the ones
    logged) and the largest over all processes as `mem/max_over_ranks/<name>`: ranks differ
    (loader workers, the main process's logging and exports)."""
    own = memory_figures()
    every = gather([own]) if world > 1 else [own]
    record = {f"mem/{k}": v for k, v in own.items()}
    for k in own:
        record[f"mem/max_over_ranks/{k}"] = max(m.get(k, 0.0) for m in every)
    return record
