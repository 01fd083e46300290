"""The reproduction's hyper-parameter grid: which `relearn` options are grid axes, the points a
method's runs take (not an option its run ignores or sets itself), each run's options and what
its metrics.json must record, and the runs' folder names. Selection (pipeline/selection.py) and
the plan (pipeline/plan.py) both enumerate runs from here."""

from __future__ import annotations

import dataclasses
import itertools
import re
from pathlib import Path

from ant_dist.config import ConfigError, RelearnConfig, ReproduceConfig, load_config
from ant_dist.methods import FUSION_ABLATION, IRL_ITEM_REPRS, IRL_ONLY_OPTIONS, method_options

REPO = Path(__file__).resolve().parents[2]  # ant_dist/pipeline/grid.py -> the repository
LIST_FIELDS = {f.name for f in dataclasses.fields(RelearnConfig) if f.type in (list, "list")}
# options of a re-learning run that do not change its results (how it logs, loads and checkpoints)
RELEARN_NOT_RESULTS = {"progress", "tracker", "wandb_project", "log_every", "resume", "num_workers", "features_on",
                       "features_device_max_gb", "checkpoint_every", "keep_checkpoints", "trace_batches",
                       "fail_at_step"}
# options a run may resolve itself, so that its metrics.json can differ from what the plan passed
# (a run from a pre-trained model takes that model's max_len: train/target.py)
RELEARN_RESOLVED_BY_RUN = {"max_len"}


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


def overrides(options: dict) -> list:
    return [f"{k}={format_value(v)}" for k, v in options.items()]


def under(p: str, base: Path = REPO) -> str:
    """A path of the reproduction config: absolute as given, else relative to `base` (a base config,
    `*_config`: the repository; a raw file: raw_dir)."""
    return str(Path(p) if Path(p).is_absolute() else base / p)


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


def grid_points(relearn: dict) -> list:
    """Every combination of the grid axes (the first axis varies slowest), as {option: value}."""
    axes = grid_axes(relearn)
    return [dict(zip([k for k, _ in axes], combo)) for combo in itertools.product(*[v for _, v in axes])]


def method_relearn_options(cfg: ReproduceConfig, method: str) -> list:
    """The relearn options a configured method adds: its method_options entry, else its table's."""
    return cfg.method_options[method] if method in cfg.method_options else method_options(method)


def fixed_options(cfg: ReproduceConfig) -> dict:
    """The relearn options that are not grid axes: every run takes them."""
    axes = dict(grid_axes(cfg.relearn))
    return {k: v for k, v in cfg.relearn.items() if k not in axes}


def run_options(cfg: ReproduceConfig, method: str, point: dict) -> list:
    """A run's `relearn` options after --config, in the order its command gives them (later wins):
    the fixed options, the grid point, the method's own options."""
    return [*overrides(fixed_options(cfg)), *overrides(point), *method_relearn_options(cfg, method)]


def run_config(cfg: ReproduceConfig, method: str, point: dict) -> RelearnConfig:
    """The config a run trains with (its base relearn_config file, then run_options); a malformed
    method_options entry is a ConfigError that names the method."""
    try:
        return load_config(RelearnConfig, under(cfg.relearn_config), [*run_options(cfg, method, point),
                                                                             "domain=_"])
    except ConfigError as exc:
        raise ConfigError(f"method {method!r} (method_options, or relearn): {exc}") from None


def method_points(cfg: ReproduceConfig, method: str) -> list:
    """The grid points of a method's runs: each point of the grid without the options its run
    ignores (methods.IRL_ONLY_OPTIONS where its item model has no fusion term: not ANT's, or
    ANT's with it ablated) or sets itself (its own options come last and win); repeats dropped.
    A point left without an option runs with its value from relearn_config."""
    own = {str(o).split("=", 1)[0].strip() for o in method_relearn_options(cfg, method)}
    points: list = []
    for point in grid_points(cfg.relearn):
        run = run_config(cfg, method, point)
        fusion = run.item_repr in IRL_ITEM_REPRS and FUSION_ABLATION not in {str(a).lstrip("-") for a in run.ablate}
        ignored = set() if fusion else set(IRL_ONLY_OPTIONS)
        kept = {k: v for k, v in point.items() if k not in own | ignored}
        if kept not in points:
            points.append(kept)
    return points


def point_tag(point: dict) -> str:
    """A folder name for a grid point: beta0.1, or beta0.1-lr0.001; 'default' without a grid."""
    parts = [f"{k}{format_value(v)}" for k, v in point.items()]
    return re.sub(r"[^A-Za-z0-9_.,=+-]", "_", "-".join(parts)) or "default"


def slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", label.strip())


def relearn_runs(cfg: ReproduceConfig) -> list:
    """One entry per re-learning run: target x method x grid point x seed, in that order (a method's
    points: method_points; grid_index counts them). "expect": the options its metrics.json must
    record, those the plan sets that bear on results, so that selection can refuse a stale folder."""
    runs = []
    per_method = {}
    for method in cfg.methods:
        entries = []
        for gi, point in enumerate(method_points(cfg, method)):
            run = dataclasses.asdict(run_config(cfg, method, point))
            keys = ({o.split("=", 1)[0].strip() for o in run_options(cfg, method, point)} - RELEARN_NOT_RESULTS
                    - RELEARN_RESOLVED_BY_RUN)
            entries.append((gi, point, {k: run[k] for k in sorted(keys) if k in run}))
        per_method[method] = entries
    for target, method in itertools.product(cfg.targets, cfg.methods):
        for (gi, point, expect), seed in itertools.product(per_method[method], cfg.seeds):
            name = f"relearn/{target}/{slug(method)}/seed{seed}/{point_tag(point)}"
            runs.append({"target": target, "method": method, "seed": seed, "grid_index": gi, "point": point,
                         "expect": expect, "run_name": name})
    return runs


def relearn_note(cfg: ReproduceConfig, n_runs: int) -> str:
    axes = grid_axes(cfg.relearn)
    grid = " x ".join(f"{k} {format_value(v)}" for k, v in axes) or "no grid"
    n_points = len(grid_points(cfg.relearn))
    per_target = n_runs // (len(cfg.targets) * len(cfg.seeds))
    repeats = len(cfg.methods) * n_points - per_target
    if not repeats:
        return (f"{len(cfg.targets)} target(s) x {len(cfg.methods)} method(s) x {n_points} grid point(s) ({grid}) x "
                f"{len(cfg.seeds)} seed(s) = {n_runs} runs")
    return (f"{len(cfg.targets)} target(s) x {per_target} method-point(s) ({len(cfg.methods)} method(s) x {n_points} "
            f"grid point(s) ({grid}) - {repeats} that would repeat a run: a grid option the method ignores or sets "
            f"itself) x {len(cfg.seeds)} seed(s) = {n_runs} runs")
