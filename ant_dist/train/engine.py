"""What runs the training step: the Accelerator (DDP or DeepSpeed), its precision, torch.compile.

bf16 means the same under both engines: fp32 weights, bf16 autocast in the forward.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ant_dist.config import PretrainConfig
from ant_dist.train.checkpoint import deepspeed_resized
from ant_dist.train.tracking import accelerate_log_with


def use_bf16(cfg: PretrainConfig) -> bool:
    return cfg.precision == "bf16" or (cfg.precision == "auto" and torch.cuda.is_available())


def deepspeed_precision(ds: dict, bf16: bool) -> None:
    """bf16 under DeepSpeed the way DDP has it: fp32 weights, bf16 autocast in the forward.
    DeepSpeed's own `bf16.enabled` would cast the whole model to bf16 (the item model keeps its
    inputs in fp32); a JSON that sets `torch_autocast` or enables bf16/fp16 itself is left alone."""
    explicit = [k for k in ("bf16", "fp16") if str(ds.get(k, {}).get("enabled", "false")).lower() == "true"]
    if bf16 and "torch_autocast" not in ds and not explicit:
        ds["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}


def make_accelerator(cfg: PretrainConfig, run_dir: Path):
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

    handlers = [DistributedDataParallelKwargs(find_unused_parameters=not cfg.gate_noise)]
    if not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        handlers.append(InitProcessGroupKwargs(backend="gloo"))  # DeepSpeed on CPU needs it said
    kwargs = {}
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true":  # DeepSpeed: deepspeed_precision
        kwargs["mixed_precision"] = "bf16" if use_bf16(cfg) else "no"
    return Accelerator(log_with=accelerate_log_with(cfg.tracker), project_dir=str(run_dir),
                       kwargs_handlers=handlers, **kwargs)


def uses_deepspeed(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.DEEPSPEED


def configure_deepspeed(accelerator, cfg: PretrainConfig, ckpt: Path | None) -> None:
    """The run's config decides batch size, clipping and precision, whatever the DeepSpeed JSON says;
    it must be written into the plugin's config before `accelerator.prepare` builds the engine."""
    world = accelerator.num_processes
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    if deepspeed_resized(ckpt, world):  # ZeRO shards of another process count: re-cut on load
        ds["checkpoint"] = {**ds.get("checkpoint", {}), "load_universal": True}
    ds["train_micro_batch_size_per_gpu"] = max(1, cfg.batch_size // world)
    ds["train_batch_size"] = ds["train_micro_batch_size_per_gpu"] * world
    ds["gradient_accumulation_steps"] = 1
    ds["gradient_clipping"] = cfg.grad_clip
    deepspeed_precision(ds, use_bf16(cfg))


def compile_in_place(model) -> None:
    """In place, so parameter names, and so checkpoints, stay those of the plain model."""
    # Dynamo's DDP graph splitting fails on the item model's float arguments (torch 2.13);
    # the compiled parts are small, so one graph each with DDP's own bucketing loses nothing
    torch._dynamo.config.optimize_ddp = False
    for part in (model.irl, model.sasrec):
        if part is not None:
            part.compile(dynamic=True)
