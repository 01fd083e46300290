"""Report: the paper's result tables, the negative-transfer table and plots from re-learning runs.

    python -m ant_dist.report runs/ [runs/Scientific-ReL-s1 ...] --out report/ [--metrics recall@10,ndcg@10]
                              [--alpha 0.05]
    python -m ant_dist.report --config report.yaml [paths=[runs/] out=report/ alpha=0.05 ...]

The flags are shorthands for the options below: every entry point takes --config and key=value.
The output folder is built beside `out` and swapped in when complete: a failure leaves the
previous report as it was.

Reads every metrics.json written by `ant_dist.relearn` (format: docs/report.md), groups the runs
by (domain, method, train_users_fraction), aggregates the seeds of a group (mean ± std over
seeds; per-user values averaged over seeds for the paired t-test) and writes into --out:
report.md (tables, plots, the runs used), report.json (the same numbers) and PNG plots.

Exit codes: 0 done, 2 bad input (no metrics.json found, a malformed file, runs of one method and
domain evaluated on different users, a bad option); the message says which.
"""

from __future__ import annotations

import json
import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ant_dist.config import ReportConfig, flag_overrides, parse_cli
from ant_dist.eval.results import ReportError, Run, read_metrics
from ant_dist.eval.tables import render_markdown, section_title
from ant_dist.methods import BASELINE_METHOD, METHOD_ORDER, TRANSFER_METHODS
from ant_dist.runtime import staging
from ant_dist.runtime.exit_codes import EXIT_BAD_INPUT, EXIT_OK
from ant_dist.runtime.locking import LockedError, exclusive_dir_lock

REPORT_FORMAT = "ant-dist-report/1"
NT_METRICS = ("recall@10", "ndcg@10")       # the paper's Table III metrics shown by the report


@dataclass
class GroupStats:
    """One (domain, fraction, method) group aggregated over its seeds."""
    method: str
    runs: list
    user_ids: np.ndarray
    mean: dict      # metric -> mean over seeds of the runs' test means
    std: dict       # metric -> sample std (ddof=1) over seeds, None with one seed
    per_user: dict  # metric -> per-user mean over seeds


@dataclass
class Section:
    """The runs of one target domain at one training-users fraction: one table, two plots."""
    domain: str
    fraction: float
    stats: list  # GroupStats, in table row order

    @property
    def title(self) -> str:
        return section_title(self.domain, self.fraction)


# ----------------------------------------------------------------------------- loading
def find_metrics_files(paths: Sequence[str]) -> list[Path]:
    """metrics.json files named by the arguments: a file, a run folder, or a folder searched recursively."""
    found: dict[Path, Path] = {}
    for p in map(Path, paths):
        if p.is_file() and p.name == "metrics.json":
            hits = [p]
        elif p.is_dir():
            hits = [p / "metrics.json"] if (p / "metrics.json").is_file() else sorted(p.rglob("metrics.json"))
        elif not p.exists():
            raise ReportError(f"{p}: no such file or folder")
        else:
            raise ReportError(f"{p}: neither a metrics.json nor a folder")
        if not hits:
            raise ReportError(f"no metrics.json in {p} nor in any folder below it")
        for h in hits:  # a file reached through two arguments counts once
            found.setdefault(h.resolve(), h)
    return list(found.values())


# ----------------------------------------------------------------------------- statistics (pure)
def aggregate(method: str, runs: list, domain: str, metrics: Sequence[str]) -> GroupStats:
    """Mean ± std over seeds of the test means; per-user values averaged over seeds (same users)."""
    evals = [r.test[domain] for r in runs]
    mean, std, per_user = {}, {}, {}
    for m in metrics:
        run_means = np.array([e.mean[m] for e in evals])
        mean[m] = float(run_means.mean())
        std[m] = float(run_means.std(ddof=1)) if len(runs) > 1 else None
        per_user[m] = np.mean([e.per_user[m] for e in evals], axis=0)
    return GroupStats(method, runs, evals[0].user_ids, mean, std, per_user)


def paired_ttest(a_ids: np.ndarray, a: np.ndarray, b_ids: np.ndarray, b: np.ndarray) -> dict:
    """Two-sided paired t-test of a vs b on their common users: {p (None if undefined), n, mean_diff}."""
    from ant_dist.eval.metrics import paired_t_test
    _, ia, ib = np.intersect1d(a_ids, b_ids, assume_unique=True, return_indices=True)
    if ia.size < 2:
        return {"p": None, "n": int(ia.size), "mean_diff": None}
    with warnings.catch_warnings():  # identical arrays: scipy warns and gives NaN, reported as None
        warnings.simplefilter("ignore", RuntimeWarning)
        res = paired_t_test(a[ia], b[ib])
    p = res["p"] if np.isfinite(res["p"]) else None
    return {"p": p, "n": int(ia.size), "mean_diff": res["mean_diff"]}


def relative_change(value: float, reference: float) -> Optional[float]:
    """(value - reference) / reference in %, None when the reference is 0."""
    return None if reference == 0 else (value - reference) / reference * 100.0


def _method_key(method: str) -> tuple:
    return (METHOD_ORDER.index(method), "") if method in METHOD_ORDER else (len(METHOD_ORDER), method)


def build_sections(runs: list, metrics: Sequence[str]) -> list[Section]:
    """Group the runs and aggregate each group; refuse duplicates and mismatched user sets."""
    groups: dict[tuple, dict[str, list]] = {}
    for run in runs:
        for domain in run.test:
            groups.setdefault((domain, run.fraction), {}).setdefault(run.method, []).append(run)
    sections = []
    for (domain, fraction), by_method in sorted(groups.items()):
        stats = []
        for method in sorted(by_method, key=_method_key):
            members = by_method[method]
            seen: dict[tuple, Run] = {}
            for r in members:
                other = seen.setdefault((r.seed, r.pretrain_seed), r)
                if other is not r:
                    raise ReportError(f"{other.path} and {r.path} are both {method} on {domain} with seed "
                                      f"{r.seed}, pretrain_seed {r.pretrain_seed}: pass one of them")
                ids, first = r.test[domain].user_ids, members[0].test[domain].user_ids
                if not np.array_equal(ids, first):
                    common = np.intersect1d(ids, first).size
                    raise ReportError(f"{members[0].path} and {r.path} ({method} on {domain}) evaluated different "
                                      f"users ({first.size} and {ids.size}, {common} in common): seeds can only be "
                                      f"averaged user by user on the same users")
            stats.append(aggregate(method, members, domain, metrics))
        sections.append(Section(domain, fraction, stats))
    return sections


def method_table(section: Section, metrics: Sequence[str], alpha: float) -> dict:
    """Table II/IV: methods x metrics; per column the best, the runner-up and their paired t-test."""
    rows = [{"method": s.method, "n_seeds": len(s.runs), "runs": [r.run_name for r in s.runs],
             "seeds": [[r.seed, r.pretrain_seed] for r in s.runs], "n_users": int(s.user_ids.size),
             "mean": s.mean, "std": s.std} for s in section.stats]
    columns = {}
    for m in metrics:
        top = max(s.mean[m] for s in section.stats)
        best = [s for s in section.stats if s.mean[m] == top]
        others = [s for s in section.stats if s.mean[m] < top]
        col = {"best": [s.method for s in best], "runner_up": None, "p_value": None, "n_paired_users": None,
               "significant": False}
        if len(best) == 1 and others:  # a tie for the best has no single winner to test
            runner_up = max(others, key=lambda s: s.mean[m])
            test = paired_ttest(best[0].user_ids, best[0].per_user[m], runner_up.user_ids, runner_up.per_user[m])
            col.update(runner_up=runner_up.method, p_value=test["p"], n_paired_users=test["n"],
                       significant=test["p"] is not None and test["p"] < alpha and test["mean_diff"] > 0)
        columns[m] = col
    return {"domain": section.domain, "train_users_fraction": section.fraction, "rows": rows, "columns": columns}


def negative_transfer_table(section: Section, metrics: Sequence[str], alpha: float) -> Optional[dict]:
    """Table III: GB vs the transfer methods; None when GB or every transfer method is missing."""
    by_method = {s.method: s for s in section.stats}
    gb = by_method.get(BASELINE_METHOD)
    present = [m for m in TRANSFER_METHODS if m in by_method]
    shown = [m for m in NT_METRICS if m in metrics] or list(metrics[:2])
    if gb is None or not present:
        return None
    rows = []
    for m in shown:
        row = {"metric": m, "GB": gb.mean[m], "GB_std": gb.std[m], "methods": {}}
        for method in present:
            s = by_method[method]
            test = paired_ttest(s.user_ids, s.per_user[m], gb.user_ids, gb.per_user[m])
            row["methods"][method] = {
                "value": s.mean[m], "std": s.std[m], "rel_change_pct": relative_change(s.mean[m], gb.mean[m]),
                "p_value": test["p"], "n_paired_users": test["n"],
                "significant": test["p"] is not None and test["p"] < alpha,
                "negative_transfer": s.mean[m] < gb.mean[m]}
        rows.append(row)
    return {"domain": section.domain, "train_users_fraction": section.fraction, "methods": present, "rows": rows}


# ----------------------------------------------------------------------------- entry point
def parse_metrics(text: str) -> list[str]:
    metrics = [m.strip().lower() for m in text.split(",") if m.strip()]
    bad = [m for m in metrics if not re.fullmatch(r"(recall|ndcg)@\d+", m)]
    if not metrics or bad or len(set(metrics)) != len(metrics):
        raise ReportError(f"--metrics: give distinct recall@K / ndcg@K names separated by commas, got {text!r}")
    return metrics


def build_report(paths: Sequence[str], out: Path, metrics: Sequence[str], alpha: float) -> dict:
    from tqdm import tqdm

    files = find_metrics_files(paths)
    runs = [read_metrics(f, metrics) for f in tqdm(files, desc="report: reading runs", disable=len(files) < 50)]
    sections = build_sections(runs, metrics)
    # every input is read and checked above; only now is the output folder touched
    with exclusive_dir_lock(out, "report"):
        work = staging.begin(out)
        try:
            report = _write_report(work, runs, sections, metrics, alpha)
            _carry_over(out, work)
        except BaseException:
            staging.abort(work)
            raise
        staging.commit(out, work)
    return report


def _carry_over(old: Path, work: Path) -> None:
    """Files in the folder that the report does not write (reproduce's selection.json, a user's
    notes) go along into the new folder; the report's own files (report.md, report.json, PNG
    plots) are replaced whole, so no stale plot of an earlier report survives."""
    import shutil

    for entry in sorted(old.iterdir()) if old.is_dir() else []:
        if entry.name in (".lock", "report.md", "report.json") or entry.suffix == ".png" or \
                (work / entry.name).exists():
            continue
        (shutil.copytree if entry.is_dir() else shutil.copy2)(entry, work / entry.name)


def _write_report(out: Path, runs: list, sections: list, metrics: Sequence[str], alpha: float) -> dict:
    from ant_dist.eval.plots import write_plots

    report = {
        "format": REPORT_FORMAT, "alpha": alpha, "metrics": list(metrics),
        "tables": [method_table(s, metrics, alpha) for s in sections],
        "negative_transfer": [t for s in sections if (t := negative_transfer_table(s, metrics, alpha))],
        "runs": [{"run_name": r.run_name, "method": r.method, "domains": list(r.test), "seed": r.seed,
                  "pretrain_seed": r.pretrain_seed, "train_users_fraction": r.fraction,
                  "best_epoch": r.best.get("epoch"), "path": str(r.path)} for r in runs],
        "plots": write_plots(out, sections, metrics),
    }
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "report.md").write_text(render_markdown(report, metrics, alpha))
    return report


def cli_overrides(argv: Sequence[str]) -> list[str]:
    """`runs/ a/ --out DIR --alpha 0.1` -> `out=DIR alpha=0.1 paths=["runs/","a/"]`; --config, key=value
    and --help pass through."""
    return flag_overrides(argv, ("out", "metrics", "alpha"), positional="paths", many=True)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = cli_overrides(sys.argv[1:] if argv is None else argv)
    cfg = parse_cli(ReportConfig, args, "python -m ant_dist.report", __doc__)
    try:
        if not 0.0 < cfg.alpha < 1.0:
            raise ReportError(f"--alpha must be between 0 and 1, got {cfg.alpha}")
        report = build_report([str(p) for p in cfg.paths], Path(cfg.out), parse_metrics(cfg.metrics), cfg.alpha)
    except (ReportError, LockedError) as exc:
        print(f"report: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"report: {len(report['runs'])} run(s), {len(report['tables'])} table(s), {len(report['plots'])} plot(s) "
          f"-> {Path(cfg.out) / 'report.md'}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
