"""Report: the paper's result tables, the negative-transfer table and plots from re-learning runs.

    python -m ant_dist.report runs/ [runs/Scientific-ReL-s1 ...] --out report/ [--metrics recall@10,ndcg@10]
                              [--alpha 0.05]
    python -m ant_dist.report --config report.yaml [paths=[runs/] out=report/ alpha=0.05 ...]

The flags are shorthands for the options below: every entry point takes --config and key=value.
The output folder is built beside `out` and swapped in when complete: a failure leaves the
previous report as it was.

Reads every metrics.json written by `ant_dist.relearn` or `ant_dist.baselines` (format:
docs/report.md), groups the runs by (domain, method, train_users_fraction), aggregates the seeds
of a group (mean ± std over seeds; per-user values averaged over seeds for the paired t-test) and
writes into --out: report.md (the paper's Tables II and III over the runs on all users, a methods
table per target and fraction, the negative-transfer table, plots, the runs used), report.json
(the same numbers) and PNG plots.

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
from ant_dist.methods import (BASELINE_METHOD, DISPLAY_NAMES, METHOD_ORDER, TABLE2_METHODS, TABLE3_FAMILIES,
                              TRANSFER_METHODS)
from ant_dist.runtime import staging
from ant_dist.runtime.exit_codes import EXIT_BAD_INPUT, EXIT_OK
from ant_dist.runtime.locking import LockedError, exclusive_dir_lock

REPORT_FORMAT = "ant-dist-report/1"
NT_METRICS = ("recall@10", "ndcg@10")       # the metrics of the per-section negative-transfer table
PAPER_FRACTION = 1.0                         # Tables II and III compare the runs trained on all users
# row order of the per-section tables: the baselines of Table II, the methods of ant_dist.relearn, the
# other families of Table III; any other label after these, A-Z
ROW_ORDER = tuple(dict.fromkeys([m for m in TABLE2_METHODS if m not in METHOD_ORDER] + list(METHOD_ORDER)
                                + [label for labels in TABLE3_FAMILIES.values() for label in labels]))


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
    return (ROW_ORDER.index(method), "") if method in ROW_ORDER else (len(ROW_ORDER), method)


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


def best_column(stats: Sequence[GroupStats], metric: str, alpha: float) -> dict:
    """One column of a methods table: the best mean, the runner-up and their paired t-test; `significant`
    when the best is ahead on the paired users with p < alpha (a tie for the best has no single winner)."""
    top = max(s.mean[metric] for s in stats)
    best = [s for s in stats if s.mean[metric] == top]
    others = [s for s in stats if s.mean[metric] < top]
    col = {"best": [s.method for s in best], "runner_up": None, "p_value": None, "n_paired_users": None,
           "significant": False}
    if len(best) == 1 and others:
        runner_up = max(others, key=lambda s: s.mean[metric])
        test = paired_ttest(best[0].user_ids, best[0].per_user[metric], runner_up.user_ids,
                            runner_up.per_user[metric])
        col.update(runner_up=runner_up.method, p_value=test["p"], n_paired_users=test["n"],
                   significant=test["p"] is not None and test["p"] < alpha and test["mean_diff"] > 0)
    return col


def _row(s: GroupStats) -> dict:
    return {"method": s.method, "n_seeds": len(s.runs), "runs": [r.run_name for r in s.runs],
            "seeds": [[r.seed, r.pretrain_seed] for r in s.runs], "n_users": int(s.user_ids.size),
            "mean": s.mean, "std": s.std}


def method_table(section: Section, metrics: Sequence[str], alpha: float) -> dict:
    """One section's methods x metrics (every method of it, ablations included): per column the best,
    the runner-up and their paired t-test."""
    return {"domain": section.domain, "train_users_fraction": section.fraction,
            "rows": [_row(s) for s in section.stats],
            "columns": {m: best_column(section.stats, m, alpha) for m in metrics}}


def transfer_cell(s: GroupStats, gb: GroupStats, metric: str, alpha: float) -> dict:
    """An adapted model vs its ground-built one (GB): the relative change and the paired t-test.
    outcome: 'negative transfer' (worse, p < alpha), 'positive transfer' (better, p < alpha) or 'n.s.'."""
    test = paired_ttest(s.user_ids, s.per_user[metric], gb.user_ids, gb.per_user[metric])
    significant = test["p"] is not None and test["p"] < alpha
    worse = s.mean[metric] < gb.mean[metric]
    return {"value": s.mean[metric], "std": s.std[metric], "n_seeds": len(s.runs),
            "rel_change_pct": relative_change(s.mean[metric], gb.mean[metric]),
            "p_value": test["p"], "n_paired_users": test["n"], "significant": significant,
            "negative_transfer": significant and worse,
            "outcome": ("negative transfer" if worse else "positive transfer") if significant else "n.s."}


def transfer_metrics(metrics: Sequence[str]) -> list[str]:
    """The negative-transfer table's metrics: Recall@10 and NDCG@10 when chosen, else the first two."""
    return [m for m in NT_METRICS if m in metrics] or list(metrics[:2])


def negative_transfer_table(section: Section, metrics: Sequence[str], alpha: float) -> Optional[dict]:
    """GB vs the transfer methods on one section; None when GB or every transfer method is missing."""
    by_method = {s.method: s for s in section.stats}
    gb = by_method.get(BASELINE_METHOD)
    present = [m for m in TRANSFER_METHODS if m in by_method]
    if gb is None or not present:
        return None
    rows = [{"metric": m, "GB": gb.mean[m], "GB_std": gb.std[m],
             "methods": {method: transfer_cell(by_method[method], gb, m, alpha) for method in present}}
            for m in transfer_metrics(metrics)]
    return {"domain": section.domain, "train_users_fraction": section.fraction, "methods": present, "rows": rows}


# ----------------------------------------------------------------------------- the paper's Tables II, III
def _full_sections(sections: Sequence[Section]) -> dict[str, dict[str, GroupStats]]:
    """domain -> {method: its stats} over the sections of the runs trained on all users."""
    return {s.domain: {g.method: g for g in s.stats} for s in sections if s.fraction == PAPER_FRACTION}


def table2(sections: Sequence[Section], metrics: Sequence[str], alpha: float) -> Optional[dict]:
    """Table II: the methods of methods.TABLE2_METHODS x targets, per metric the best of each target
    column against its runner-up; None unless at least two of those methods have runs."""
    by_domain = {d: {m: g for m, g in by.items() if m in TABLE2_METHODS} for d, by in _full_sections(sections).items()}
    by_domain = {d: by for d, by in by_domain.items() if by}
    methods = [m for m in TABLE2_METHODS if any(m in by for by in by_domain.values())]
    if len(methods) < 2:
        return None
    rows = [{"method": m, "name": DISPLAY_NAMES.get(m, m),
             "domains": {d: {k: v for k, v in _row(by[m]).items() if k != "method"}
                         for d, by in by_domain.items() if m in by}} for m in methods]
    columns = {d: {m: best_column(list(by.values()), m, alpha) for m in metrics} for d, by in by_domain.items()}
    return {"train_users_fraction": PAPER_FRACTION, "metrics": list(metrics), "domains": list(by_domain),
            "methods": methods, "rows": rows, "columns": columns}


def _family_cells(labels: Sequence[str], by: dict, metric: str, alpha: float) -> dict:
    """{GB, FT, ReL} of one family on one target: GB's value, FT's and ReL's change vs that GB."""
    gb = by.get(labels[0])
    cells = {"GB": None if gb is None else {"value": gb.mean[metric], "std": gb.std[metric],
                                            "n_seeds": len(gb.runs)}}
    for role, label in zip(("FT", "ReL"), labels[1:]):
        s = by.get(label)
        if s is None or gb is None:  # an adapted model without its GB: its value alone, nothing to compare
            cells[role] = None if s is None else {
                "value": s.mean[metric], "std": s.std[metric], "n_seeds": len(s.runs), "rel_change_pct": None,
                "p_value": None, "n_paired_users": None, "significant": False, "negative_transfer": False,
                "outcome": None}
        else:
            cells[role] = transfer_cell(s, gb, metric, alpha)
    return cells


def table3(sections: Sequence[Section], metrics: Sequence[str], alpha: float) -> Optional[dict]:
    """Table III: per model family of methods.TABLE3_FAMILIES, its GB, FT and ReL per target and metric,
    FT and ReL as changes vs the family's GB. A family is shown when some target has its GB and at
    least one of FT, ReL; None when no family is."""
    full = _full_sections(sections)
    families = {f: labels for f, labels in TABLE3_FAMILIES.items()
                if any(labels[0] in by and (labels[1] in by or labels[2] in by) for by in full.values())}
    if not families:
        return None
    domains = [d for d, by in full.items() if any(label in by for labels in families.values() for label in labels)]
    rows = [{"domain": d, "metric": m,
             "families": {f: _family_cells(labels, full[d], m, alpha) for f, labels in families.items()}}
            for d in domains for m in metrics]
    return {"train_users_fraction": PAPER_FRACTION, "metrics": list(metrics), "domains": domains,
            "families": list(families), "labels": {f: dict(zip(("GB", "FT", "ReL"), labels))
                                                   for f, labels in families.items()}, "rows": rows}


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
        "table2": table2(sections, metrics, alpha),
        "table3": table3(sections, metrics, alpha),
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
