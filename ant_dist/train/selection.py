"""Model selection on validation: the best step so far, its curve, and early stopping.

The metric is pooled over all target users (every domain's users weigh the same per user), as
the paper selects one model per target. Patience is counted in optimizer steps, and no stop
happens before `min_epochs`: a tiny target has a handful of steps per epoch, and a patience
counted in epochs stopped a from-scratch model at epoch 0 on half the seeds, so from-scratch and
transferred models would not get the same budget.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from ant_dist.config import SELECT_METRICS
from ant_dist.train import TrainError


def check_metric(name: str) -> None:
    if name not in SELECT_METRICS:
        raise TrainError(f"select_metric must be one of {', '.join(SELECT_METRICS)}, got {name!r}")


def pooled(result: dict, metric: str) -> float:
    """Mean of `metric` over every evaluated user of every domain (evaluate()'s result)."""
    total = sum(r["mean"][metric] * r["users"] for r in result.values() if r["users"])
    users = sum(r["users"] for r in result.values())
    return total / users if users else float("nan")


@dataclass
class Selection:
    metric: str = "recall@10"
    patience_steps: int = 100
    min_epochs: int = 5
    best_value: float = -math.inf
    best_step: int = -1
    best_epoch: int = -1
    curve: list = field(default_factory=list)

    def update(self, step: int, epoch: int, result: dict) -> bool:
        """Record one validation; True when it is the best so far (ties keep the earlier step)."""
        value = pooled(result, self.metric)
        if self.curve and self.curve[-1]["step"] == step:  # a finished run started again: nothing new
            return False
        self.curve.append({"step": step, "epoch": epoch, "value": value,
                           "valid": {d: dict(r["mean"]) for d, r in result.items()}})
        if value > self.best_value or self.best_step < 0:
            self.best_value, self.best_step, self.best_epoch = value, step, epoch
            return True
        return False

    def should_stop(self, step: int, epoch: int) -> bool:
        if self.patience_steps <= 0 or epoch < self.min_epochs or self.best_step < 0:
            return False
        return step - self.best_step >= self.patience_steps

    def state_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_state(cls, state: dict) -> "Selection":
        return cls(**state)
