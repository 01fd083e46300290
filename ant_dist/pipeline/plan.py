"""The paper reproduction as data: its config (`ReproduceConfig`), the plan built from it (stages
of tasks with dependencies and resources), and the RecBole baselines' options. The
hyper-parameter grid is pipeline/grid.py, model selection and the report's inputs pipeline/selection.py.

`python -m ant_dist.reproduce` (ant_dist/reproduce.py) prints the plan, runs it on one machine,
or hands it to `slurm/reproduce_paper.sh`; both executors run the very commands built here.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ant_dist.config import SELECT_METRICS, BaselinesConfig, ConfigError, ReproduceConfig, load_config
from ant_dist.methods import METHODS, PRETRAINED_MODEL, RECBOLE_BASELINES
from ant_dist.pipeline.grid import (REPO, fixed_options, format_value, grid_axes, method_relearn_options,
                                    overrides, point_tag, relearn_note, relearn_runs, slug, under)
from ant_dist.runtime.atomic import atomic_path


STAGES = ("fetch", "pack", "embed", "embed_worddrop", "baselines", "pretrain", "pretrain_unisrec", "relearn", "select",
          "report")
RESOURCE_KEYS = ("nodes", "gpus", "processes", "cpus", "mem", "time", "partition", "est_hours", "est_disk_gb")
# Small defaults: a config for a real cluster sets its own (configs/paper/ant.yaml).
DEFAULT_RESOURCES = {s: {"nodes": 1, "gpus": 0, "processes": 1, "cpus": 1, "mem": "", "time": "", "partition": "",
                         "est_hours": 0.0, "est_disk_gb": 0.0} for s in STAGES}
# options each stage's command sets itself: a config may not set them through the stage's section
RESERVED = {"fetch_options": {"format", "meta", "images"},
            "pack": {"domain", "meta", "interactions", "images", "out", "format"},
            "embed": {"shards", "out", "domains"},
            "pretrain": {"shards", "features", "out", "run_name", "domains", "model"},
            "unisrec_pretrain": {"shards", "features", "out", "run_name", "domains", "model", "word_drop_features"},
            "relearn": {"shards", "features", "out", "run_name", "domain", "domains", "pretrained", "seed",
                        "select_metric", "mode", "item_repr"},
            "baselines": {"domain", "shards", "features", "out", "run_name", "seed", "select_metric", "model",
                          "models"}}
BASELINE_FIELDS = {f.name for f in dataclasses.fields(BaselinesConfig)}
# options of a baseline run that do not change its results (paths, where and how it logs)
BASELINE_NOT_RESULTS = {"shards", "features", "out", "run_name", "models", "device", "progress", "tracker",
                        "wandb_project", "eval_batch"}


@dataclass
class Task:
    label: str
    argv: list                       # the command; empty for the internal select/report actions
    done_files: list = field(default_factory=list)   # finished when all of these exist
    done_tables: list = field(default_factory=list)  # ... and these feature folders say complete
    info: dict = field(default_factory=dict)
    action: str = ""                 # "select" / "report": done in-process by ant_dist.reproduce
    before: str = ""                 # "rated_meta": an in-process step before the command


@dataclass
class Stage:
    name: str
    tasks: list
    after: list
    resources: dict
    launch: str = ""                 # "embed"/"pretrain": a distributed launch (slurm/<launch>.sh on Slurm)
    note: str = ""


def check_config(cfg: ReproduceConfig) -> None:
    """Everything a plan needs, checked before anything runs (ConfigError names the problem)."""
    if not cfg.targets:
        raise ConfigError("targets: give at least one target domain")
    if not cfg.aux_domains:
        raise ConfigError("aux_domains: give at least one auxiliary domain")
    for d in all_domains(cfg):
        f = cfg.files.get(d)
        if not isinstance(f, dict) or not f.get("meta") or not f.get("ratings"):
            raise ConfigError(f"files.{d}: give {{meta: <meta file>, ratings: <ratings CSV>}} for domain {d}")
    for m in cfg.methods:
        if m not in cfg.method_options and m not in METHODS:
            raise ConfigError(f"methods: unknown method {m!r}; choose from {list(METHODS)} or define it in "
                              f"method_options")
    if not cfg.methods or not cfg.seeds or not all(isinstance(s, int) for s in cfg.seeds):
        raise ConfigError(f"methods and seeds must be non-empty (seeds: integers), got {cfg.methods}, {cfg.seeds}")
    if cfg.select_metric not in SELECT_METRICS:  # a config built in code skips load_config's check
        raise ConfigError(f"select_metric must be one of {', '.join(SELECT_METRICS)}, got {cfg.select_metric!r}")
    if not 0 <= cfg.unisrec_word_drop < 1:
        raise ConfigError(f"unisrec_word_drop must be in [0, 1), got {cfg.unisrec_word_drop}")
    for section in ("fetch_options", "pack", "embed", "pretrain", "unisrec_pretrain", "relearn"):
        clash = sorted(set(getattr(cfg, section)) & RESERVED[section])
        if clash:
            raise ConfigError(f"{section}: {clash} are set by the pipeline itself (from domains, targets, methods, "
                              f"seeds, work_dir); remove them from this section")
    for stage, res in cfg.resources.items():
        if stage not in STAGES:
            raise ConfigError(f"resources: unknown stage {stage!r}; stages: {list(STAGES)}")
        bad = sorted(set(res or {}) - set(RESOURCE_KEYS))
        if bad:
            raise ConfigError(f"resources.{stage}: unknown key(s) {bad}; keys: {list(RESOURCE_KEYS)}")
    min_core = cfg.pack.get("min_core", 5)
    if not 0 <= cfg.fetch_min_ratings <= min_core:
        raise ConfigError(f"fetch_min_ratings must be between 0 and pack's min_core ({min_core}): an item with "
                          f"fewer ratings than min_core never reaches the shards, one with more may")
    grid_axes(cfg.relearn)  # raises on an empty axis
    check_baselines(cfg)


def all_domains(cfg: ReproduceConfig) -> list:
    return list(dict.fromkeys([*cfg.aux_domains, *cfg.targets]))


def resources(cfg: ReproduceConfig, stage: str) -> dict:
    res = dict(DEFAULT_RESOURCES[stage])
    res.update(cfg.resources.get(stage) or {})
    return res


def layout(cfg: ReproduceConfig) -> dict:
    work = Path(cfg.work_dir)
    report = Path(cfg.report_dir) if cfg.report_dir else work / "report"
    return {"work": work, "images": work / "images", "shards": work / "shards", "features": work / "features",
            "runs": work / "runs", "pretrained": work / "runs" / "pretrain" / "model", "report": report,
            "pretrained_unisrec": work / "runs" / "pretrain_unisrec" / "model",
            "features_worddrop": work / "features_worddrop",
            "selection": report / "selection.json", "timings": work / "timings.jsonl"}


# ----------------------------------------------------------------------------- the RecBole baselines
def _check_baseline_option(where: str, key, in_label: bool) -> None:
    if key in RESERVED["baselines"]:
        raise ConfigError(f"{where}: {key!r} is set by the pipeline itself (from targets, baselines, seeds, "
                          f"select_metric, work_dir); remove it")
    if key not in BASELINE_FIELDS and in_label:
        raise ConfigError(f"{where}: {key!r} is not an option of ant_dist.baselines (python -m ant_dist.baselines "
                          f"--help lists them)")
    if key not in BASELINE_FIELDS:
        raise ConfigError(f"{where}: {key!r} is neither an option of ant_dist.baselines nor a baseline label "
                          f"({', '.join(RECBOLE_BASELINES)})")


def _baseline_layer(where: str, options) -> tuple[dict, dict]:
    """One level of baseline options ({option: value, label: {option: value}}): (its options for
    every baseline, {label: that baseline's own})."""
    if options is None:
        return {}, {}
    if not isinstance(options, dict):
        raise ConfigError(f"{where}: a mapping of ant_dist.baselines options and baseline labels, got {options!r}")
    common, per_label = {}, {}
    for key, value in options.items():
        if key in RECBOLE_BASELINES:
            if not isinstance(value, dict):
                raise ConfigError(f"{where}.{key}: a mapping of ant_dist.baselines options, e.g. "
                                  f"{{hidden: 128, lr: 1e-3}}, got {value!r}")
            for k in value:
                _check_baseline_option(f"{where}.{key}", k, in_label=True)
            per_label[key] = dict(value)
        else:
            _check_baseline_option(where, key, in_label=False)
            common[key] = value
    return common, per_label


def baseline_options(cfg: ReproduceConfig, target: str, label: str) -> dict:
    """One baseline's options on one target, each layer over the one before: baseline_options, its
    label's entry there, baseline_target_options.<target>, and the label's entry there."""
    common, per_label = _baseline_layer("baseline_options", cfg.baseline_options)
    t_common, t_label = _baseline_layer(f"baseline_target_options.{target}",
                                        cfg.baseline_target_options.get(target))
    return {**common, **per_label.get(label, {}), **t_common, **t_label.get(label, {})}


def baseline_config(run: dict, select_metric: str) -> BaselinesConfig:
    """The run's options as `python -m ant_dist.baselines` parses them (a wrong type fails here)."""
    try:
        return load_config(BaselinesConfig, None, [f"model={run['label']}", f"domain={run['target']}",
                                                   f"seed={run['seed']}", f"select_metric={select_metric}",
                                                   *overrides(run["options"])])
    except ConfigError as exc:
        raise ConfigError(f"the options of baseline {run['label']} on {run['target']}: {exc}") from None


def check_baselines(cfg: ReproduceConfig) -> None:
    bad = [b for b in cfg.baselines if b not in RECBOLE_BASELINES]
    if bad:
        raise ConfigError(f"baselines: unknown baseline(s) {bad}; choose from {list(RECBOLE_BASELINES)} "
                          f"(an empty list runs none)")
    _baseline_layer("baseline_options", cfg.baseline_options)
    known = set(all_domains(cfg)) | set(cfg.files)  # a config narrowed by --targets keeps the others' options
    for target, options in cfg.baseline_target_options.items():
        if target not in known:
            raise ConfigError(f"baseline_target_options: {target!r} is not a target ({', '.join(cfg.targets)}) "
                              f"nor a domain of `files`")
        _baseline_layer(f"baseline_target_options.{target}", options)
    for run in baseline_runs(cfg, seeds=cfg.seeds[:1]):  # the options do not depend on the seed
        baseline_config(run, cfg.select_metric)


def baseline_runs(cfg: ReproduceConfig, seeds=None) -> list:
    """One entry per baseline run: target x baseline x seed, in that order (the seeds of the
    re-learning runs: the report pairs a baseline's users with ANT's per seed)."""
    runs = []
    for target, label in itertools.product(cfg.targets, dict.fromkeys(cfg.baselines)):
        options = baseline_options(cfg, target, label)
        for seed in cfg.seeds if seeds is None else seeds:
            runs.append({"target": target, "label": label, "seed": seed, "options": options,
                         "run_name": f"baselines/{target}/{slug(label)}/seed{seed}"})
    return runs


def baselines_note(cfg: ReproduceConfig) -> str:
    labels = list(dict.fromkeys(cfg.baselines))
    n = len(cfg.targets) * len(labels) * len(cfg.seeds)
    return (f"{len(cfg.targets)} target(s) x {len(labels)} baseline(s) ({', '.join(labels)}) x {len(cfg.seeds)} "
            f"seed(s) = {n} runs; they need the shards and the feature tables, not the pre-trained model")


def build_plan(cfg: ReproduceConfig) -> list:
    """The stages, in dependency order. Paths are as configured (relative to the working directory)."""
    check_config(cfg)
    paths = layout(cfg)
    py = sys.executable
    raw = Path(cfg.raw_dir)
    domains = all_domains(cfg)
    stages = []
    images = {}
    if cfg.fetch:
        tasks = []
        for d in domains:
            images[d] = str(paths["images"] / d)
            meta, info, before = under(cfg.files[d]["meta"], raw), {"domain": d}, ""
            if cfg.fetch_min_ratings:  # the meta lines of the items that may survive the k-core
                info.update(meta=meta, ratings=under(cfg.files[d]["ratings"], raw), min_ratings=cfg.fetch_min_ratings,
                            out=str(paths["work"] / "fetch_meta" / f"{d}.json.gz"))
                meta, before = info["out"], "rated_meta"
            argv = [py, str(REPO / "tools" / "fetch_images.py"), "format=amazon2018", f"meta={meta}",
                    f"images={images[d]}", *overrides(cfg.fetch_options)]
            tasks.append(Task(f"fetch {d}", argv, done_files=[f"{images[d]}/fetch_report.json"], info=info,
                              before=before))
        note = (f"first, each task keeps the meta lines of the items with >= {cfg.fetch_min_ratings} ratings in "
                f"{paths['work'] / 'fetch_meta'}/<domain>.json.gz" if cfg.fetch_min_ratings else "")
        stages.append(Stage("fetch", tasks, [], resources(cfg, "fetch"), note=note))
    else:
        images = {d: cfg.image_dirs[d] for d in domains if cfg.image_dirs.get(d)}
    tasks = []
    for d in domains:
        argv = [py, str(REPO / "tools" / "pack.py"), "--config", under(cfg.pack_config), f"domain={d}",
                "format=amazon2018", f"meta={under(cfg.files[d]['meta'], raw)}",
                f"interactions={under(cfg.files[d]['ratings'], raw)}", f"out={paths['shards']}",
                *([f"images={images[d]}"] if d in images else []), *overrides(cfg.pack)]
        tasks.append(Task(f"pack {d}", argv, done_files=[f"{paths['shards']}/{d}/catalog.parquet"], info={"domain": d}))
    stages.append(Stage("pack", tasks, ["fetch"] if cfg.fetch else [], resources(cfg, "pack")))
    argv = [py, "-m", "ant_dist.embed", "--config", under(cfg.embed_config), f"shards={paths['shards']}",
            f"out={paths['features']}", f"domains={format_value(domains)}", *overrides(cfg.embed)]
    stages.append(Stage("embed", [Task("embed", argv, done_tables=[str(paths["features"] / d) for d in domains])],
                        ["pack"], resources(cfg, "embed"), launch="embed"))
    if cfg.baselines:
        tasks = []
        for run in baseline_runs(cfg):
            argv = [py, "-m", "ant_dist.baselines", f"model={run['label']}", f"domain={run['target']}",
                    f"shards={paths['shards']}", f"features={paths['features']}", f"out={paths['runs']}",
                    f"run_name={run['run_name']}", f"seed={run['seed']}", f"select_metric={cfg.select_metric}",
                    *overrides(run["options"])]
            tasks.append(Task(f"baselines {run['target']} {run['label']} seed {run['seed']}", argv,
                              done_files=[f"{paths['runs']}/{run['run_name']}/metrics.json"],
                              info={**run, "run_dir": str(paths["runs"] / run["run_name"])}))
        stages.append(Stage("baselines", tasks, ["embed"], resources(cfg, "baselines"), note=baselines_note(cfg)))
    argv = [py, "-m", "ant_dist.pretrain", "--config", under(cfg.pretrain_config), f"shards={paths['shards']}",
            f"features={paths['features']}", f"out={paths['runs']}", "run_name=pretrain",
            f"domains={format_value(list(cfg.aux_domains))}", *overrides(cfg.pretrain)]
    stages.append(Stage("pretrain", [Task("pretrain", argv, done_files=[f"{paths['pretrained']}/model_config.json"])],
                        ["embed"], resources(cfg, "pretrain"), launch="pretrain"))
    unisrec = any(PRETRAINED_MODEL.get(_method_label(cfg, m)) == "unisrec" for m in cfg.methods)
    if unisrec:
        stages += _unisrec_stages(cfg, paths, argv)
    fixed = fixed_options(cfg)
    tasks = []
    runs = relearn_runs(cfg)
    for run in runs:
        method_opts = method_relearn_options(cfg, run["method"])
        if run["method"] not in METHODS:  # the report groups runs by this label
            method_opts = [f"method={run['method']}", *method_opts]
        pretrained = paths["pretrained_unisrec" if PRETRAINED_MODEL.get(_method_label(cfg, run["method"])) else
                           "pretrained"]
        argv = [py, "-m", "ant_dist.relearn", "--config", under(cfg.relearn_config), *overrides(fixed),
                *overrides(run["point"]), *method_opts, f"shards={paths['shards']}", f"features={paths['features']}",
                f"out={paths['runs']}", f"run_name={run['run_name']}", f"pretrained={pretrained}",
                f"domain={run['target']}", f"seed={run['seed']}", f"select_metric={cfg.select_metric}"]
        label = f"relearn {run['target']} {run['method']} seed {run['seed']} {point_tag(run['point'])}"
        tasks.append(Task(label, argv, done_files=[f"{paths['runs']}/{run['run_name']}/metrics.json"],
                          info={**run, "run_dir": str(paths["runs"] / run["run_name"])}))
    stages.append(Stage("relearn", tasks, ["pretrain"] + ["pretrain_unisrec"] * unisrec, resources(cfg, "relearn"),
                        note=relearn_note(cfg, len(runs))))
    stages.append(Stage("select", [Task("select", [], action="select")], ["relearn"], resources(cfg, "select"),
                        note=f"per target x method x seed, the grid point with the best validation "
                             f"{cfg.select_metric} (ties: the earlier point) -> {paths['selection']}"))
    n_baselines = len(baseline_runs(cfg))
    report_argv = [py, "-m", "ant_dist.report", "<the runs selected in selection.json>",
                   *([f"<the {n_baselines} baseline runs>"] if n_baselines else []), "--out", str(paths["report"]),
                   "--alpha", str(cfg.alpha), *(["--metrics", cfg.report_metrics] if cfg.report_metrics else [])]
    stages.append(Stage("report", [Task("report", report_argv, action="report")],
                        ["select", "baselines"] if n_baselines else ["select"], resources(cfg, "report"),
                        note=f"the runs selected in {paths['selection']}" + (
                            f" and the baseline runs ({paths['runs'] / 'baselines'}/<target>/<baseline>/seed<S>)"
                            if n_baselines else "")))
    return stages


def _method_label(cfg: ReproduceConfig, method: str) -> str:
    """The methods-table label a configured method runs as (a method_options entry: its own name)."""
    return method if method in METHODS else ""


def _unisrec_stages(cfg: ReproduceConfig, paths: dict, pretrain_argv: list) -> list:
    """UniSRec's pre-training over the auxiliary domains (after its word-drop embedding, when wanted),
    for the UniSRec methods (methods.PRETRAINED_MODEL): pretrain's command with model=unisrec."""
    stages, after = [], ["embed"]
    options = ["model=unisrec"]
    if cfg.unisrec_word_drop > 0:
        aux = list(cfg.aux_domains)
        argv = [pretrain_argv[0], "-m", "ant_dist.embed", "--config", under(cfg.embed_config),
                f"shards={paths['shards']}", f"out={paths['features_worddrop']}", f"domains={format_value(aux)}",
                *overrides(cfg.embed), f"text_word_drop={cfg.unisrec_word_drop}"]
        stages.append(Stage("embed_worddrop", [Task("embed_worddrop", argv, done_tables=[
            str(paths["features_worddrop"] / d) for d in aux])], ["pack"], resources(cfg, "embed_worddrop"),
            launch="embed", note="UniSRec's word-drop text table of the auxiliary domains"))
        after.append("embed_worddrop")
        options.append(f"word_drop_features={paths['features_worddrop']}")
    argv = ["run_name=pretrain_unisrec" if a == "run_name=pretrain" else a for a in pretrain_argv]
    argv += [*overrides(cfg.unisrec_pretrain), *options]
    stages.append(Stage("pretrain_unisrec", [Task("pretrain_unisrec", argv, done_files=[
        f"{paths['pretrained_unisrec']}/model_config.json"])], after, resources(cfg, "pretrain_unisrec"),
        launch="pretrain", note="UniSRec's pre-training (model=unisrec) for the UniSRec methods"))
    return stages


# ----------------------------------------------------------------------------- the fetch stage's first step
def write_rated_meta(meta: str, ratings: str, out: str, min_ratings: int) -> dict:
    """The lines of `meta` whose item has at least `min_ratings` rows in `ratings` (read by the
    packer's own readers, so item ids match), written to `out` (gzip, atomically)."""
    import gzip

    import pyarrow.compute as pc

    from ant_dist.data.bad_input import BadInputLog
    from ant_dist.data.raw_readers import iter_json_lines, meta_fields_2018, read_interactions

    log = BadInputLog()
    counts = pc.value_counts(read_interactions("amazon2018", ratings, log, progress=False).items)
    rated = set(counts.field("values").filter(pc.greater_equal(counts.field("counts"), min_ratings)).to_pylist())
    kept = total = 0
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp, gzip.open(tmp, "wt", encoding="utf-8") as fh:
        for _, obj in iter_json_lines(Path(meta), log):
            total += 1
            if meta_fields_2018(obj)[0] in rated:
                kept += 1
                fh.write(json.dumps(obj) + "\n")
    print(f"fetch: {kept} of {total} items of {meta} have >= {min_ratings} ratings -> {out}", flush=True)
    return {"kept": kept, "total": total}
