"""The reproduction's hyper-parameter grid: which `relearn` options are grid axes, the points a
method's runs take (not an axis the method ignores or sets itself), and the runs' folder names.
Selection (pipeline/selection.py) and the plan (pipeline/plan.py) both enumerate runs from here."""

from __future__ import annotations

import dataclasses
import itertools
import math
import re

import yaml

from ant_dist.config import ConfigError, RelearnConfig, ReproduceConfig
from ant_dist.methods import FUSION_ABLATION, IRL_ITEM_REPRS, IRL_ONLY_OPTIONS, method_options

LIST_FIELDS = {f.name for f in dataclasses.fields(RelearnConfig) if f.type in (list, "list")}


def format_value(value) -> str:
    """A value as OmegaConf's key=value parser reads it back."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(format_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{format_value(v)}" for k, v in value.items()) + "}"
    return str(value)


def grid_axes(relearn: dict) -> list:
    """[(option, values)] of the relearn options that are grids, in config order."""
    axes = []
    for key, value in relearn.items():
        is_axis = isinstance(value, list) and (key not in LIST_FIELDS or all(isinstance(v, list) for v in value))
        if is_axis:
            if not value:
                raise ConfigError(f"relearn.{key}: an empty grid")
            axes.append((key, list(value)))
    return axes


def grid_points(relearn: dict, axes: list | None = None) -> list:
    """Every combination of the grid axes (the first axis varies slowest), as {option: value}."""
    axes = grid_axes(relearn) if axes is None else axes
    return [dict(zip([k for k, _ in axes], combo)) for combo in itertools.product(*[v for _, v in axes])]


def method_relearn_options(cfg: ReproduceConfig, method: str) -> list:
    """The relearn options a configured method adds: its method_options entry, else its table's."""
    return cfg.method_options[method] if method in cfg.method_options else method_options(method)


def method_grid_axes(cfg: ReproduceConfig, method: str) -> list:
    """The grid axes that vary a method's runs: every axis but an option its own options set (they
    come last and win) and an option its item model never reads (methods.IRL_ONLY_OPTIONS outside
    ANT's item model or with its fusion term ablated). Either gives runs identical but for their folder."""
    own = dict(str(o).split("=", 1) for o in method_relearn_options(cfg, method) if "=" in str(o))
    own = {k.strip(): yaml.safe_load(v) for k, v in own.items()}
    ablated = own.get("ablate", cfg.relearn.get("ablate")) or []
    ablated = [str(a).lstrip("-") for a in (ablated if isinstance(ablated, list) else [ablated])]
    fusion_read = own.get("item_repr", "irl") in IRL_ITEM_REPRS and FUSION_ABLATION not in ablated
    ignored = set() if fusion_read else set(IRL_ONLY_OPTIONS)
    return [(k, v) for k, v in grid_axes(cfg.relearn) if k not in set(own) | ignored]


def point_tag(point: dict) -> str:
    """A folder name for a grid point: beta0.1, or beta0.1-lr0.001; 'default' without a grid."""
    parts = [f"{k}{format_value(v)}" for k, v in point.items()]
    return re.sub(r"[^A-Za-z0-9_.,=+-]", "_", "-".join(parts)) or "default"


def slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", label.strip())


def relearn_runs(cfg: ReproduceConfig) -> list:
    """One entry per re-learning run: target x method x grid point x seed, in that order (a method's
    grid points are those of its own axes, method_grid_axes)."""
    runs = []
    points = {m: list(enumerate(grid_points(cfg.relearn, method_grid_axes(cfg, m)))) for m in cfg.methods}
    for target, method in itertools.product(cfg.targets, cfg.methods):
        for (gi, point), seed in itertools.product(points[method], cfg.seeds):
            name = f"relearn/{target}/{slug(method)}/seed{seed}/{point_tag(point)}"
            runs.append({"target": target, "method": method, "seed": seed, "grid_index": gi, "point": point,
                         "run_name": name})
    return runs


def relearn_note(cfg: ReproduceConfig) -> str:
    axes = grid_axes(cfg.relearn)
    grid = " x ".join(f"{k} {format_value(v)}" for k, v in axes) or "no grid"
    n_points = math.prod(len(v) for _, v in axes)
    per_target = sum(math.prod(len(v) for _, v in method_grid_axes(cfg, m)) for m in cfg.methods)
    repeats = len(cfg.methods) * n_points - per_target
    return (f"{len(cfg.targets)} target(s) x {len(cfg.methods)} method(s) x {n_points} grid point(s) ({grid})"
            + (f" less {repeats} that would repeat a run (a grid option the method ignores or sets itself)"
               if repeats else "")
            + f" x {len(cfg.seeds)} seed(s) = {len(cfg.targets) * per_target * len(cfg.seeds)} runs")
