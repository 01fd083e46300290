"""Model selection on validation for the reproduction (`python -m ant_dist.reproduce`'s select
stage), and the run folders its report reads: per (target, method, seed) the best grid point,
plus every baseline run of the plan (pipeline/grid.py and pipeline/plan.py enumerate the runs)."""

from __future__ import annotations

import json

from ant_dist.config import ConfigError, ReproduceConfig
from ant_dist.pipeline.grid import grid_axes, relearn_runs
from ant_dist.pipeline.plan import BASELINE_FIELDS, BASELINE_NOT_RESULTS, baseline_config, baseline_runs, layout


def _valid_value(metrics: dict, target: str, metric: str, where: str) -> float:
    try:
        return float(metrics["valid"][target]["mean"][metric])
    except (KeyError, TypeError, ValueError):
        raise ConfigError(f"{where}: no validation {metric} for {target} in metrics.json") from None


def select_runs(cfg: ReproduceConfig) -> dict:
    """Per (target, method, seed), the grid point whose run has the best validation `select_metric`
    (the mean over the target's users, from metrics.json "valid"); a tie keeps the earlier point."""
    paths = layout(cfg)
    groups: dict = {}
    missing = []
    for run in relearn_runs(cfg):
        where = paths["runs"] / run["run_name"] / "metrics.json"
        if not where.is_file():
            missing.append(str(where))
            continue
        metrics = json.loads(where.read_text())
        recorded = metrics.get("config", {})
        # a run left by another config must not be selected: its grid point, and every other option
        # the plan sets that bears on results (a point may have no option of its own: folder default)
        for key, value in {**run["expect"], **run["point"]}.items():
            if key in recorded and recorded[key] != value or key in run["point"] and key not in recorded:
                said = "the grid point says" if key in run["point"] else "the plan says"
                raise ConfigError(f"{where}: was run with {key}={recorded.get(key)!r}, {said} {value!r} (a stale "
                                  f"run folder? remove it and rerun)")
        value = _valid_value(metrics, run["target"], cfg.select_metric, str(where))
        key = (run["target"], run["method"], run["seed"])
        groups.setdefault(key, []).append({"point": run["point"], "grid_index": run["grid_index"],
                                           "run_dir": str(where.parent), "valid": value})
    if missing:
        raise ConfigError(f"{len(missing)} re-learning run(s) have no metrics.json yet, e.g. {missing[0]}")
    out = []
    for (target, method, seed), cands in groups.items():
        best = cands[0]
        for c in cands[1:]:
            if c["valid"] > best["valid"]:  # strictly better: a tie keeps the earlier grid point
                best = c
        out.append({"target": target, "method": method, "seed": seed, "selected": best, "candidates": cands})
    return {"format": "ant-dist-selection/1", "select_metric": cfg.select_metric, "split": "valid",
            "grid": {k: v for k, v in grid_axes(cfg.relearn)}, "groups": out}


def report_inputs(cfg: ReproduceConfig, selection: dict) -> list:
    """The run folders `ant_dist.report` reads: the re-learning runs chosen in `selection`, then
    every baseline run of the plan, each finished and run with the options the plan gives it now
    (every option its metrics.json records that bears on the results)."""
    dirs = [g["selected"]["run_dir"] for g in selection["groups"]]
    runs_root = layout(cfg)["runs"]
    missing = []
    for run in baseline_runs(cfg):
        where = runs_root / run["run_name"] / "metrics.json"
        if not where.is_file():
            missing.append(str(where))
            continue
        metrics = json.loads(where.read_text())
        recorded = {**metrics.get("config", {}), "model": metrics.get("method")}
        expected = baseline_config(run, cfg.select_metric)
        for key in sorted(set(recorded) & BASELINE_FIELDS - BASELINE_NOT_RESULTS):
            if recorded[key] != getattr(expected, key):
                raise ConfigError(f"{where}: was run with {key}={recorded[key]!r}, the plan says "
                                  f"{getattr(expected, key)!r} (a stale run folder? remove it and rerun the "
                                  f"baselines stage)")
        dirs.append(str(where.parent))
    if missing:
        raise ConfigError(f"{len(missing)} baseline run(s) have no metrics.json yet, e.g. {missing[0]}")
    return dirs
