"""RecBole's baselines on a packed target domain, scored by our metrics.

    python -m ant_dist.baselines model=BERT4Rec domain=Office shards=shards features=features out=runs
    python -m ant_dist.baselines models=[NPE,SASRec,BERT4Rec,FDSA,S3-Rec] domain=Office ...

Each model (RecBole 1.2.1's implementation; docs/baselines.md) trains on the `export_recbole`
output of shards/<domain>, written into the run folder: RecBole's own leave-one-out split of it is
ours (every user's last item is its test item, the one before its validation item, the rest its
training targets; the domain must have no user with fewer than 4 items, which pack's min_core >= 4
guarantees). After every epoch, every user with at least 3 items is scored over the whole catalog
through the trained RecBole model and ranked by our rules (eval/metrics.py: pessimistic ties, the
history excluded unless exclude_history=false); the best epoch by `select_metric` is kept (early
stopping after `patience` epochs without a better one) and its test figures written to
<out>/<run_name>/metrics.json, the format every target run writes, so `ant_dist.report` pairs a
baseline's users with ANT's. FDSA and S3-Rec read the domain's text table (ant_dist.embed output):
ant_dist/baselines/text_features.py says how. Also in the run folder: model/ (the best weights,
safetensors, and RecBole's options), metrics.jsonl, data/ (the export), tensorboard/, and the W&B
run (offline without an API key). metrics.json also holds `recbole_test`: RecBole's own full-sort
test figures of the same weights (history ranked, RecBole's tie order), to compare with RecBole.

Exit codes: 0 done (a run whose metrics.json exists is left as it is), 2 bad input, 3 non-finite
training loss, 75 stopped by SIGTERM/SIGUSR1, within one training batch (nothing is resumed: a
rerun trains that baseline again; a baseline takes minutes where ANT's stages take hours).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from ant_dist.baselines import recbole_setup as rb
from ant_dist.baselines.scoring import RecboleScorer, Sequences
from ant_dist.baselines.text_features import (TEXT_CLUSTER_FIELD, attribute_count, text_cluster_tokens,
                                              use_text_features)
from ant_dist.config import METRIC_KS, BaselinesConfig, ExportRecboleConfig, check_choices, parse_cli
from ant_dist.data.export_recbole import RECBOLE_YAML, ExportError, export_domain, read_packed_domain
from ant_dist.eval.results import METRICS_FILE, write_metrics
from ant_dist.features.feature_table import FeatureTableError, load_features
from ant_dist.methods import RECBOLE_BASELINES
from ant_dist.runtime.atomic import write_json_atomic
from ant_dist.runtime.exit_codes import EXIT_BAD_INPUT, EXIT_NONFINITE, EXIT_OK, EXIT_STOPPED, BadInput
from ant_dist.runtime.locking import LockedError, exclusive_dir_lock
from ant_dist.runtime.signals import flag_stop_signals
from ant_dist.train.selection import check_metric
from ant_dist.train.tracking import MetricsLog, choose_wandb_mode, wandb_run_id

TEXT_MODELS = ("FDSA", "S3-Rec")
MIN_ITEMS = 4  # below this RecBole's leave-one-out split and ours disagree (docstring)


class Stopped(Exception):
    """A stop signal arrived; the run ends before the next training batch."""


class NonFinite(Exception):
    """RecBole's trainer saw a NaN loss."""


def labels(cfg: BaselinesConfig) -> list[str]:
    check_choices(cfg)
    chosen = list(cfg.models) + ([cfg.model] if cfg.model else [])
    if not chosen:
        raise rb.BaselineError(f"choose model=<one of {', '.join(RECBOLE_BASELINES)}> or models=[...]")
    check_metric(cfg.select_metric)  # relearn's rule (config.SELECT_METRICS)
    for name in ("epochs", "patience", "batch_size", "eval_batch", "hidden", "max_len"):
        if getattr(cfg, name) < 1:
            raise rb.BaselineError(f"{name} must be at least 1, got {getattr(cfg, name)}")
    return list(dict.fromkeys(chosen))


def run_name(cfg: BaselinesConfig, label: str) -> str:
    if cfg.run_name:
        return cfg.run_name.replace("{model}", label)
    return f"baselines/{cfg.domain}/{label}/seed{cfg.seed}"


def recbole_options(cfg: BaselinesConfig, label: str, run_dir: Path) -> dict:
    """Our settings in RecBole's names (the paper's: CE loss over all items, Adam, no weight decay)."""
    opts = {"checkpoint_dir": str(run_dir / "recbole"), "seed": cfg.seed, "reproducibility": True,
            "epochs": cfg.epochs, "train_batch_size": cfg.batch_size, "eval_batch_size": cfg.eval_batch,
            "MAX_ITEM_LIST_LENGTH": cfg.max_len, "learning_rate": cfg.lr, "learner": "adam", "weight_decay": 0.0,
            "loss_type": "CE",
            "train_neg_sample_args": None, "hidden_size": cfg.hidden, "embedding_size": cfg.hidden,
            "inner_size": cfg.inner_size, "n_layers": cfg.n_layers, "n_heads": cfg.n_heads,
            "show_progress": False, "log_wandb": False, "state": "WARNING", "worker": 0,
            "metrics": ["Recall", "NDCG"], "topk": list(METRIC_KS), "valid_metric": "NDCG@10"}
    if cfg.dropout is not None:
        opts.update(hidden_dropout_prob=cfg.dropout, attn_dropout_prob=cfg.dropout, dropout_prob=cfg.dropout)
    # the item file is read for its ids only (every catalog row gets a RecBole id, interacted or not) and
    # the text models' cluster attributes; the raw text and prices stay unread: no baseline here uses
    # them, and RecBole's missing-value filling does not work under pandas 3 (recbole_setup.py)
    item_cols = ["item_id"] + ([TEXT_CLUSTER_FIELD] if label in TEXT_MODELS else [])
    opts["load_col"] = {"inter": ["user_id", "item_id", "timestamp"], "item": item_cols}
    if label == "FDSA":
        opts["selected_features"] = [TEXT_CLUSTER_FIELD]  # RecBole builds its layer; ours replaces it
    if label == "S3-Rec":
        opts.update(item_attribute=TEXT_CLUSTER_FIELD, train_stage="pretrain",
                    pretrain_epochs=cfg.s3rec_pretrain_epochs)
    return opts


def _check_lengths(seqs: Sequences, domain: str) -> None:
    short = sum(len(s) < MIN_ITEMS for s in seqs.sequences)
    if short:
        raise rb.BaselineError(f"{domain}: {short} users have fewer than {MIN_ITEMS} items; RecBole's leave-one-out "
                               f"split would train on their held-out items. Repack with min_core >= {MIN_ITEMS}")


def _text_table(cfg: BaselinesConfig, shards_dir: Path) -> np.ndarray:
    try:
        return np.asarray(load_features(Path(cfg.features) / cfg.domain, expect_shards=shards_dir)["text"])
    except FeatureTableError as exc:
        raise rb.BaselineError(f"FDSA and S3-Rec read our text embeddings: {exc}") from None


class StoppableBatches:
    """RecBole's training loader, checking the stop flag before each batch. A baseline is never
    resumed, so stopping mid-epoch loses nothing, and a signal is answered within one batch (an
    epoch on a real catalog can outlast a scheduler's grace period)."""

    def __init__(self, loader, stop: dict):
        self._loader, self._stop = loader, stop

    def __iter__(self):
        for batch in self._loader:
            if self._stop["signal"]:
                raise Stopped()
            yield batch

    def __len__(self) -> int:
        return len(self._loader)

    def __getattr__(self, name):
        return getattr(self._loader, name)


class Training:
    """One baseline's epochs: RecBole's `_train_epoch`, our validation, the best weights in memory."""

    def __init__(self, cfg: BaselinesConfig, label: str, run_dir: Path, scorer: RecboleScorer, trainer, log, track,
                 stop: dict):
        self.cfg, self.label, self.run_dir, self.scorer, self.trainer = cfg, label, run_dir, scorer, trainer
        self.log, self.track, self.stop = log, track, stop
        self.users = scorer.seqs.eval_users()
        self.curve: list = []
        self.best = {"step": -1, "epoch": -1, "value": float("-inf")}
        self.best_state: Optional[dict] = None

    def epoch(self, train_data, epoch: int, what: str = "train") -> float:
        try:
            loss = self.trainer._train_epoch(StoppableBatches(train_data, self.stop), epoch,
                                             show_progress=self.cfg.progress)
        except ValueError as exc:
            if "nan" in str(exc).lower():
                raise NonFinite(f"{self.label}: {exc} at epoch {epoch} ({what})") from None
            raise
        loss = float(sum(loss) if isinstance(loss, tuple) else loss)
        if not np.isfinite(loss):
            raise NonFinite(f"{self.label}: non-finite training loss {loss} at epoch {epoch} ({what})")
        return loss

    def check_stop(self) -> None:
        if self.stop["signal"]:
            raise Stopped()

    def fit(self, train_data) -> None:
        steps_per_epoch = len(train_data)
        since_best = 0
        for epoch in range(self.cfg.epochs):
            loss = self.epoch(train_data, epoch)
            valid = self.scorer.evaluate(self.users, "valid", self.cfg.exclude_history, self.cfg.eval_batch)
            value, step = valid["mean"][self.cfg.select_metric], (epoch + 1) * steps_per_epoch
            self.curve.append({"step": step, "epoch": epoch, "value": value, "loss": loss,
                               "valid": {self.cfg.domain: valid["mean"]}})
            if value > self.best["value"]:
                self.best, since_best = {"step": step, "epoch": epoch, "value": value}, 0
                self.best_state = {k: v.detach().cpu().clone() for k, v in self.trainer.model.state_dict().items()}
            else:
                since_best += 1
            record = {"epoch": epoch, "step": step, "train/loss": loss,
                      **{f"val/{self.cfg.domain}/{k}": v for k, v in valid["mean"].items()},
                      f"val/best_{self.cfg.select_metric}": self.best["value"]}
            self.log.write(record)
            self.track(record, step)
            print(f"baselines: {self.label} epoch {epoch}: loss {loss:.4f}, validation {self.cfg.select_metric} "
                  f"{value:.4f} (best {self.best['value']:.4f} at epoch {self.best['epoch']})", flush=True)
            if since_best >= self.cfg.patience:
                break
            self.check_stop()


def _wandb(cfg: BaselinesConfig, run_dir: Path, name: str, config: dict):
    """A log function (no-op without W&B) and a finish function."""
    if cfg.tracker == "none":
        return (lambda record, step: None), (lambda: None)
    mode = choose_wandb_mode()
    import wandb

    run = wandb.init(project=cfg.wandb_project, dir=str(run_dir), id=wandb_run_id(run_dir), name=name,
                     config=config, resume="allow")
    if mode == "offline":
        print(f"W&B: offline (no API key configured); upload the run with: wandb sync {run_dir / 'wandb'}",
              flush=True)
    return (lambda record, step: run.log(record, step=step)), run.finish


def prepare_data(cfg: BaselinesConfig, label: str, run_dir: Path, packed, seqs: Sequences):
    """The export (with S3-Rec's attributes) and RecBole's config, dataset and loaders."""
    shards_dir = Path(cfg.shards) / cfg.domain
    text = _text_table(cfg, shards_dir) if label in TEXT_MODELS else None
    extra = {}
    if label in TEXT_MODELS:
        k = attribute_count(len(seqs.item_tokens), cfg.s3rec_attributes)
        extra[TEXT_CLUSTER_FIELD] = text_cluster_tokens(text, k, cfg.seed)
    try:
        export = export_domain(ExportRecboleConfig(domain_dir=str(shards_dir), out=str(run_dir / "data"),
                                                   name=cfg.domain, progress=False), extra, packed=packed)
    except ExportError as exc:
        raise rb.BaselineError(str(exc)) from None
    options = recbole_options(cfg, label, run_dir)
    config = rb.recbole_config(RECBOLE_BASELINES[label], cfg.domain, run_dir / "data",
                               Path(export["out"]) / RECBOLE_YAML, options, rb.use_cuda(cfg.device))
    dataset, train, valid, test = rb.build_data(config)
    return config, dataset, (train, valid, test), text, options


def build_model(config, dataset, label: str, text: Optional[np.ndarray], scorer_seqs: Sequences):
    model = rb.build_model(config, dataset)
    if label == "FDSA":
        ids = np.asarray(dataset.token2id(config["ITEM_ID_FIELD"], scorer_seqs.item_tokens))
        use_text_features(model, text, ids, dataset.item_num)
    return model


def run_baseline(cfg: BaselinesConfig, label: str, stop: dict) -> dict:
    """Train, select and score one baseline; returns its summary (the metrics.json written)."""
    name = run_name(cfg, label)
    run_dir = Path(cfg.out) / name
    if (run_dir / METRICS_FILE).is_file():
        print(f"baselines: {label}: {run_dir / METRICS_FILE} exists, the run is finished (another run_name, or "
              f"delete the folder, to train again)", flush=True)
        return json.loads((run_dir / METRICS_FILE).read_text())
    run_dir.mkdir(parents=True, exist_ok=True)
    with exclusive_dir_lock(run_dir, "baseline run"):
        started = time.time()
        shards_dir = Path(cfg.shards) / cfg.domain
        try:
            packed = read_packed_domain(shards_dir, cfg.progress)
        except ExportError as exc:
            raise rb.BaselineError(str(exc)) from None
        seqs = Sequences.from_packed(packed)
        _check_lengths(seqs, cfg.domain)
        rb.import_recbole()
        config, dataset, (train_data, _, test_data), text, options = prepare_data(cfg, label, run_dir, packed, seqs)
        model = build_model(config, dataset, label, text, seqs)
        settings = {**{k: v for k, v in vars(cfg).items()}, "label": label, "run_name": name, "recbole": options}
        track, finish = _wandb(cfg, run_dir, name, settings)
        log = MetricsLog(run_dir / "metrics.jsonl", True)
        try:
            training = Training(cfg, label, run_dir, RecboleScorer(model, dataset, seqs, config["device"]),
                                rb.build_trainer(config, model, run_dir / "tensorboard"), log, track, stop)
            if label == "S3-Rec":
                _s3rec_pretrain(training, train_data, cfg.s3rec_pretrain_epochs)
                training.trainer = rb.build_trainer(config, model, run_dir / "tensorboard")
            train_s = time.time()
            training.fit(train_data)
            train_s = time.time() - train_s
            model.load_state_dict(training.best_state)
            result = _result(cfg, label, name, training, settings, started, train_s)
            result["recbole_test"] = recbole_evaluation(training.trainer, test_data)
            track({f"test/{cfg.domain}/{k}": v for k, v in result["test"][cfg.domain]["mean"].items()},
                  training.best["step"])
        finally:
            finish()
        _save_model(run_dir / "model", training.best_state, options, label)
        write_metrics(run_dir, result)
        return result


def recbole_evaluation(trainer, test_data) -> dict:
    """RecBole's own full-sort test figures of the loaded weights (its protocol: history ranked,
    its tie order), beside ours for comparison with RecBole's published numbers."""
    result = trainer.evaluate(test_data, load_best_model=False, show_progress=False)
    return {k: round(float(v), 6) for k, v in result.items()}


def _s3rec_pretrain(training: Training, train_data, epochs: int) -> None:
    """S3-Rec's four self-supervised tasks, then its fine-tuning stage on the same weights (RecBole
    would save them, and torch.load them when it builds the fine-tuning model)."""
    model = training.trainer.model
    for epoch in range(epochs):
        loss = training.epoch(train_data, epoch, what="S3-Rec pre-training")
        print(f"baselines: S3-Rec pre-training epoch {epoch}: loss {loss:.4f}", flush=True)
        training.log.write({"pretrain_epoch": epoch, "pretrain/loss": loss})
        training.check_stop()
    model.train_stage = "finetune"
    model.loss_fct = torch.nn.CrossEntropyLoss()


def _result(cfg: BaselinesConfig, label: str, name: str, training: Training, settings: dict, started: float,
            train_s: float) -> dict:
    blocks = {split: {cfg.domain: training.scorer.evaluate(training.users, split, cfg.exclude_history,
                                                           cfg.eval_batch)} for split in ("valid", "test")}
    return {"run_name": name, "method": label, "mode": "recbole", "recbole_model": RECBOLE_BASELINES[label],
            "recbole_version": rb.RECBOLE_VERSION, "item_repr": None, "ablations": [], "seed": cfg.seed,
            "pretrain_seed": None, "pretrained": None, "train_users_fraction": 1.0, "domains": [cfg.domain],
            "select_metric": cfg.select_metric, "best": training.best, "epochs": len(training.curve),
            "steps": training.curve[-1]["step"] if training.curve else 0, "train_s": round(train_s, 2),
            "wall_s": round(time.time() - started, 2), "valid": blocks["valid"], "test": blocks["test"],
            "curve": training.curve, "config": settings}


def _save_model(out: Path, state: dict, options: dict, label: str) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / "model.safetensors"))
    write_json_atomic(out / "recbole_config.json", {"model": RECBOLE_BASELINES[label], "label": label,
                                                    "recbole_version": rb.RECBOLE_VERSION, "options": options})


def main(argv: Optional[Sequence[str]] = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = list(sys.argv[1:] if argv is None else argv)
    cfg = parse_cli(BaselinesConfig, args, "python -m ant_dist.baselines", __doc__)
    with flag_stop_signals() as stop:
        try:
            for label in labels(cfg):
                result = run_baseline(cfg, label, stop)
                test = result["test"][cfg.domain]["mean"]
                print(f"baselines: {label} on {cfg.domain}: best validation {cfg.select_metric} "
                      f"{result['best']['value']:.4f} at epoch {result['best']['epoch']}; test recall@10 "
                      f"{test['recall@10']:.4f}, ndcg@10 {test['ndcg@10']:.4f}; results: "
                      f"{Path(cfg.out) / result['run_name'] / METRICS_FILE}", flush=True)
        except (BadInput, LockedError) as exc:
            print(f"baselines: error: {exc}", file=sys.stderr)
            return EXIT_BAD_INPUT
        except NonFinite as exc:
            print(f"baselines: error: {exc}", file=sys.stderr)
            return EXIT_NONFINITE
        except Stopped:
            print(f"baselines: stopped by signal {stop['signal']}; nothing was written for the unfinished model "
                  f"(rerun to train it again)", file=sys.stderr)
            return EXIT_STOPPED
    return EXIT_OK
