"""Markdown rendering of a report built by `ant_dist.report`: the paper's Tables II and III, the
per-section method tables, the negative-transfer table and the list of runs used."""

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


def _head(names: Sequence[str]) -> list[str]:
    return ["| " + " | ".join(names) + " |", "| " + " | ".join("---" for _ in names) + " |"]


def _best_cell(values: dict, metric: str, col: dict, method: str) -> str:
    """mean (± std), in bold when the method is the column's best, then \\* when that best is significant."""
    text = format_value(values["mean"][metric], values["std"][metric])
    return f"**{text}**" + ("\\*" if col["significant"] else "") if method in col["best"] else text


def render_method_table(table: dict, metrics: Sequence[str], alpha: float) -> list[str]:
    lines = _head(["Method"] + [metric_label(m) for m in metrics])
    for row in table["rows"]:
        cells = [_best_cell(row, m, table["columns"][m], row["method"]) for m in metrics]
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


def _change(r: dict) -> str:
    """An adapted model's relative change vs GB: `+4.12%\\*` when significant, `-0.57% n.s.` when not."""
    if r.get("rel_change_pct") is None:
        return "n/a"
    return f"{r['rel_change_pct']:+.2f}%" + ("\\*" if r["significant"] else " n.s.")


def _transfer_note(cells: dict) -> str:
    """The Note column: the methods with a significant loss vs GB, and those below GB but not significantly."""
    worse = [m for m, r in cells.items() if r["negative_transfer"]]
    ns = [m for m, r in cells.items() if not r["significant"] and r["rel_change_pct"] is not None
          and r["rel_change_pct"] < 0]
    return "; ".join(([f"negative transfer: {', '.join(worse)}"] if worse else [])
                     + ([f"below GB, n.s.: {', '.join(ns)}"] if ns else []))


def render_negative_transfer(tables: list[dict], alpha: float) -> list[str]:
    methods = [m for m in TRANSFER_METHODS if any(m in t["methods"] for t in tables)]
    lines = _head(["Domain", "Metric", "GB"] + [c for m in methods for c in (m, f"{m} vs GB")] + ["Note"])
    for t in tables:
        title = section_title(t["domain"], t["train_users_fraction"])
        for row in t["rows"]:
            top = max([row["GB"]] + [r["value"] for r in row["methods"].values()])
            cells = [_cell(title), metric_label(row["metric"]), _bold_if(row["GB"], row["GB_std"], top)]
            for m in methods:
                r = row["methods"].get(m)
                cells += ["–", "–"] if r is None else [_bold_if(r["value"], r["std"], top), _change(r)]
            lines.append("| " + " | ".join(cells + [_transfer_note(row["methods"])]) + " |")
    lines += ["", f"X vs GB: relative change of X over GB, (X - GB) / GB; \\*: the difference from GB has "
              f"p < {alpha:g} (two-sided paired t-test on per-user test values), n.s.: it has not. Negative "
              "transfer: the adapted model is significantly worse than the ground-built one (GB); a lower "
              "value that is not significant is listed as n.s. Bold: the best of the row."]
    return lines


def _column_tests(columns: dict, names: dict) -> str:
    """`Arts: ANT vs SASRec p=0.0012; ...`: each column's best against its runner-up."""
    tests = [f"{_cell(d)}: {names[c['best'][0]]} vs {names[c['runner_up']]} p={_p(c['p_value'])} "
             f"({c['n_paired_users']} users)" for d, c in columns.items() if c["runner_up"] is not None]
    return "; ".join(tests) if tests else "no comparison (one method or a tie)"


def render_table2(t: dict, alpha: float) -> list[str]:
    """Table II: one methods x targets table per metric, methods under their display names."""
    names = {r["method"]: r["name"] for r in t["rows"]}
    lines = []
    for m in t["metrics"]:
        lines += [f"### {metric_label(m)}", ""] + _head(["Method"] + [_cell(d) for d in t["domains"]])
        for row in t["rows"]:
            cells = [_best_cell(row["domains"][d], m, t["columns"][d][m], row["method"])
                     if d in row["domains"] else "–" for d in t["domains"]]
            lines.append(f"| {_cell(row['name'])} | " + " | ".join(cells) + " |")
        lines += ["", "Best vs runner-up: " + _column_tests({d: t["columns"][d][m] for d in t["domains"]}, names)
                  + ".", ""]
    shown = ", ".join(f"{k} as {v}" for k, v in names.items() if k != v)
    lines += [f"Runs trained on all users of each target. Bold: the best per target; \\*: it beats the runner-up "
              f"with p < {alpha:g} (two-sided paired t-test on per-user test values, each user's values averaged "
              f"over seeds). –: no run." + (f" Shown under the paper's names: {shown}." if shown else "")]
    return lines


def _family_cell(cell: Optional[dict], top: float) -> str:
    if cell is None:
        return "–"
    text = _bold_if(cell["value"], cell["std"], top)
    return text if cell.get("rel_change_pct") is None else f"{text} ({_change(cell)})"


def render_table3(t: dict, alpha: float) -> list[str]:
    """Table III: per target and metric, each family's GB, FT and ReL; FT and ReL with their change vs GB."""
    lines = _head(["Target", "Metric"] + [f"{f} {role}" for f in t["families"] for role in ("GB", "FT", "ReL")])
    for row in t["rows"]:
        cells = [_cell(row["domain"]), metric_label(row["metric"])]
        for f in t["families"]:
            family = row["families"][f]
            top = max((c["value"] for c in family.values() if c is not None), default=None)
            cells += [_family_cell(family[role], top) for role in ("GB", "FT", "ReL")]
        lines.append("| " + " | ".join(cells) + " |")
    labels = "; ".join(f"{f}: " + ", ".join(f"{role} = {label}" for role, label in t["labels"][f].items())
                       for f in t["families"])
    lines += ["", f"Runs trained on all users of each target (run labels {labels}). GB: the ground-built model, "
              "FT: fine-tuned, ReL: re-learned. In brackets: the change vs the family's GB, (X - GB) / GB; "
              f"\\*: p < {alpha:g} (two-sided paired t-test on per-user test values), n.s.: not significant. A "
              "significant loss is negative transfer. Bold: the best of the family on the row. –: no run."]
    return lines


def render_markdown(report: dict, metrics: Sequence[str], alpha: float) -> str:
    lines = ["# ANT re-learning report", "",
             f"{len(report['runs'])} run(s); test metrics (best-validation weights); significance level "
             f"{alpha:g}. The same numbers are in report.json.", ""]
    plots = {(p["domain"], p["train_users_fraction"], p["kind"]): p["file"] for p in report["plots"]}
    if report["table2"]:
        lines += ["## Table II: methods × targets", ""] + render_table2(report["table2"], alpha) + [""]
    if report["table3"]:
        lines += ["## Table III: adapted vs ground-built models", ""] + render_table3(report["table3"], alpha) + [""]
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
