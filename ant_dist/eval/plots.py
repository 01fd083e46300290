"""Plots of the report (matplotlib, Agg backend: no display needed): per target domain, the
validation curve of each method and a bar chart of its test metrics.

Seeds of one method are drawn as their mean, with the standard deviation over seeds as a shaded
band (curves) or error bars (bars) when a method has several seeds.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Sequence

import matplotlib
import numpy as np

matplotlib.use("Agg")  # before pyplot: files only, no display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402


def slug(text: str) -> str:
    """A file-name-safe form of a domain name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "domain"


def _series(run, domain: str, metric: str, x_key: str) -> dict:
    """{x: value} of one run's validation curve on one domain (entries without the metric skipped)."""
    points = {}
    for entry in run.curve:
        value = (entry.get("valid") or {}).get(domain, {}).get(metric)
        if value is not None and entry.get(x_key) is not None:
            points[entry[x_key]] = float(value)
    return points


def _x_key(runs: Sequence) -> str:
    """epoch when every curve has one point per epoch; else step (validation more often than per epoch)."""
    for run in runs:
        epochs = [e.get("epoch") for e in run.curve]
        if any(e is None for e in epochs) or len(set(epochs)) != len(epochs):
            return "step"
    return "epoch"


def curve_mean_std(runs: Sequence, domain: str, metric: str, x_key: str) -> tuple:
    """(xs, mean, std) over the runs (seeds) that reached each x; std is 0 where one run did."""
    series = [_series(r, domain, metric, x_key) for r in runs]
    xs = sorted(set().union(*series))
    values = [[s[x] for s in series if x in s] for x in xs]
    mean = np.array([np.mean(v) for v in values])
    std = np.array([np.std(v, ddof=1) if len(v) > 1 else 0.0 for v in values])
    return np.array(xs), mean, std


def plot_curves(section, path: Path) -> bool:
    """Validation curve of each method of a section; False (nothing written) when no run has one."""
    runs = [r for s in section.stats for r in s.runs]
    # the selection metric the runs used (the most common one, should they differ)
    metric = Counter(r.select_metric for r in runs).most_common(1)[0][0]
    x_key = _x_key(runs)
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    drawn = False
    for s in section.stats:
        xs, mean, std = curve_mean_std(s.runs, section.domain, metric, x_key)
        if xs.size == 0:
            continue
        label = s.method if len(s.runs) == 1 else f"{s.method} ({len(s.runs)} seeds)"
        line, = ax.plot(xs, mean, marker="o", markersize=3, label=label)
        if len(s.runs) > 1:
            ax.fill_between(xs, mean - std, mean + std, color=line.get_color(), alpha=0.2, linewidth=0)
        drawn = True
    if drawn:
        ax.set(xlabel=x_key, ylabel=f"validation {metric}", title=f"{section.title}: validation {metric}")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
        fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return drawn


def plot_bars(section, metrics: Sequence[str], path: Path, error_bars: bool) -> None:
    """Grouped bars: one group per metric, one bar per method; error bars = std over seeds."""
    n = len(section.stats)
    width = 0.8 / n
    x = np.arange(len(metrics))
    fig, ax = plt.subplots(figsize=(max(6.4, 1.1 * len(metrics) * max(n, 2) / 2), 4.0))
    for i, s in enumerate(section.stats):
        heights = [s.mean[m] for m in metrics]
        # a single-seed method has no spread: no error bar rather than a zero-height one
        errors = [s.std[m] for m in metrics] if error_bars and len(s.runs) > 1 else None
        ax.bar(x + (i - (n - 1) / 2) * width, heights, width, yerr=errors, capsize=3,
               label=s.method if len(s.runs) == 1 else f"{s.method} ({len(s.runs)} seeds)")
    ax.set_xticks(x, [m.replace("recall", "Recall").replace("ndcg", "NDCG") for m in metrics])
    ax.set(ylabel="test value", title=f"{section.title}: test metrics"
           + (" (mean ± std over seeds)" if error_bars else ""))
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize="small")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def write_plots(out: Path, sections: Sequence, metrics: Sequence[str]) -> list[dict]:
    """Both plots of every section into `out`; returns what was written (file names relative to out)."""
    error_bars = any(len(s.runs) > 1 for sec in sections for s in sec.stats)
    written, used = [], set()
    for sec in sections:
        stem = slug(sec.domain) + ("" if sec.fraction == 1.0 else f"_users{sec.fraction:g}")
        while stem in used:  # two domain names with the same slug
            stem += "_"
        used.add(stem)
        entry = {"domain": sec.domain, "train_users_fraction": sec.fraction}
        if plot_curves(sec, out / f"curve_{stem}.png"):
            written.append({**entry, "kind": "curve", "file": f"curve_{stem}.png"})
        plot_bars(sec, metrics, out / f"bars_{stem}.png", error_bars)
        written.append({**entry, "kind": "bars", "file": f"bars_{stem}.png"})
    return written
