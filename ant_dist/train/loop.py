"""The training loop, shared by pre-training and re-learning. Read it top to bottom.

One optimizer step = one global batch of `batch_size` sequences, split over the processes.
Around it: per-step seeding (so resume replays every random draw), a guard against non-finite
losses and gradients, logging, validation, checkpoints, and a clean stop on SIGTERM/SIGUSR1.

Exit codes (documented in docs/training.md): 0 done, 2 bad input or configuration,
3 non-finite loss or gradient (the last good checkpoint is kept), 75 stopped by a signal after
writing a checkpoint (resume with resume=auto).
"""

from __future__ import annotations

import json
import math
import os
import time
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path

import torch

from ..config import PretrainConfig, RelearnConfig, save_config
from ..locking import LockedError, exclusive_dir_lock, loader_worker_init
from ..losses import NegativeSampler
from ..model.ant import ANT, ANTConfig
from ..model.irl import IRLConfig
from ..model.sasrec import SASRecConfig
from ..signals import flag_stop_signals
from . import TrainError
from .checkpoint import (
    deepspeed_resized,
    export_model,
    find_resume_checkpoint,
    load_checkpoint,
    load_model_weights,
    save_checkpoint,
)
from .data import Corpus, EpochBatches, epoch_batches, epoch_order, read_domain, step_seed, validation_users
from .evaluate import evaluate
from .features import load_catalog_features
from .objective import TrainObjective
from .resume_check import check_resume
from .selection import Selection, check_metric
from .tracking import (MetricsLog, accelerate_log_with, memory_record, param_digest, start_trackers,
                       validation_line)

EXIT_OK, EXIT_BAD_INPUT, EXIT_NONFINITE, EXIT_PREEMPTED = 0, 2, 3, 75


class NonFiniteError(TrainError):
    """A loss term or the gradient norm became NaN/Inf; nothing after the last checkpoint is saved."""


class Stopped(Exception):
    """A stop signal arrived; a checkpoint was written at the step boundary."""


def _validate(cfg: PretrainConfig) -> None:
    problems = []
    if cfg.loss not in ("sampled", "exact"):
        problems.append(f"loss must be sampled or exact, got {cfg.loss!r}")
    if cfg.sampler not in ("uniform", "popularity"):
        problems.append(f"sampler must be uniform or popularity, got {cfg.sampler!r}")
    if cfg.schedule not in ("cosine", "epoch_decay", "constant"):
        problems.append(f"schedule must be cosine, epoch_decay or constant, got {cfg.schedule!r}")
    if cfg.precision not in ("auto", "bf16", "fp32"):
        problems.append(f"precision must be auto, bf16 or fp32, got {cfg.precision!r}")
    for name in ("batch_size", "hidden", "max_len", "max_epochs", "exact_chunk"):
        if getattr(cfg, name) < 1:
            problems.append(f"{name} must be >= 1")
    if cfg.loss == "sampled" and cfg.n_negatives < 1:
        problems.append("n_negatives must be >= 1 with loss=sampled")
    if not cfg.domains:
        problems.append("domains is empty: name the domains to train on")
    if isinstance(cfg, RelearnConfig):
        try:
            check_metric(cfg.select_metric)
        except TrainError as exc:
            problems.append(str(exc))
        if not 0 < cfg.train_users_fraction <= 1:
            problems.append(f"train_users_fraction must be in (0, 1], got {cfg.train_users_fraction}")
    if problems:
        raise TrainError("; ".join(problems))


def _lr_factor(cfg: PretrainConfig, total_steps: int, steps_per_epoch: int):
    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "constant":
            return 1.0
        if cfg.schedule == "epoch_decay":
            return cfg.epoch_decay ** (step // steps_per_epoch)
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


def build_model(cfg: PretrainConfig, text_dim: int, image_dim: int) -> ANT:
    return ANT(ANTConfig(
        item_source="irl",
        irl=IRLConfig(text_dim=text_dim, image_dim=image_dim, hidden=cfg.hidden, n_heads=cfg.n_experts,
                      dropout=cfg.irl_dropout, beta=cfg.beta, gate_noise=cfg.gate_noise),
        sasrec=SASRecConfig(hidden=cfg.hidden, n_layers=cfg.n_layers, n_heads=cfg.n_heads, max_len=cfg.max_len,
                            dropout=cfg.dropout, ffn_mult=cfg.ffn_mult)))


def use_bf16(cfg: PretrainConfig) -> bool:
    return cfg.precision == "bf16" or (cfg.precision == "auto" and torch.cuda.is_available())


def deepspeed_precision(ds: dict, bf16: bool) -> None:
    """bf16 under DeepSpeed the way DDP has it: fp32 weights, bf16 autocast in the forward.
    DeepSpeed's own `bf16.enabled` would cast the whole model to bf16 (the item model keeps its
    inputs in fp32); a JSON that sets `torch_autocast` or enables bf16/fp16 itself is left alone."""
    explicit = [k for k in ("bf16", "fp16") if str(ds.get(k, {}).get("enabled", "false")).lower() == "true"]
    if bf16 and "torch_autocast" not in ds and not explicit:
        ds["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}


def _make_accelerator(cfg: PretrainConfig, run_dir: Path):
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


def _lock_run_dir(accelerator, run_dir: Path, stack: ExitStack) -> None:
    """The main process holds the run folder's lock; every process learns whether it got it."""
    from accelerate.utils import broadcast_object_list

    message = [None]
    if accelerator.is_main_process:
        try:
            stack.enter_context(exclusive_dir_lock(run_dir, "training run"))
        except LockedError as exc:
            message = [str(exc)]
    if accelerator.num_processes > 1:
        broadcast_object_list(message)
    if message[0]:
        raise TrainError(message[0])


def run(cfg: PretrainConfig, stage: str = "pretrain", make_model=None, finish=None) -> dict:
    """Train; returns a summary. Raises TrainError (bad input), NonFiniteError, or Stopped.

    Re-learning passes a RelearnConfig and two hooks: `make_model(cfg, features, corpus)` builds
    the model with its frozen/trainable parameters set (default: a fresh pre-training model), and
    `finish(context)` runs on every process after training, with the best validation weights
    loaded (test evaluation, metrics.json). With a RelearnConfig the loop also selects the best
    validation step and stops early (selection.py).
    """
    from accelerate.utils import DistributedType, gather_object
    from tqdm.auto import tqdm

    _validate(cfg)
    run_dir = Path(cfg.out) / cfg.run_name
    run_dir.mkdir(parents=True, exist_ok=True)
    accelerator = _make_accelerator(cfg, run_dir)
    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    main = accelerator.is_main_process
    with ExitStack() as stack:
        _lock_run_dir(accelerator, run_dir, stack)
        accelerator.print(f"{stage}: run folder {run_dir.resolve()} ({world} process(es))", flush=True)

        # ---- data: sequences of every domain, one joint catalog, its features
        with accelerator.main_process_first():  # the first reader builds the Arrow cache
            domains, offset = [], 0
            for name in cfg.domains:
                domains.append(read_domain(cfg.shards, name, offset))
                offset += domains[-1].n_items
        corpus = Corpus(domains)
        if isinstance(cfg, RelearnConfig) and cfg.train_users_fraction < 1:
            corpus.subsample_train_users(cfg.train_users_fraction, cfg.train_users_seed)
        features = load_catalog_features(cfg.features, cfg.shards, corpus.names, [d.n_items for d in domains],
                                         cfg.features_on, cfg.features_device_max_gb, device)
        if len(corpus.train_users) < world:
            raise TrainError(f"{len(corpus.train_users)} training sequences cannot feed {world} processes")
        popularity = torch.from_numpy(corpus.popularity()).float()
        sampler = None
        if cfg.loss == "sampled":
            sampler = NegativeSampler(corpus.n_items, popularity, cfg.sampler_alpha if cfg.sampler == "popularity"
                                      else 0.0)

        # ---- model, optimizer, schedule
        torch.manual_seed(cfg.seed)
        if make_model is None:
            model = build_model(cfg, features.text_dim, features.image_dim)
        else:
            model = make_model(cfg, features, corpus)
        if cfg.compile:  # in place: parameter names, and so checkpoints, stay those of the plain model
            # Dynamo's DDP graph splitting fails on the item model's float arguments (torch 2.13);
            # the compiled parts are small, so one graph each with DDP's own bucketing loses nothing
            torch._dynamo.config.optimize_ddp = False
            for part in (model.irl, model.sasrec):
                if part is not None:
                    part.compile(dynamic=True)
        objective = TrainObjective(model, features, cfg.loss, cfg.tau, cfg.align_weight, sampler,
                                   popularity + 1.0, cfg.in_batch_negatives,
                                   cfg.gather_negatives and not cfg.shared_negatives, cfg.exact_chunk)
        objective.fail_at_step = cfg.fail_at_step
        trainable = [p for p in model.parameters() if p.requires_grad]  # frozen groups never reach Adam
        optimizer = torch.optim.AdamW(trainable or [torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr,
                                      weight_decay=cfg.weight_decay)
        steps_per_epoch = math.ceil(len(corpus.train_users) / cfg.batch_size)
        total_steps = cfg.max_epochs * steps_per_epoch if trainable else 0  # zero-shot: evaluation only
        if cfg.max_steps:
            total_steps = min(total_steps, cfg.max_steps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_factor(cfg, total_steps, steps_per_epoch))
        ckpt = find_resume_checkpoint(run_dir, cfg.resume)
        if ckpt is not None:
            check_resume(ckpt, cfg)
        if deepspeed:
            ds = accelerator.state.deepspeed_plugin.deepspeed_config
            if deepspeed_resized(ckpt, world):  # ZeRO shards of another process count: re-cut on load
                ds["checkpoint"] = {**ds.get("checkpoint", {}), "load_universal": True}
            ds["train_micro_batch_size_per_gpu"] = max(1, cfg.batch_size // world)
            ds["train_batch_size"] = ds["train_micro_batch_size_per_gpu"] * world
            ds["gradient_accumulation_steps"] = 1
            ds["gradient_clipping"] = cfg.grad_clip
            deepspeed_precision(ds, use_bf16(cfg))
        # the scheduler stays unwrapped: it is stepped once per optimizer step, whatever the engine
        if trainable:
            objective, optimizer = accelerator.prepare(objective, optimizer)
        else:  # zero-shot: DDP refuses a module with nothing to train, and nothing needs syncing
            objective = objective.to(device)

        # ---- resume
        state = {"step": 0, "epoch": 0, "consumed": 0}
        selection = None
        if isinstance(cfg, RelearnConfig):
            selection = Selection(cfg.select_metric, cfg.patience_steps, cfg.min_epochs)
        if ckpt is not None:
            saved = load_checkpoint(accelerator, objective, optimizer, scheduler, ckpt, deepspeed)
            state = {k: saved[k] for k in state}
            if selection is not None and saved.get("selection"):
                selection = Selection.from_state(saved["selection"])
            accelerator.print(f"resuming from {ckpt} (step {state['step']}, epoch {state['epoch']}, "
                              f"{state['consumed']} sequences into it; written by {saved['world_size']} "
                              f"process(es), now {world})")
        if main:
            save_config(cfg, run_dir / f"{stage}_config.yaml")
        start_trackers(accelerator, cfg.tracker, cfg.wandb_project, run_dir, cfg.run_name,
                       {**asdict(cfg), "world_size": world, "engine": "deepspeed" if deepspeed else "ddp"})
        metrics_log = MetricsLog(run_dir / "metrics.jsonl", main)
        metrics_log.write({"event": "start", "stage": stage, "step": state["step"], "world_size": world,
                           "engine": "deepspeed" if deepspeed else "ddp", "features_on": features.placement,
                           "items": corpus.n_items, "train_sequences": int(len(corpus.train_users)),
                           "resumed_from": str(ckpt) if ckpt else None})
        val_users = validation_users(corpus, cfg.eval_users, cfg.seed)

        def checkpoint() -> None:
            save_checkpoint(accelerator, objective, optimizer, scheduler,
                            {**state, "world_size": world, "engine": "deepspeed" if deepspeed else "ddp",
                             "config": asdict(cfg), "selection": selection.state_dict() if selection else None},
                            run_dir, cfg.keep_checkpoints, deepspeed)

        validated_at = {"step": -1}

        def validate() -> dict:
            validated_at["step"] = state["step"]
            t_val = time.time()
            res = evaluate(accelerator.unwrap_model(objective).model, features, corpus, val_users, "valid",
                           cfg.max_len, cfg.exclude_history, cfg.exact_chunk, device, rank, world, gather_object)
            flat = {f"val/{d}/{k}": v for d, r in res.items() for k, v in r["mean"].items()}
            if selection is not None and selection.update(state["step"], state["epoch"], res):
                # every process computed the same figures; the main one keeps the weights
                if main:
                    export_model(accelerator.unwrap_model(objective).model, run_dir / "best",
                                 {"stage": stage, "step": state["step"], "epoch": state["epoch"]})
                flat[f"val/best_{cfg.select_metric}"] = selection.best_value
            accelerator.log(flat, step=state["step"])
            if main:
                tqdm.write(validation_line(stage, state["step"], state["epoch"], flat))
            metrics_log.write({"event": "validation", "step": state["step"], "epoch": state["epoch"], **flat,
                               "perf/validation_s": round(time.time() - t_val, 3)})
            return flat

        # ---- stop signals: flag now, act at the next step boundary (all processes agree)
        stop = stack.enter_context(flag_stop_signals())

        trace = None
        if cfg.trace_batches:
            (run_dir / "trace").mkdir(exist_ok=True)
            trace = stack.enter_context(open(run_dir / "trace" / f"rank-{rank}.jsonl", "a"))
        bar = tqdm(total=total_steps, initial=state["step"], desc=stage, unit=" steps",
                   disable=not (main and cfg.progress), dynamic_ncols=True)
        objective.train()
        last_saved, last_val, t_run = (state["step"] if ckpt else -1), {}, time.time()
        n_train = len(corpus.train_users)
        early_stop = False
        while state["epoch"] < cfg.max_epochs and state["step"] < total_steps and not early_stop:
            order = epoch_order(n_train, cfg.seed, state["epoch"])
            bounds = epoch_batches(n_train, cfg.batch_size, state["consumed"])[:total_steps - state["step"]]
            batches = EpochBatches(corpus, order, bounds, state["step"], rank, world, cfg.max_len, cfg.seed,
                                   cfg.n_negatives if cfg.loss == "sampled" else 0,
                                   sampler.probs if sampler else None, cfg.shared_negatives,
                                   features if features.placement == "mmap" else None)
            loader = torch.utils.data.DataLoader(batches, batch_size=None, num_workers=cfg.num_workers,
                                                 prefetch_factor=4 if cfg.num_workers else None,
                                                 worker_init_fn=loader_worker_init())
            t_step = time.time()
            for j, batch in enumerate(loader):
                torch.manual_seed(step_seed(cfg.seed, state["step"], rank))
                out = objective(batch)
                accelerator.backward(out["loss"])
                grad_norm = accelerator.clip_grad_norm_(objective.parameters(),
                                                        cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
                grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
                summed = torch.stack([out["rec_sum"].float(), out["align"].float(),
                                      torch.tensor(float(stop["signal"] > 0), device=device)])
                if world > 1:
                    summed = accelerator.reduce(summed, "sum")
                rec = float(summed[0]) / max(batch["n_global"], 1)
                align = float(summed[1]) / world
                for term, value in (("recommendation loss L_r", rec), ("alignment loss R_c", align),
                                    ("gradient norm", grad_norm if not deepspeed or cfg.grad_clip > 0 else 0.0)):
                    if not math.isfinite(value):
                        when = ("(DeepSpeed applied the update inside backward; nothing is saved)" if deepspeed
                                else "before the update")
                        raise NonFiniteError(
                            f"step {state['step'] + 1}: the {term} is {value}; stopping {when}. "
                            f"The last good checkpoint is kept ({_newest(run_dir)}); lower lr, check the features "
                            f"(python -m ant_dist.embed verify), or resume from it")
                epoch_of_batch = state["epoch"]
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                state["step"] += 1
                state["consumed"] = bounds[j][1]
                if state["consumed"] >= n_train:
                    state["epoch"], state["consumed"] = state["epoch"] + 1, 0
                if trace is not None:
                    trace.write(json.dumps({"step": state["step"], "epoch": epoch_of_batch,
                                            "users": batch["users"].tolist()}) + "\n")
                    trace.flush()
                dt = time.time() - t_step
                t_step = time.time()
                bar.update(1)
                if state["step"] % cfg.log_every == 0 or state["step"] == total_steps:
                    record = {"train/loss": rec + cfg.align_weight * align, "train/rec_loss": rec,
                              "train/align_loss": align, "train/grad_norm": grad_norm,
                              "train/lr": scheduler.get_last_lr()[0], "train/epoch": state["epoch"],
                              "perf/step_s": dt, "perf/sequences_per_s": (bounds[j][1] - bounds[j][0]) / dt,
                              "perf/positions_per_s": batch["n_global"] / dt,
                              **memory_record(world, gather_object)}
                    accelerator.log(record, step=state["step"])
                    metrics_log.write({"event": "train", "step": state["step"], **record,
                                       "loss_path": accelerator.unwrap_model(objective).loss_path})
                    bar.set_postfix(loss=f"{rec:.3f}", lr=f"{record['train/lr']:.1e}")
                epoch_done = state["consumed"] == 0
                if (cfg.eval_every > 0 and state["step"] % cfg.eval_every == 0) or (not cfg.eval_every and epoch_done):
                    last_val = validate()
                    early_stop = selection is not None and selection.should_stop(state["step"], state["epoch"])
                if cfg.checkpoint_every and state["step"] % cfg.checkpoint_every == 0:
                    checkpoint()
                    last_saved = state["step"]
                if summed[2] > 0:
                    if last_saved != state["step"]:
                        checkpoint()
                    metrics_log.write({"event": "stopped", "step": state["step"], "signal": stop["signal"]})
                    bar.close()
                    accelerator.end_training()
                    raise Stopped(f"stopped by a signal at step {state['step']}; checkpoint written, "
                                  f"resume with resume=auto")
                if early_stop:
                    metrics_log.write({"event": "early_stop", "step": state["step"], "epoch": state["epoch"],
                                       "best_step": selection.best_step, "best_epoch": selection.best_epoch})
                    break
        bar.close()

        # ---- the end: checkpoint, final validation, exported model
        if last_saved != state["step"] and state["step"] > 0:
            checkpoint()
        if (cfg.eval_every >= 0 or selection is not None) and validated_at["step"] != state["step"]:
            last_val = validate()
        unwrapped = accelerator.unwrap_model(objective).model
        if selection is not None:  # continue with the best validation weights
            accelerator.wait_for_everyone()
            unwrapped.load_state_dict(load_model_weights(run_dir / "best"))
        # every process must hold the same parameters: record each one's digest to show it
        digests = gather_object([param_digest(unwrapped)])
        if main:
            export_model(unwrapped, run_dir / "model", {
                "stage": stage, "domains": corpus.names, "items_per_domain": [d.n_items for d in domains],
                "features": str(cfg.features), "shards": str(cfg.shards), "step": state["step"], "seed": cfg.seed})
        summary = {"event": "end", "step": state["step"], "epochs": state["epoch"], "world_size": world,
                   "seconds": round(time.time() - t_run, 2), "validation": last_val, "param_digests": digests}
        if finish is not None:
            summary.update(finish({"model": unwrapped, "features": features, "corpus": corpus, "device": device,
                                   "rank": rank, "world": world, "gather": gather_object, "main": main,
                                   "run_dir": run_dir, "selection": selection, "summary": summary,
                                   "log": accelerator.log}))
        metrics_log.write(summary)
        accelerator.wait_for_everyone()
        accelerator.end_training()
        return summary


def _newest(run_dir: Path) -> str:
    from .checkpoint import complete_checkpoints

    found = complete_checkpoints(run_dir)
    return str(found[-1]) if found else "none was written yet"
