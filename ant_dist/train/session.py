"""A training run in progress, as its checkpoints and validations see it (loop.py drives it).

`Progress` is where the run stands, the part of a checkpoint that resume restores;
`TrainingSession` holds what a checkpoint saves and a validation evaluates, and remembers the
step of the newest of each, so that the end of the run does not repeat them.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from ant_dist.config import PretrainConfig
from ant_dist.features.catalog import CatalogFeatures
from ant_dist.model.ant import ANT
from ant_dist.model.io import export_model
from ant_dist.train.checkpoint import load_checkpoint, save_checkpoint
from ant_dist.train.data import Corpus
from ant_dist.train.engine import uses_deepspeed
from ant_dist.train.evaluate import evaluate
from ant_dist.train.selection import Selection
from ant_dist.train.stage import Stage
from ant_dist.train.tracking import MetricsLog, validation_line


@dataclass
class Progress:
    """Where training stands: what a checkpoint saves and a resume restores."""

    step: int = 0
    epoch: int = 0
    consumed: int = 0  # sequences of the current epoch already trained, by all processes together

    def advance(self, consumed: int, n_train: int) -> None:
        self.step += 1
        self.consumed = consumed
        if self.consumed >= n_train:
            self.epoch, self.consumed = self.epoch + 1, 0


@dataclass
class TrainingSession:
    """What a run's checkpoints and validations read and record; loop.run builds it once and steps it."""

    cfg: PretrainConfig
    stage: Stage
    accelerator: Any
    run_dir: Path
    corpus: Corpus
    features: CatalogFeatures
    objective: Any  # the TrainObjective, wrapped by DDP or DeepSpeed when it trains
    optimizer: Any
    scheduler: Any
    selection: Optional[Selection]  # None: the stage keeps the last weights, never stops early
    metrics_log: MetricsLog
    val_users: list
    progress: Progress = field(default_factory=Progress)
    saved_at: int = -1  # the step of the newest checkpoint
    validated_at: int = -1
    last_validation: dict = field(default_factory=dict)

    @property
    def model(self) -> ANT:
        return self.accelerator.unwrap_model(self.objective).model

    def resume(self, ckpt: Path) -> None:
        acc = self.accelerator
        saved = load_checkpoint(acc, self.objective, self.optimizer, self.scheduler, ckpt, uses_deepspeed(acc))
        self.progress = Progress(saved["step"], saved["epoch"], saved["consumed"])
        self.saved_at = self.progress.step
        if self.selection is not None and saved.get("selection"):
            self.selection = Selection.from_state(saved["selection"])
        acc.print(f"resuming from {ckpt} (step {self.progress.step}, epoch {self.progress.epoch}, "
                  f"{self.progress.consumed} sequences into it; written by {saved['world_size']} "
                  f"process(es), now {acc.num_processes})")

    def checkpoint(self) -> None:
        deepspeed = uses_deepspeed(self.accelerator)
        save_checkpoint(self.accelerator, self.objective, self.optimizer, self.scheduler,
                        {**asdict(self.progress), "world_size": self.accelerator.num_processes,
                         "engine": "deepspeed" if deepspeed else "ddp", "config": asdict(self.cfg),
                         "selection": self.selection.state_dict() if self.selection else None},
                        self.run_dir, self.cfg.keep_checkpoints, deepspeed)
        self.saved_at = self.progress.step

    def validate(self) -> None:
        """Evaluate on the validation users; with a selection, a new best step's weights go to best/."""
        from accelerate.utils import gather_object
        from tqdm.auto import tqdm

        acc, cfg, step, epoch = self.accelerator, self.cfg, self.progress.step, self.progress.epoch
        self.validated_at = step
        t_val = time.time()
        res = evaluate(self.model, self.features, self.corpus, self.val_users, "valid", cfg.max_len,
                       cfg.exclude_history, cfg.exact_chunk, acc.device, acc.process_index, acc.num_processes,
                       gather_object)
        flat = {f"val/{d}/{k}": v for d, r in res.items() for k, v in r["mean"].items()}
        if self.selection is not None and self.selection.update(step, epoch, res):
            # every process computed the same figures; the main one keeps the weights
            if acc.is_main_process:
                export_model(self.model, self.run_dir / "best", {"stage": self.stage.name, "step": step,
                                                                 "epoch": epoch})
            flat[f"val/best_{self.selection.metric}"] = self.selection.best_value
        acc.log(flat, step=step)
        if acc.is_main_process:
            tqdm.write(validation_line(self.stage.name, step, epoch, flat))
        self.metrics_log.write({"event": "validation", "step": step, "epoch": epoch, **flat,
                                "perf/validation_s": round(time.time() - t_val, 3)})
        self.last_validation = flat
