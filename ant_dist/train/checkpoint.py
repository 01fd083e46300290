"""Checkpoints (atomic, newest K kept) and resume (the exported model/ folder: model/io.py).

Layout of a run folder:
    checkpoints/step-00000500/   model.safetensors, optimizer.pt, scheduler.pt, state.json
                                 (DeepSpeed: its own files from accelerator.save_state instead of
                                 the first three; state.json as well)
    model/                       model.safetensors + model_config.json (the exported model)

A checkpoint is written to `checkpoints/.tmp-step-N/` and renamed when every file is in place;
`state.json` is written last, so a folder named `step-N` is always complete, and a killed
save leaves only a `.tmp-` folder that the next save removes. DDP checkpoints hold the full
model and optimizer state once (every process has the same copy), so they resume on any
number of processes; loading uses `weights_only=True` and safetensors, never arbitrary pickle.
DeepSpeed checkpoints are ZeRO shards; on another process count they are re-cut through
DeepSpeed's universal checkpoint (`_load_deepspeed_resized`).

What is NOT saved: random generator states. Every draw is a function of (seed, step, rank)
(`data.step_seed`), so a resumed run replays the uninterrupted run's draws by construction.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import save_file

from ant_dist.model.io import state_dict_on_cpu
from ant_dist.runtime.safe_read import read_json, read_weights, torch_load
from ant_dist.train import TrainError
from ant_dist.train.resume_check import STATE, bad_checkpoint_fix

PREFIX = "step-"


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def complete_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.name.startswith(PREFIX) and (p / STATE).is_file())


def read_state(ckpt: str | Path) -> dict:
    return read_json(Path(ckpt) / STATE, "checkpoint state", bad_checkpoint_fix(Path(ckpt)))


def save_checkpoint(accelerator, objective, optimizer, scheduler, state: dict, run_dir: str | Path,
                    keep: int, deepspeed: bool) -> Path:
    """Collective: every process calls it. Returns the checkpoint folder."""
    root = checkpoint_root(run_dir)
    name = f"{PREFIX}{state['step']:08d}"
    tmp, final = root / f".tmp-{name}", root / name
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    if deepspeed:
        accelerator.save_state(str(tmp))  # ZeRO shards: every process writes its part
    if accelerator.is_main_process:
        if not deepspeed:
            save_file(state_dict_on_cpu(accelerator.unwrap_model(objective).model), str(tmp / "model.safetensors"))
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / STATE).write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")
        if final.exists():  # the same step saved again (e.g. a signal right after a periodic save)
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in complete_checkpoints(run_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def find_resume_checkpoint(run_dir: str | Path, resume: str) -> Optional[Path]:
    found = complete_checkpoints(run_dir)
    if resume == "auto":
        return found[-1] if found else None
    if resume == "never":
        if found:
            raise TrainError(f"{run_dir} already holds checkpoints ({found[-1].name}); use resume=auto to continue "
                             f"it or another run_name to start a new run")
        return None
    path = Path(resume)
    if not (path / STATE).is_file():
        raise TrainError(f"resume={resume}: not a complete checkpoint (no {STATE})")
    return path


def load_checkpoint(accelerator, objective, optimizer, scheduler, ckpt: Path, deepspeed: bool) -> dict:
    state = read_state(ckpt)
    if state.get("engine") != ("deepspeed" if deepspeed else "ddp"):
        raise TrainError(f"{ckpt} was written by the {state.get('engine')} engine; resume it with the same engine")
    if deepspeed:
        if state["world_size"] == accelerator.num_processes:
            accelerator.load_state(str(ckpt))
        else:
            _load_deepspeed_resized(accelerator, objective, ckpt)
    else:
        fix = bad_checkpoint_fix(ckpt)
        weights = read_weights(ckpt / "model.safetensors", fix)
        try:
            accelerator.unwrap_model(objective).model.load_state_dict(weights)
        except RuntimeError as exc:
            raise TrainError(f"{ckpt / 'model.safetensors'}: does not fit this model "
                             f"({str(exc).strip().splitlines()[0]}); {fix}") from None
        optimizer.load_state_dict(torch_load(ckpt / "optimizer.pt", fix))
    scheduler.load_state_dict(torch_load(ckpt / "scheduler.pt", bad_checkpoint_fix(ckpt)))
    return state


def deepspeed_resized(ckpt: Optional[Path], world: int) -> bool:
    """Whether resuming `ckpt` means loading DeepSpeed ZeRO shards written by another process count
    (the engine must then be built with DeepSpeed's `checkpoint.load_universal`)."""
    if ckpt is None:
        return False
    state = read_state(ckpt)
    return state.get("engine") == "deepspeed" and state.get("world_size") != world


def _load_deepspeed_resized(accelerator, engine, ckpt: Path) -> None:
    """ZeRO-1/2 shards of another process count. DeepSpeed's universal checkpoint re-cuts them:
    the main process converts the checkpoint into one file per parameter (fp32 weights, Adam
    moments, step), every process loads its new partition from those, and the conversion is
    removed. The engine was built with `checkpoint.load_universal` (engine.py: configure_deepspeed)."""
    from accelerate.utils import broadcast_object_list
    from deepspeed.checkpoint import ds_to_universal

    tag = (ckpt / "latest").read_text().strip() if (ckpt / "latest").is_file() else "pytorch_model"
    out = ckpt.parent / f".universal-{ckpt.name}"
    failure = [None]
    if accelerator.is_main_process:
        shutil.rmtree(out, ignore_errors=True)
        try:  # one worker: serial, no child processes; older checkpoints lack the version record
            ds_to_universal.main(argparse.Namespace(
                input_folder=str(ckpt / tag), output_folder=str(out / tag), num_extract_workers=1,
                num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True))
            (out / "latest_universal").write_text(tag)
        except Exception as exc:  # every process must hear of it, or the others wait forever
            shutil.rmtree(out, ignore_errors=True)
            failure = [f"{ckpt}: re-cutting its DeepSpeed shards for {accelerator.num_processes} process(es) "
                       f"failed ({type(exc).__name__}: {exc}); resume it on {read_state(ckpt)['world_size']}"]
    if accelerator.num_processes > 1:
        broadcast_object_list(failure)
    if failure[0]:
        raise TrainError(failure[0])
    engine.load_checkpoint(str(out), tag=tag, load_lr_scheduler_states=False)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(out, ignore_errors=True)
