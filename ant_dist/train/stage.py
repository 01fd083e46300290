"""What a stage of training tells the loop (loop.py), and what the loop hands back when it is done.

The loop itself knows no stage: pre-training is `Stage("pretrain")`, every hook left out;
re-learning (ant_dist/relearn.py) passes its model, its own option checks, the training-user
subset, model selection and the metrics.json writer as hooks.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from ant_dist.config import PretrainConfig
from ant_dist.features.catalog import CatalogFeatures
from ant_dist.model.ant import ANT
from ant_dist.train.data import Corpus
from ant_dist.train.selection import Selection


@dataclass(frozen=True)
class Stage:
    name: str  # "pretrain" or "relearn": log lines, <name>_config.yaml, metrics.jsonl
    # the model with requires_grad set on what trains; None: a fresh pre-training model
    make_model: Optional[Callable[[PretrainConfig, CatalogFeatures, Corpus], ANT]] = None
    # the stage's own option problems, reported with the loop's in one message
    check: Optional[Callable[[PretrainConfig], list[str]]] = None
    # trims corpus.train_users in place, before the features are loaded
    subsample: Optional[Callable[[PretrainConfig, Corpus], None]] = None
    # a Selection keeps the best validation step, stops early and ends on the best weights
    selection: Optional[Callable[[PretrainConfig], Selection]] = None
    # runs on every process after training; what it returns joins the summary
    finish: Optional[Callable[[FinishContext], dict]] = None


@dataclass
class FinishContext:
    """The trained model (the best validation weights when the stage selects) and what evaluating it needs."""

    model: ANT
    features: CatalogFeatures
    corpus: Corpus
    device: torch.device
    rank: int
    world: int
    gather: Callable[[list], list]  # accelerate's gather_object: every process's list, joined
    main: bool
    run_dir: Path
    selection: Optional[Selection]
    summary: dict  # the end record so far (step, epochs, ...)
    log: Callable[..., Any]  # accelerator.log(values, step=...)
