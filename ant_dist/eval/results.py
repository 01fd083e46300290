"""The results format, `metrics.json` (format "ant-dist-metrics/1"; docs/report.md lists every key):
written by a target run (`ant_dist.relearn`), read and checked by the report. One module for both
sides, so a run and the report can never disagree on what the file holds.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ant_dist.runtime.atomic import write_json_atomic
from ant_dist.runtime.exit_codes import BadInput

FORMAT = "ant-dist-metrics/1"
METRICS_FILE = "metrics.json"


class ReportError(BadInput, ValueError):
    """Bad input: the message names the file and what is wrong with it."""


@dataclass
class DomainEval:
    user_ids: np.ndarray  # sorted ascending
    mean: dict            # metric -> the mean the run reported
    per_user: dict        # metric -> per-user values aligned with user_ids



@dataclass
class Run:
    path: Path
    run_name: str
    method: str
    seed: Optional[int]
    pretrain_seed: Optional[int]
    fraction: float
    select_metric: str
    best: dict
    test: dict   # domain -> DomainEval
    curve: list  # the metrics.json "curve" entries as written


def write_metrics(run_dir: str | Path, result: dict) -> Path:
    """<run_dir>/metrics.json, atomically; `result` without a format gets this one."""
    path = Path(run_dir) / METRICS_FILE
    write_json_atomic(path, {"format": FORMAT, **result}, indent=1, sort_keys=False)
    return path


def domain_eval(block: dict, where: str, metrics: Sequence[str]) -> DomainEval:
    missing = [k for k in ("user_ids", "mean", "per_user") if k not in block]
    if missing:
        raise ReportError(f"{where}: missing {', '.join(missing)}")
    ids = np.asarray(block["user_ids"])
    if ids.ndim != 1 or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
        raise ReportError(f"{where}: user_ids must be a non-empty list of integers")
    if np.unique(ids).size != ids.size:
        raise ReportError(f"{where}: user_ids has duplicates")
    order = np.argsort(ids, kind="stable")
    mean, per_user = {}, {}
    for m in metrics:
        if m not in block["per_user"] or m not in block["mean"]:
            raise ReportError(f"{where}: no {m!r} (it has {sorted(block['per_user'])}); choose --metrics among those")
        values = np.asarray(block["per_user"][m], dtype=np.float64)
        if values.shape != ids.shape or not np.all(np.isfinite(values)):
            raise ReportError(f"{where}: per_user[{m!r}] must hold one finite number per user ({ids.size})")
        reported = float(block["mean"][m])
        # the table shows the reported mean; it must be the mean of the values the t-test uses
        if not np.isclose(reported, values.mean(), rtol=1e-4, atol=1e-6):
            raise ReportError(f"{where}: mean[{m!r}] = {reported} but its per-user values average {values.mean()}")
        mean[m], per_user[m] = reported, values[order]
    return DomainEval(ids[order], mean, per_user)


def read_metrics(path: Path, metrics: Sequence[str]) -> Run:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ReportError(f"{path}: not readable JSON ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        got = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise ReportError(f"{path}: not an {FORMAT} file (format: {got!r})")
    try:
        domains = data["domains"]
        if not isinstance(domains, list) or not domains or not all(isinstance(d, str) for d in domains):
            raise ReportError(f"{path}: domains must be a non-empty list of names")
        if not isinstance(data["method"], str) or not data["method"]:
            raise ReportError(f"{path}: method must be a non-empty string")
        test = {d: domain_eval(data["test"][d], f"{path}: test[{d!r}]", metrics) for d in domains}
        curve = data.get("curve") or []
        if not isinstance(curve, list):
            raise ReportError(f"{path}: curve must be a list")
        return Run(path=path, run_name=str(data.get("run_name") or path.parent.name), method=data["method"],
                   seed=data.get("seed"), pretrain_seed=data.get("pretrain_seed"),
                   fraction=float(data.get("train_users_fraction", 1.0)),
                   select_metric=str(data.get("select_metric") or "recall@10"), best=data.get("best") or {},
                   test=test, curve=curve)
    except KeyError as exc:
        raise ReportError(f"{path}: missing key {exc}") from None
    except (TypeError, ValueError, AttributeError) as exc:
        if isinstance(exc, ReportError):
            raise
        raise ReportError(f"{path}: malformed ({exc})") from None
