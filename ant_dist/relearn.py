"""Adaptation to a target domain, and its evaluation (the paper's Tables II-IV).

    python -m ant_dist.relearn --config configs/relearn.yaml pretrained=runs/pretrain/model \\
        domain=Scientific mode=relearn|finetune|scratch|zeroshot [item_repr=irl|id|irl+id] [ablate=[T,I]]
    accelerate launch --num_processes N -m ant_dist.relearn ...     (several GPUs of one node)

Modes (ant_dist/train/target.py): relearn = ANT (re-learn the item model and positions, keep
the pre-trained user model frozen), finetune = FT, scratch = GB, zeroshot = no target training.
item_repr=id is the pure-ID SASRec baseline, irl+id is ANT_e; ablate=[T|I|P|MoE|MF] gives Table IV.

The loop is the pre-training one (ant_dist/train/loop.py): the exact softmax over every target
item, validation after each epoch, the best validation step kept (select_metric, default
recall@10), early stopping with a patience counted in steps. Test metrics come from the best
validation weights. Output in <out>/<run_name>/: metrics.json (validation and test metrics with
per-user arrays, the best epoch, the curve, the wall time; docs/report.md has the format),
model/ (the best weights, for ant_dist.recommend), metrics.jsonl, the W&B run (offline when no
API key is configured). Exit codes as pre-training: 0 done, 2 bad input, 3 non-finite, 75
stopped by a signal after a checkpoint (rerun to resume).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Optional

from ant_dist.config import RelearnConfig, parse_cli
from ant_dist.eval.results import FORMAT, METRICS_FILE, write_metrics
from ant_dist.train import TrainError
from ant_dist.train.data import Corpus, validation_users
from ant_dist.train.entry import is_main_process, run_stage
from ant_dist.train.evaluate import evaluate
from ant_dist.train.pretrained_arch import adopt_architecture, explicit_options
from ant_dist.train.selection import Selection, check_metric
from ant_dist.train.stage import FinishContext, Stage
from ant_dist.train.target import (ablation_names, build_target_model, check_target_config, method_label,
                                   trainable_summary)


def _pretrain_seed(cfg: RelearnConfig) -> Optional[int]:
    if not cfg.pretrained or cfg.mode == "scratch":  # GB only borrows the architecture
        return None
    config = json.loads((Path(cfg.pretrained) / "model_config.json").read_text())
    return config.get("seed")


def _option_problems(cfg: RelearnConfig) -> list[str]:
    """Re-learning's own options, checked by the loop with its own so that one message lists them all."""
    problems = []
    try:
        check_metric(cfg.select_metric)
    except TrainError as exc:
        problems.append(str(exc))
    if not 0 < cfg.train_users_fraction <= 1:
        problems.append(f"train_users_fraction must be in (0, 1], got {cfg.train_users_fraction}")
    return problems


def _subsample_users(cfg: RelearnConfig, corpus: Corpus) -> None:
    if cfg.train_users_fraction < 1:
        corpus.subsample_train_users(cfg.train_users_fraction, cfg.train_users_seed)


def _selection(cfg: RelearnConfig) -> Selection:
    return Selection(cfg.select_metric, cfg.patience_steps, cfg.min_epochs)


def write_results(cfg: RelearnConfig, started: float, ctx: FinishContext) -> dict:
    """The finish hook: validation and test of the best weights on every target user -> metrics.json."""
    model, corpus, selection = ctx.model, ctx.corpus, ctx.selection
    users = validation_users(corpus, 0, cfg.seed)
    splits = {}
    for split in ("valid", "test"):
        splits[split] = evaluate(model, ctx.features, corpus, users, split, cfg.max_len, cfg.exclude_history,
                                 cfg.exact_chunk, ctx.device, ctx.rank, ctx.world, ctx.gather)
        for d, u in zip(corpus.names, users):
            splits[split][d]["user_ids"] = (u - corpus.user_offsets[corpus.names.index(d)]).tolist()
    ctx.log({f"test/{d}/{k}": v for d, r in splits["test"].items() for k, v in r["mean"].items()},
            step=ctx.summary["step"])
    result = {
        "format": FORMAT, "run_name": cfg.run_name, "method": method_label(cfg), "mode": cfg.mode,
        "item_repr": cfg.item_repr, "ablations": [f"-{a}" for a in ablation_names(cfg)], "seed": cfg.seed,
        "pretrain_seed": _pretrain_seed(cfg), "pretrained": cfg.pretrained or None,
        "train_users_fraction": cfg.train_users_fraction, "domains": corpus.names,
        "select_metric": cfg.select_metric,
        "best": {"step": selection.best_step, "epoch": selection.best_epoch, "value": selection.best_value},
        "epochs": ctx.summary["epochs"], "steps": ctx.summary["step"],
        "trainable": trainable_summary(model), "wall_s": round(time.time() - started, 2),
        "valid": splits["valid"], "test": splits["test"], "curve": selection.curve,
        "config": {k: v for k, v in vars(cfg).items()},
    }
    if ctx.main:
        write_metrics(ctx.run_dir, result)
    return {"method": result["method"], "best": result["best"], "wall_s": result["wall_s"],
            "test": {d: r["mean"] for d, r in splits["test"].items()}}


def main(argv: Optional[list[str]] = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = list(sys.argv[1:] if argv is None else argv)
    cfg = parse_cli(RelearnConfig, args, "python -m ant_dist.relearn", __doc__)
    started = time.time()

    def prepare() -> None:
        check_target_config(cfg)
        adopt_architecture(cfg, explicit_options(args))  # the saved config then records what runs

    def done(summary: dict) -> None:
        if not is_main_process():
            return
        shown = "; ".join(f"{d}: " + ", ".join(f"{k} {v:.4f}" for k, v in m.items() if k.endswith("@10"))
                          for d, m in summary["test"].items())
        print(f"relearn: {summary['method']} done in {summary['wall_s']:.0f}s, best validation "
              f"{cfg.select_metric} {summary['best']['value']:.4f} at epoch {summary['best']['epoch']}; "
              f"test {shown}; results: {os.path.join(cfg.out, cfg.run_name, METRICS_FILE)}")

    stage = Stage("relearn", make_model=build_target_model, check=_option_problems, subsample=_subsample_users,
                  selection=_selection, finish=lambda ctx: write_results(cfg, started, ctx))
    return run_stage(cfg, stage, done, prepare=prepare)


if __name__ == "__main__":
    sys.exit(main())
