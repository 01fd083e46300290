"""Markdown rendering of a report built by `ant_dist.report`: the method tables, the
negative-transfer table and the list of runs used."""

from __future__ import annotations

from typing import Optional, Sequence

from ant_dist.methods import TRANSFER_METHODS


def section_title(domain: str, fraction: float) -> str:
    """A table's heading: the target domain, and the share of its users trained when not all."""
    return domain if fraction == 1.0 else f"{domain} ({fraction:g} of users trained)"


def metric_label(m: str) -> str:
    name, _, k = m.partition("@")
    return {"recall": "Recall", "ndcg": "NDCG"}.get(name, name) + (f"@{k}" if k else "")


def format_value(mean: float, std: Optional[float]) -> str:
    return f"{mean:.4f}" if std is None else f"{mean:.4f} ± {std:.4f}"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _opt(value) -> str:
    return "–" if value is None else str(value)


def _p(p: Optional[float]) -> str:
    return "n/a" if p is None else f"{p:.2g}"


def render_method_table(table: dict, metrics: Sequence[str], alpha: float) -> list[str]:
    lines = ["| Method | " + " | ".join(metric_label(m) for m in metrics) + " |",
             "| --- | " + " | ".join("---" for _ in metrics) + " |"]
    for row in table["rows"]:
        cells = []
        for m in metrics:
            text, col = format_value(row["mean"][m], row["std"][m]), table["columns"][m]
            if row["method"] in col["best"]:
                text = f"**{text}**" + ("\\*" if col["significant"] else "")
            cells.append(text)
        lines.append(f"| {_cell(row['method'])} | " + " | ".join(cells) + " |")
    seeds = max(r["n_seeds"] for r in table["rows"])
    n_users = {r["method"]: r["n_users"] for r in table["rows"]}
    tests = [f"{metric_label(m)}: {c['best'][0]} vs {c['runner_up']} p={_p(c['p_value'])}"
             + (f" (on the {c['n_paired_users']} users both evaluated)"
                if c["n_paired_users"] < max(n_users[c["best"][0]], n_users[c["runner_up"]]) else "")
             for m, c in table["columns"].items() if c["runner_up"] is not None]
    lines += ["", f"Bold: the best per column. \\*: the best beats the runner-up with p < {alpha:g} (two-sided "
              "paired t-test on per-user test values, each user's values averaged over seeds)."
              + (" Cells with ± are the mean ± standard deviation over seeds." if seeds > 1 else ""),
              "Best vs runner-up: " + ("; ".join(tests) if tests else "no comparison (one method or a tie)") + "."]
    return lines


def _bold_if(mean: float, std: Optional[float], top: float) -> str:
    return f"**{format_value(mean, std)}**" if mean == top else format_value(mean, std)


def render_negative_transfer(tables: list[dict], alpha: float) -> list[str]:
    methods = [m for m in TRANSFER_METHODS if any(m in t["methods"] for t in tables)]
    head = ["Domain", "Metric", "GB"] + [c for m in methods for c in (m, f"{m} vs GB")] + ["Note"]
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join("---" for _ in head) + " |"]
    for t in tables:
        title = section_title(t["domain"], t["train_users_fraction"])
        for row in t["rows"]:
            values = [row["GB"]] + [row["methods"][m]["value"] for m in methods if m in row["methods"]]
            top = max(values)
            cells, worse = [_cell(title), metric_label(row["metric"]), _bold_if(row["GB"], row["GB_std"], top)], []
            for m in methods:
                r = row["methods"].get(m)
                if r is None:
                    cells += ["–", "–"]
                    continue
                change = "n/a" if r["rel_change_pct"] is None else f"{r['rel_change_pct']:+.2f}%"
                cells += [_bold_if(r["value"], r["std"], top), change + ("\\*" if r["significant"] else "")]
                if r["negative_transfer"]:
                    worse.append(m + (" (significant)" if r["significant"] else ""))
            cells.append("negative transfer: " + ", ".join(worse) if worse else "")
            lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"X vs GB: relative change of X over GB, (X - GB) / GB. \\*: the difference from GB has "
              f"p < {alpha:g} (two-sided paired t-test on per-user test values). Negative transfer: the adapted "
              "model is worse than the ground-built one (GB). Bold: the best of the row."]
    return lines


def render_markdown(report: dict, metrics: Sequence[str], alpha: float) -> str:
    lines = ["# ANT re-learning report", "",
             f"{len(report['runs'])} run(s); test metrics (best-validation weights); significance level "
             f"{alpha:g}. The same numbers are in report.json.", ""]
    plots = {(p["domain"], p["train_users_fraction"], p["kind"]): p["file"] for p in report["plots"]}
    for table in report["tables"]:
        where = (table["domain"], table["train_users_fraction"])
        title = section_title(*where)
        lines += [f"## {title}", ""] + render_method_table(table, metrics, alpha) + [""]
        for kind, caption in (("curve", "validation curve"), ("bars", "test metrics")):
            if (*where, kind) in plots:
                lines += [f"![{title}: {caption}]({plots[(*where, kind)]})", ""]
    if report["negative_transfer"]:
        lines += ["## Negative transfer: GB vs FT vs ReL", ""]
        lines += render_negative_transfer(report["negative_transfer"], alpha) + [""]
    lines += ["## Runs used", "", "| Run | Method | Domains | Seed | Pretrain seed | Train users | Best epoch | File |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in report["runs"]:
        cells = [_cell(r["run_name"]), _cell(r["method"]), ", ".join(r["domains"]), _opt(r["seed"]),
                 _opt(r["pretrain_seed"]), f"{r['train_users_fraction']:g}", _opt(r["best_epoch"]), r["path"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
