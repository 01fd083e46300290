"""The training loop, shared by pre-training and re-learning. Read `run` top to bottom.

One optimizer step = one global batch of `batch_size` sequences, split over the processes.
Around it: per-step seeding (so resume replays every random draw), a guard against non-finite
losses and gradients, logging, validation, checkpoints, and a clean stop on SIGTERM/SIGUSR1.
What differs between the stages comes in as a `Stage` (stage.py); the engine set-up (DDP or
DeepSpeed, precision, torch.compile) lives in engine.py.

Exit codes (documented in docs/training.md): 0 done, 2 bad input or configuration,
3 non-finite loss or gradient (the last good checkpoint is kept), 75 stopped by a signal after
writing a checkpoint (resume with resume=auto).
"""

from __future__ import annotations

import json
import math
import time
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import torch

from ant_dist.config import ConfigError, PretrainConfig, check_choices, save_config
from ant_dist.features.catalog import CatalogFeatures, load_catalog_features
from ant_dist.model.ant import ANT, ANTConfig
from ant_dist.model.io import export_model, load_model_weights
from ant_dist.runtime.locking import LockedError, exclusive_dir_lock
from ant_dist.runtime.processes import loader_worker_init
from ant_dist.runtime.signals import flag_stop_signals
from ant_dist.train import TrainError
from ant_dist.train.checkpoint import find_resume_checkpoint
from ant_dist.train.data import (Corpus, EpochBatches, epoch_batches, epoch_order, read_domain, step_seed,
                                 validation_users)
from ant_dist.train.engine import compile_in_place, configure_deepspeed, make_accelerator, uses_deepspeed
from ant_dist.train.losses import NegativeSampler
from ant_dist.train.objective import TrainObjective
from ant_dist.train.pretrained_arch import model_configs
from ant_dist.train.resume_check import check_resume
from ant_dist.train.session import Progress, TrainingSession
from ant_dist.train.unisrec_objective import UniSRecObjective
from ant_dist.train.stage import FinishContext, Stage
from ant_dist.train.tracking import MetricsLog, memory_record, param_digest, start_trackers


class NonFiniteError(TrainError):
    """A loss term or the gradient norm became NaN/Inf; nothing after the last checkpoint is saved."""


class Stopped(Exception):
    """A stop signal arrived; a checkpoint was written at the step boundary."""


def _validate(cfg: PretrainConfig, stage: Stage) -> None:
    problems = []
    try:  # a config built in code has not been through load_config
        check_choices(cfg)
    except ConfigError as exc:
        problems.append(str(exc))
    for name in ("batch_size", "hidden", "max_len", "max_epochs", "exact_chunk"):
        if getattr(cfg, name) < 1:
            problems.append(f"{name} must be >= 1")
    if cfg.model == "unisrec" and not (0 <= cfg.item_drop < 1 and 0 <= cfg.item_drop_coefficient <= 1):
        problems.append("item_drop must be in [0, 1) and item_drop_coefficient in [0, 1]")
    if cfg.word_drop_features and cfg.model != "unisrec":
        problems.append("word_drop_features is read by model=unisrec only")
    if cfg.loss == "sampled" and cfg.n_negatives < 1 and cfg.model == "ant":
        problems.append("n_negatives must be >= 1 with loss=sampled")
    if not cfg.domains:
        problems.append("domains is empty: name the domains to train on")
    if stage.check is not None:
        problems += stage.check(cfg)
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


def _schedule(cfg: PretrainConfig, optimizer, n_train: int, trains: bool):
    """The lr schedule, and the run's length in optimizer steps (0 when nothing trains: evaluation only)."""
    steps_per_epoch = math.ceil(n_train / cfg.batch_size)
    total_steps = cfg.max_epochs * steps_per_epoch if trains else 0
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_factor(cfg, total_steps, steps_per_epoch)), total_steps


def build_model(cfg: PretrainConfig, text_dim: int, image_dim: int) -> ANT:
    """A fresh pre-training model: ANT's IRL, or UniSRec's text adaptor (model=unisrec)."""
    irl, sasrec = model_configs(cfg, text_dim, image_dim)
    return ANT(ANTConfig(item_source="text" if cfg.model == "unisrec" else "irl", irl=irl, sasrec=sasrec))


def make_objective(cfg: PretrainConfig, model: ANT, features: CatalogFeatures, sampler, popularity,
                   word_drop: Optional[CatalogFeatures]) -> torch.nn.Module:
    """The loss of the run's model: UniSRec's two contrastive tasks for a UniSRec model being
    pre-trained, else L_r (+ lambda R_c) with the configured softmax."""
    if model.cfg.item_source == "text" and cfg.model == "unisrec":
        objective = UniSRecObjective(model, features, word_drop, cfg.tau, cfg.align_weight, cfg.item_drop,
                                     cfg.item_drop_coefficient)
    else:
        objective = TrainObjective(model, features, cfg.loss, cfg.tau, cfg.align_weight, sampler, popularity + 1.0,
                                   cfg.in_batch_negatives, cfg.gather_negatives and not cfg.shared_negatives,
                                   cfg.exact_chunk)
    objective.fail_at_step = cfg.fail_at_step
    return objective


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


def _load_data(cfg: PretrainConfig, stage: Stage, accelerator):
    """Sequences of every domain as one corpus over the joint catalog, its features, the negatives' sampler."""
    with accelerator.main_process_first():  # the first reader builds the Arrow cache
        domains, offset = [], 0
        for name in cfg.domains:
            domains.append(read_domain(cfg.shards, name, offset))
            offset += domains[-1].n_items
    corpus = Corpus(domains)
    if stage.subsample is not None:
        stage.subsample(cfg, corpus)
    features = load_catalog_features(cfg.features, cfg.shards, corpus.names, [d.n_items for d in domains],
                                     cfg.features_on, cfg.features_device_max_gb, accelerator.device)
    world = accelerator.num_processes
    if len(corpus.train_users) < world:
        raise TrainError(f"{len(corpus.train_users)} training sequences cannot feed {world} processes")
    popularity = torch.from_numpy(corpus.popularity()).float()
    sampler = None
    if cfg.loss == "sampled" and cfg.model == "ant":
        sampler = NegativeSampler(corpus.n_items, popularity, cfg.sampler_alpha if cfg.sampler == "popularity"
                                  else 0.0)
    return corpus, features, popularity, sampler


def _word_drop_features(cfg: PretrainConfig, corpus: Corpus, features: CatalogFeatures,
                        accelerator) -> Optional[CatalogFeatures]:
    """UniSRec's word-dropped text table (word_drop_features), checked against the run's catalog."""
    if cfg.model != "unisrec" or not cfg.word_drop_features:
        return None
    from ant_dist.features.feature_table import read_manifest

    for name in corpus.names:
        manifest = read_manifest(Path(cfg.word_drop_features) / name) or {}
        if not manifest.get("text", {}).get("word_drop"):
            raise TrainError(f"word_drop_features={cfg.word_drop_features}: {name} has no word-drop text table "
                             f"(embed it with `python -m ant_dist.embed text_word_drop=0.15 "
                             f"out={cfg.word_drop_features}`)")
    found = load_catalog_features(cfg.word_drop_features, cfg.shards, corpus.names,
                                  [d.n_items for d in corpus.domains], features.placement,
                                  cfg.features_device_max_gb, accelerator.device)
    if found.text_dim != features.text_dim:
        raise TrainError(f"word_drop_features={cfg.word_drop_features}: text dim {found.text_dim}, but the run's "
                         f"features have {features.text_dim}: embed both with the same text encoder")
    return found


def _open_trace(run_dir: Path, rank: int, stack: ExitStack):
    """trace/rank-<r>.jsonl: the sequences this process trained at each step, for the data-plan checks."""
    (run_dir / "trace").mkdir(exist_ok=True)
    return stack.enter_context(open(run_dir / "trace" / f"rank-{rank}.jsonl", "a"))


def _epoch_loader(cfg: PretrainConfig, corpus: Corpus, features: CatalogFeatures, sampler, progress: Progress,
                  bounds: list, rank: int, world: int):
    """This process's batches of the epoch in progress, from its `bounds` on (the global batches left)."""
    batches = EpochBatches(corpus, epoch_order(len(corpus.train_users), cfg.seed, progress.epoch), bounds,
                           progress.step, rank, world, cfg.max_len, cfg.seed,
                           cfg.n_negatives if sampler is not None else 0,
                           sampler.probs if sampler else None, cfg.shared_negatives,
                           features if features.placement == "mmap" else None, draws=cfg.model == "unisrec")
    return torch.utils.data.DataLoader(batches, batch_size=None, num_workers=cfg.num_workers,
                                       prefetch_factor=4 if cfg.num_workers else None,
                                       worker_init_fn=loader_worker_init())


def _reduce_step(accelerator, out: dict, n_global: int, stop_flagged: bool) -> tuple[float, float, bool]:
    """One all-reduce for the losses and the stop flag, so every process stops at the same step."""
    world = accelerator.num_processes
    summed = torch.stack([out["rec_sum"].float(), out["align"].float(),
                          torch.tensor(float(stop_flagged), device=accelerator.device)])
    if world > 1:
        summed = accelerator.reduce(summed, "sum")
    return float(summed[0]) / max(n_global, 1), float(summed[1]) / world, bool(summed[2] > 0)


def _check_finite(rec: float, align: float, grad_norm: float, step: int, deepspeed: bool, grad_clip: float,
                  run_dir: Path) -> None:
    """Raise before the update, so the last checkpoint is the last good state."""
    # DeepSpeed computes the gradient norm only when it clips: without clipping there is none to check
    for term, value in (("recommendation loss L_r", rec), ("alignment loss R_c", align),
                        ("gradient norm", grad_norm if not deepspeed or grad_clip > 0 else 0.0)):
        if not math.isfinite(value):
            when = ("(DeepSpeed applied the update inside backward; nothing is saved)" if deepspeed
                    else "before the update")
            raise NonFiniteError(
                f"step {step}: the {term} is {value}; stopping {when}. "
                f"The last good checkpoint is kept ({_newest(run_dir)}); lower lr, check the features "
                f"(python -m ant_dist.embed verify), or resume from it")


def _validation_due(cfg: PretrainConfig, progress: Progress) -> bool:
    """eval_every > 0: every N steps; 0: at the end of each epoch; -1: never during training."""
    epoch_done = progress.consumed == 0
    return (cfg.eval_every > 0 and progress.step % cfg.eval_every == 0) or (not cfg.eval_every and epoch_done)


def _train_record(cfg: PretrainConfig, rec: float, align: float, grad_norm: float, lr: float, epoch: int,
                  dt: float, sequences: int, positions: int, world: int, gather) -> dict:
    """The figures logged every `log_every` steps; every process must call it (memory_record gathers)."""
    return {"train/loss": rec + cfg.align_weight * align, "train/rec_loss": rec,
            "train/align_loss": align, "train/grad_norm": grad_norm,
            "train/lr": lr, "train/epoch": epoch,
            "perf/step_s": dt, "perf/sequences_per_s": sequences / dt,
            "perf/positions_per_s": positions / dt,
            **memory_record(world, gather)}


def run(cfg: PretrainConfig, stage: Stage) -> dict:
    """Train; returns a summary. Raises TrainError (bad input), NonFiniteError, or Stopped.

    `stage` (stage.py) names the stage and brings its hooks: the model, its option checks, the training
    users, model selection (keep the best validation step, stop early) and `finish`, run after training."""
    from accelerate.utils import gather_object
    from tqdm.auto import tqdm

    _validate(cfg, stage)
    run_dir = Path(cfg.out) / cfg.run_name
    run_dir.mkdir(parents=True, exist_ok=True)
    accelerator = make_accelerator(cfg, run_dir)
    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    deepspeed, main = uses_deepspeed(accelerator), accelerator.is_main_process
    with ExitStack() as stack:
        _lock_run_dir(accelerator, run_dir, stack)
        accelerator.print(f"{stage.name}: run folder {run_dir.resolve()} ({world} process(es))", flush=True)

        # ---- data: sequences of every domain, one joint catalog, its features
        corpus, features, popularity, sampler = _load_data(cfg, stage, accelerator)
        n_train = len(corpus.train_users)

        # ---- model, optimizer, schedule
        torch.manual_seed(cfg.seed)
        model = (stage.make_model(cfg, features, corpus) if stage.make_model is not None
                 else build_model(cfg, features.text_dim, features.image_dim))
        if cfg.compile:
            compile_in_place(model)
        objective = make_objective(cfg, model, features, sampler, popularity,
                                   _word_drop_features(cfg, corpus, features, accelerator))
        trainable = [p for p in model.parameters() if p.requires_grad]  # frozen groups never reach Adam
        optimizer = torch.optim.AdamW(trainable or [torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr,
                                      weight_decay=cfg.weight_decay)
        scheduler, total_steps = _schedule(cfg, optimizer, n_train, bool(trainable))
        ckpt = find_resume_checkpoint(run_dir, cfg.resume)
        if ckpt is not None:
            check_resume(ckpt, cfg)
        if deepspeed:
            configure_deepspeed(accelerator, cfg, ckpt)
        # the scheduler stays unwrapped: it is stepped once per optimizer step, whatever the engine
        if trainable:
            objective, optimizer = accelerator.prepare(objective, optimizer)
        else:  # zero-shot: DDP refuses a module with nothing to train, and nothing needs syncing
            objective = objective.to(device)

        # ---- resume, then the run's records begin
        session = TrainingSession(cfg, stage, accelerator, run_dir, corpus, features, objective, optimizer,
                                  scheduler, stage.selection(cfg) if stage.selection is not None else None,
                                  MetricsLog(run_dir / "metrics.jsonl", main),
                                  validation_users(corpus, cfg.eval_users, cfg.seed))
        if ckpt is not None:
            session.resume(ckpt)
        progress, selection, metrics_log = session.progress, session.selection, session.metrics_log
        if main:
            save_config(cfg, run_dir / f"{stage.name}_config.yaml")
        engine = "deepspeed" if deepspeed else "ddp"
        start_trackers(accelerator, cfg.tracker, cfg.wandb_project, run_dir, cfg.run_name,
                       {**asdict(cfg), "world_size": world, "engine": engine})
        metrics_log.write({"event": "start", "stage": stage.name, "step": progress.step, "world_size": world,
                           "engine": engine, "features_on": features.placement, "items": corpus.n_items,
                           "train_sequences": int(n_train), "resumed_from": str(ckpt) if ckpt else None})

        # ---- stop signals: flag now, act at the next step boundary (all processes agree)
        stop = stack.enter_context(flag_stop_signals())
        trace = _open_trace(run_dir, rank, stack) if cfg.trace_batches else None
        bar = tqdm(total=total_steps, initial=progress.step, desc=stage.name, unit=" steps",
                   disable=not (main and cfg.progress), dynamic_ncols=True)
        objective.train()
        t_run, early_stop = time.time(), False
        while progress.epoch < cfg.max_epochs and progress.step < total_steps and not early_stop:
            bounds = epoch_batches(n_train, cfg.batch_size, progress.consumed)[:total_steps - progress.step]
            loader = _epoch_loader(cfg, corpus, features, sampler, progress, bounds, rank, world)
            t_step = time.time()
            for j, batch in enumerate(loader):
                torch.manual_seed(step_seed(cfg.seed, progress.step, rank))
                out = objective(batch)
                accelerator.backward(out["loss"])
                grad_norm = accelerator.clip_grad_norm_(objective.parameters(),
                                                        cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
                grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
                rec, align, stopping = _reduce_step(accelerator, out, batch["n_global"], stop["signal"] > 0)
                _check_finite(rec, align, grad_norm, progress.step + 1, deepspeed, cfg.grad_clip, run_dir)
                epoch_of_batch = progress.epoch
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                progress.advance(bounds[j][1], n_train)
                if trace is not None:
                    trace.write(json.dumps({"step": progress.step, "epoch": epoch_of_batch,
                                            "users": batch["users"].tolist()}) + "\n")
                    trace.flush()
                dt = time.time() - t_step
                t_step = time.time()
                bar.update(1)
                if progress.step % cfg.log_every == 0 or progress.step == total_steps:
                    record = _train_record(cfg, rec, align, grad_norm, scheduler.get_last_lr()[0], progress.epoch,
                                           dt, bounds[j][1] - bounds[j][0], batch["n_global"], world, gather_object)
                    accelerator.log(record, step=progress.step)
                    metrics_log.write({"event": "train", "step": progress.step, **record,
                                       "loss_path": accelerator.unwrap_model(objective).loss_path})
                    bar.set_postfix(loss=f"{rec:.3f}", lr=f"{record['train/lr']:.1e}")
                if _validation_due(cfg, progress):
                    session.validate()
                    early_stop = selection is not None and selection.should_stop(progress.step, progress.epoch)
                if cfg.checkpoint_every and progress.step % cfg.checkpoint_every == 0:
                    session.checkpoint()
                if stopping:
                    if session.saved_at != progress.step:
                        session.checkpoint()
                    metrics_log.write({"event": "stopped", "step": progress.step, "signal": stop["signal"]})
                    bar.close()
                    accelerator.end_training()
                    raise Stopped(f"stopped by a signal at step {progress.step}; checkpoint written, "
                                  f"resume with resume=auto")
                if early_stop:
                    metrics_log.write({"event": "early_stop", "step": progress.step, "epoch": progress.epoch,
                                       "best_step": selection.best_step, "best_epoch": selection.best_epoch})
                    break
        bar.close()

        # ---- the end: checkpoint, final validation, exported model
        if session.saved_at != progress.step and progress.step > 0:
            session.checkpoint()
        if (cfg.eval_every >= 0 or selection is not None) and session.validated_at != progress.step:
            session.validate()
        unwrapped = session.model
        if selection is not None:  # continue with the best validation weights
            accelerator.wait_for_everyone()
            unwrapped.load_state_dict(load_model_weights(run_dir / "best"))
        # every process must hold the same parameters: record each one's digest to show it
        digests = gather_object([param_digest(unwrapped)])
        if main:
            export_model(unwrapped, run_dir / "model", {
                "stage": stage.name, "domains": corpus.names, "items_per_domain": [d.n_items for d in corpus.domains],
                "features": str(cfg.features), "shards": str(cfg.shards), "step": progress.step, "seed": cfg.seed})
        summary = {"event": "end", "step": progress.step, "epochs": progress.epoch, "world_size": world,
                   "seconds": round(time.time() - t_run, 2), "validation": session.last_validation,
                   "param_digests": digests}
        if stage.finish is not None:
            summary.update(stage.finish(FinishContext(
                model=unwrapped, features=features, corpus=corpus, device=device, rank=rank, world=world,
                gather=gather_object, main=main, run_dir=run_dir, selection=selection, summary=summary,
                log=accelerator.log)))
        metrics_log.write(summary)
        accelerator.wait_for_everyone()
        accelerator.end_training()
        return summary


def _newest(run_dir: Path) -> str:
    from ant_dist.train.checkpoint import complete_checkpoints

    found = complete_checkpoints(run_dir)
    return str(found[-1]) if found else "none was written yet"
