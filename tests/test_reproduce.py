"""The reproduction pipeline: the paper configs' plans (jobs, dependencies, array sizes computed
here from the YAML), the grid, selection on validation, the RecBole baselines' options and the
report's inputs, bad configs; then a tiny reproduction on the synthetic world (Amazon 2018 format,
image URLs served by a loopback HTTP server, tiny local encoders) through `python -m
ant_dist.reproduce` on this machine and through the real Slurm."""

import itertools
import json
import re
import shlex
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from test_slurm import _wait_job_done, cluster, slurm  # noqa: F401  (cluster: a fixture)

from ant_dist.config import ConfigError, ReproduceConfig
from ant_dist.methods import PRETRAINED_MODEL, RECBOLE_BASELINES
from ant_dist.pipeline.grid import grid_points, relearn_runs
from ant_dist.pipeline.plan import build_plan
from ant_dist.pipeline.selection import report_inputs, select_runs

ROOT = Path(__file__).resolve().parents[1]
PAPER_CONFIGS = sorted((ROOT / "configs" / "paper").glob("*.yaml"))
CHAIN = {"fetch": "-", "pack": "fetch", "embed": "pack", "baselines": "embed", "pretrain": "embed",
         "relearn": "pretrain", "select": "relearn", "report": "select,baselines"}
# the paper's Table A1: per target, (d, lr) of NPE, SASRec, BERT4Rec, FDSA, S3-Rec
TABLE_A1 = {"Scientific": [(300, 3e-3), (128, 1e-3), (128, 1e-2), (64, 3e-3), (300, 3e-3)],
            "Pantry": [(128, 3e-3), (300, 3e-4), (300, 3e-3), (64, 1e-3), (300, 1e-3)],
            "Instruments": [(128, 1e-3), (300, 3e-4), (300, 3e-4), (128, 3e-3), (300, 1e-3)],
            "Arts": [(128, 1e-3), (300, 3e-4), (300, 3e-4), (128, 3e-3), (300, 3e-3)],
            "Office": [(128, 1e-3), (300, 3e-4), (300, 3e-4), (128, 1e-3), (300, 3e-3)]}
METHOD_MODES = {"GB": ("scratch", "irl"), "FT": ("finetune", "irl"), "ReL": ("relearn", "irl"),
                "ANT_e": ("relearn", "irl+id"), "ID-SASRec": ("scratch", "id"), "SASRec++": ("scratch", "fused"),
                "NOVA": ("scratch", "nova"), "UniSRec-GB": ("scratch", "text"), "UniSRec": ("finetune", "text"),
                "UniSRec-ReL": ("relearn", "text"), "UniSRec_e": ("finetune", "text+id")}
# beta weighs the text-image fusion term of ANT's item model (model/irl.py): no other item model reads it,
# nor ANT's with that term ablated (MF)
BETA_READERS = ("irl", "irl+id")


def method_grid(spec: dict, method: str) -> dict:
    """The grid axes a method's runs vary: the config's, less beta where no fusion term reads it and
    less what the method's own options set (they are passed last and win)."""
    grid = {k: v for k, v in spec["relearn"].items() if isinstance(v, list) and k != "ablate"}
    options = spec.get("method_options", {}).get(method)
    own = dict(o.split("=", 1) for o in options) if options is not None else {}
    item_repr = own.get("item_repr", "irl") if options is not None else METHOD_MODES[method][1]
    fusion = item_repr in BETA_READERS and "MF" not in own.get("ablate", "")
    return {k: v for k, v in grid.items() if k not in own and (k != "beta" or fusion)}


ENV_KEYS = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false"}


def reproduce(*args, cwd=ROOT, timeout=600):
    import os
    env = {**os.environ, **ENV_KEYS}
    env.pop("ACCELERATE_USE_CPU", None)
    return subprocess.run([sys.executable, "-m", "ant_dist.reproduce", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def table_rows(out: str) -> dict:
    """The dry run's stage table: name -> (jobs, after)."""
    rows = {}
    for line in out.splitlines():
        m = re.match(r"^(\w+)\s+(\d+)\s+(\S+)\s+(array|1 job)", line)
        if m:
            rows[m.group(1)] = (int(m.group(2)), m.group(3))
    return rows


def command_options(line: str) -> dict:
    """key=value options of one printed command (the last one wins, as OmegaConf merges them)."""
    argv = shlex.split(line.split(": ", 1)[1])
    return dict(a.split("=", 1) for a in argv if "=" in a and not a.startswith("-"))


BASELINE_PIPELINE_OPTIONS = {"model", "domain", "shards", "features", "out", "run_name", "seed", "select_metric"}


def spec_baseline_options(spec: dict, target: str, label: str) -> dict:
    """What a config's baseline_options and baseline_target_options give one baseline on one target
    (written out here: the common options, then the label's, at each level)."""
    out = {}
    for layer in (spec.get("baseline_options") or {}, (spec.get("baseline_target_options") or {}).get(target) or {}):
        out.update({k: v for k, v in layer.items() if k not in RECBOLE_BASELINES})
        out.update(layer.get(label) or {})
    return out


def same_value(text: str, value) -> bool:
    """A printed option's text against the config's value."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(text) == float(value)
    return text == str(value)


def check_baseline_lines(out: str, spec: dict) -> set:
    """Every baseline task of a dry run: its command's pipeline options and the config's options
    for its (target, baseline); returns the (target, baseline, seed) seen."""
    seen = set()
    for line in (ln for ln in out.splitlines() if re.match(r"^\s+\d+ baselines ", ln)):
        assert " -m ant_dist.baselines " in line, line
        o = command_options(line)
        assert o["run_name"] == f"baselines/{o['domain']}/{o['model']}/seed{o['seed']}"
        assert o["shards"].endswith("/shards") and o["features"].endswith("/features") and o["out"].endswith("/runs")
        assert o["select_metric"] == spec["select_metric"]
        expected = spec_baseline_options(spec, o["domain"], o["model"])
        assert set(o) - BASELINE_PIPELINE_OPTIONS == set(expected), line
        assert all(same_value(o[k], v) for k, v in expected.items()), (line, expected)
        assert (o["domain"], o["model"], int(o["seed"])) not in seen
        seen.add((o["domain"], o["model"], int(o["seed"])))
    return seen


# ----------------------------------------------------------------------------- the paper configs
@pytest.mark.parametrize("path", PAPER_CONFIGS, ids=lambda p: p.name)
def test_dry_run_prints_every_job_its_dependencies_and_the_array_size(path):
    spec = yaml.safe_load(path.read_text())
    res = reproduce("--config", path, "--dry-run")
    assert res.returncode == 0, res.stderr
    domains = list(dict.fromkeys(spec["aux_domains"] + spec["targets"]))
    grids = {m: method_grid(spec, m) for m in spec["methods"]}
    n_relearn = len(spec["targets"]) * len(spec["seeds"]) * sum(
        len(list(itertools.product(*grid.values()))) for grid in grids.values())
    labels = spec.get("baselines", list(RECBOLE_BASELINES))  # the default: all five
    n_baselines = len(spec["targets"]) * len(labels) * len(spec["seeds"])
    expected = {"fetch": (len(domains), "-"), "pack": (len(domains), "fetch"), "embed": (1, "pack"),
                "baselines": (n_baselines, "embed"), "pretrain": (1, "embed"), "relearn": (n_relearn, "pretrain"),
                "select": (1, "relearn"), "report": (1, "select,baselines")}
    if not n_baselines:
        del expected["baselines"]
        expected["report"] = (1, "select")
    if any(PRETRAINED_MODEL.get(m) == "unisrec" for m in spec["methods"]):  # UniSRec's own pre-training
        expected.update(embed_worddrop=(1, "pack"), pretrain_unisrec=(1, "embed,embed_worddrop"),
                        relearn=(n_relearn, "pretrain,pretrain_unisrec"))
    assert table_rows(res.stdout) == expected
    # every (target, baseline, seed) once, with the config's options for that target and baseline
    assert check_baseline_lines(res.stdout, spec) == set(itertools.product(spec["targets"], labels, spec["seeds"]))
    if n_baselines:
        assert f"array 0-{n_baselines - 1} slurm/reproduce_task.sh" in res.stdout
        assert f"<the {n_baselines} baseline runs>" in res.stdout  # the report reads them too
    assert f"array 0-{n_relearn - 1} slurm/reproduce_task.sh" in res.stdout
    # every (target, method, grid point, seed) once, with the method's mode and the grid value
    lines = [ln for ln in res.stdout.splitlines() if re.match(r"^\s+\d+ relearn ", ln)]
    assert len(lines) == n_relearn
    seen = set()
    for line in lines:
        o = command_options(line)
        method = re.match(r"^\s+\d+ relearn \S+ (.+) seed \d+ \S+: ", line).group(1)
        options = spec.get("method_options", {}).get(method)
        if options is None:
            assert (o["mode"], o.get("item_repr", "irl")) == METHOD_MODES[method]
        else:
            assert all(command_options(f"x: {shlex.join(options)}")[k] == o[k] for k in command_options(
                f"x: {shlex.join(options)}"))
        model = "pretrain_unisrec" if PRETRAINED_MODEL.get(method) == "unisrec" else "pretrain"
        assert o["pretrained"].endswith(f"runs/{model}/model") and o["select_metric"] == spec["select_metric"]
        grid = grids[method]
        own = dict(x.split("=", 1) for x in options or [])
        for k in set(method_grid({"relearn": spec["relearn"], "methods": []}, "GB")) - set(grid):
            assert o.get(k) == own.get(k), f"{k}: an axis this method ignores or sets must not reach it: {line}"
        seen.add((o["domain"], method, tuple(float(o[k]) for k in grid), int(o["seed"])))
    combos = {(t, m, tuple(float(v) for v in p), s) for t in spec["targets"] for m in spec["methods"]
              for p in itertools.product(*grids[m].values()) for s in spec["seeds"]}
    assert seen == combos
    assert "GPU-hours" in res.stdout


def test_paper_config_holds_the_papers_domains_files_and_hyper_parameters():
    spec = yaml.safe_load((ROOT / "configs" / "paper" / "ant.yaml").read_text())
    assert spec["aux_domains"] == ["Food", "Movies", "Home", "Clothing"]
    assert spec["targets"] == ["Scientific", "Pantry", "Instruments", "Arts", "Office"]
    categories = {"Food": "Grocery_and_Gourmet_Food", "Movies": "Movies_and_TV", "Home": "Home_and_Kitchen",
                  "Clothing": "Clothing_Shoes_and_Jewelry", "Scientific": "Industrial_and_Scientific",
                  "Pantry": "Prime_Pantry", "Instruments": "Musical_Instruments", "Arts": "Arts_Crafts_and_Sewing",
                  "Office": "Office_Products"}
    assert spec["files"] == {d: {"meta": f"meta_{c}.json.gz", "ratings": f"{c}.csv"} for d, c in categories.items()}
    assert spec["embed"]["text_pooling"] == "cls" and "bert-base-uncased" in spec["embed"]["text_encoder"]
    assert "swin-base" in spec["embed"]["image_encoder"]
    p = spec["pretrain"]
    assert (p["hidden"], p["n_layers"], p["n_heads"], p["tau"], p["align_weight"], p["lr"], p["batch_size"]) == \
        (256, 2, 2, 0.07, 1e-3, 1e-3, 2048)
    assert spec["relearn"]["beta"] == [0.1, 0.3, 0.5, 0.7] and spec["select_metric"] == "recall@10"
    # Table II's RecBole baselines with Table A1's d and lr per target, batch 2,048, 50 items
    assert spec["baselines"] == list(RECBOLE_BASELINES) == ["NPE", "SASRec", "BERT4Rec", "FDSA", "S3-Rec"]
    assert spec["baseline_options"] == {"batch_size": 2048, "max_len": 50}
    assert spec["baseline_target_options"] == {
        target: {label: {"hidden": d, "lr": lr} for label, (d, lr) in zip(RECBOLE_BASELINES, row)}
        for target, row in TABLE_A1.items()}


def test_paper_config_plan_runs_each_baseline_with_table_a1_on_every_target_and_seed():
    from ant_dist.config import load_config

    cfg = load_config(ReproduceConfig, ROOT / "configs" / "paper" / "ant.yaml")
    stage = next(s for s in build_plan(cfg) if s.name == "baselines")
    assert stage.after == ["embed"] and len(stage.tasks) == 5 * 5 * 3
    got = {}
    for task in stage.tasks:
        o = dict(a.split("=", 1) for a in task.argv[3:])
        assert (o["batch_size"], o["max_len"], o["select_metric"]) == ("2048", "50", "recall@10")
        assert task.done_files == [f"paper/runs/baselines/{o['domain']}/{o['model']}/seed{o['seed']}/metrics.json"]
        got.setdefault(o["domain"], {}).setdefault(o["model"], set()).add((int(o["hidden"]), float(o["lr"]),
                                                                           int(o["seed"])))
    assert got == {t: {label: {(d, lr, s) for s in (0, 1, 2)} for label, (d, lr) in zip(RECBOLE_BASELINES, row)}
                   for t, row in TABLE_A1.items()}
    report = next(s for s in build_plan(cfg) if s.name == "report")
    assert report.after == ["select", "baselines"]


def test_targets_and_seeds_flags_shrink_the_array():
    res = reproduce("--config", ROOT / "configs/paper/ant.yaml", "--dry-run", "--targets", "Pantry,Office",
                    "--seeds", "4")
    assert res.returncode == 0, res.stderr
    rows = table_rows(res.stdout)
    # 2 targets x 1 seed x (4 beta points for ReL, FT, GB, ANT_e; one run for each of the 7 other methods)
    assert rows["relearn"] == (2 * 1 * (4 * 4 + 7), "pretrain,pretrain_unisrec")
    assert rows["baselines"] == (2 * 5 * 1, "embed")
    assert rows["fetch"][0] == 4 + 2  # the auxiliary domains and the two targets
    assert "seed=4" in res.stdout and "seed=0" not in res.stdout
    # the other targets' options stay in the config and are not used
    assert "domain=Scientific" not in res.stdout and "run_name=baselines/Pantry/NPE/seed4 seed=4" in res.stdout


def test_an_empty_baselines_list_leaves_the_stage_out():
    res = reproduce("--config", ROOT / "configs/paper/ant.yaml", "--dry-run", "baselines=[]")
    assert res.returncode == 0, res.stderr
    rows = table_rows(res.stdout)
    assert "baselines" not in rows and rows["report"] == (1, "select")
    assert " ant_dist.baselines " not in res.stdout and "baseline runs" not in res.stdout


@pytest.mark.parametrize("override, message", [
    ("methods=[ReL,Magic]", "unknown method 'Magic'"),
    ("relearn={domain: Office}", "set by the pipeline itself"),
    ("targets=[Nowhere]", "files.Nowhere"),
    ("select_metric=mrr@3", "select_metric"),
    ("resources={train: {gpus: 1}}", "unknown stage 'train'"),
    ("relearn={beta: []}", "empty grid"),
    ("baselines=[SASRec,Magic]", "baselines must be one of NPE, SASRec, BERT4Rec, FDSA, S3-Rec, got"),
    ("baseline_options={seed: 3}", "baseline_options: 'seed' is set by the pipeline itself"),
    ("baseline_options={NPE: {run_name: x}}", "baseline_options.NPE: 'run_name' is set by the pipeline itself"),
    ("baseline_target_options={Office: {domain: Arts}}", "baseline_target_options.Office: 'domain' is set by the "
                                                         "pipeline itself"),
    ("baseline_target_options={Office: {FDSA: {models: [NPE]}}}", "'models' is set by the pipeline itself"),
    ("baseline_options={SASrec: {hidden: 64}}", "'SASrec' is neither an option of ant_dist.baselines nor a "
                                                "baseline label"),
    ("baseline_options={SASRec: {hiden: 64}}", "baseline_options.SASRec: 'hiden' is not an option"),
    ("baseline_target_options={Ofice: {NPE: {lr: 0.1}}}", "baseline_target_options: 'Ofice' is not a target"),
    ("baseline_options={epochs: many}", "the options of baseline NPE on Scientific: epochs: Value 'many'"),
])
def test_bad_config_exits_2_naming_the_problem(override, message):
    res = reproduce("--config", ROOT / "configs/paper/ant.yaml", "--dry-run", override)
    assert res.returncode == 2 and message in res.stderr, res.stderr


# ----------------------------------------------------------------------------- the RecBole baselines
def _baselines_cfg(work, **kw) -> ReproduceConfig:
    base = dict(work_dir=str(work), aux_domains=["Food"], targets=["Office", "Arts"], methods=["GB", "ReL"],
                seeds=[0, 1], files={d: {"meta": "m", "ratings": "r"} for d in ("Food", "Office", "Arts", "Pantry")},
                baselines=["NPE", "SASRec"])
    return ReproduceConfig(**{**base, **kw})


def _baseline_tasks(cfg) -> dict:
    """(target, label, seed) -> the options of its command."""
    stage = next(s for s in build_plan(cfg) if s.name == "baselines")
    tasks = {}
    for task in stage.tasks:
        assert task.argv[1:3] == ["-m", "ant_dist.baselines"]
        o = dict(a.split("=", 1) for a in task.argv[3:])
        tasks[o["domain"], o["model"], int(o["seed"])] = o
    return tasks


def test_baseline_options_layer_common_then_label_then_target_then_target_label(tmp_path):
    cfg = _baselines_cfg(tmp_path, baseline_options={"epochs": 7, "hidden": 64, "lr": 1e-3,
                                                     "NPE": {"hidden": 128, "dropout": 0.3}},
                         baseline_target_options={"Arts": {"lr": 3e-3, "NPE": {"hidden": 300}},
                                                  "Pantry": {"SASRec": {"hidden": 16}}})  # not a target here
    tasks = _baseline_tasks(cfg)
    assert list(tasks) == [(t, m, s) for t in ("Office", "Arts") for m in ("NPE", "SASRec") for s in (0, 1)]
    pick = {k: {o: v[o] for o in ("hidden", "lr", "epochs", "dropout") if o in v} for k, v in tasks.items()}
    assert pick["Office", "NPE", 0] == {"hidden": "128", "lr": "0.001", "epochs": "7", "dropout": "0.3"}
    assert pick["Office", "SASRec", 1] == {"hidden": "64", "lr": "0.001", "epochs": "7"}
    assert pick["Arts", "NPE", 1] == {"hidden": "300", "lr": "0.003", "epochs": "7", "dropout": "0.3"}
    assert pick["Arts", "SASRec", 0] == {"hidden": "64", "lr": "0.003", "epochs": "7"}
    o = tasks["Arts", "SASRec", 1]
    assert (o["shards"], o["features"], o["out"]) == (f"{tmp_path}/shards", f"{tmp_path}/features", f"{tmp_path}/runs")
    assert (o["run_name"], o["seed"], o["select_metric"]) == ("baselines/Arts/SASRec/seed1", "1", "recall@10")
    stages = {s.name: s for s in build_plan(cfg)}
    assert [s for s in stages] == ["fetch", "pack", "embed", "baselines", "pretrain", "relearn", "select", "report"]
    assert stages["baselines"].after == ["embed"] and stages["report"].after == ["select", "baselines"]
    assert stages["baselines"].tasks[0].done_files == [f"{tmp_path}/runs/baselines/Office/NPE/seed0/metrics.json"]


@pytest.mark.parametrize("kw, message", [
    ({"baselines": ["SASRec", "GRU4Rec"]}, "baselines: unknown baseline(s) ['GRU4Rec']"),
    ({"baseline_options": {"out": "elsewhere"}}, "baseline_options: 'out' is set by the pipeline itself"),
    ({"baseline_options": {"SASRec": {"select_metric": "ndcg@10"}}}, "'select_metric' is set by the pipeline"),
    ({"baseline_target_options": {"Arts": {"NPE": {"seed": 3}}}}, "baseline_target_options.Arts.NPE: 'seed' is set"),
    ({"baseline_target_options": {"Arts": {"model": "NPE"}}}, "'model' is set by the pipeline itself"),
    ({"baseline_options": {"GRU4Rec": {"hidden": 64}}}, "'GRU4Rec' is neither an option of ant_dist.baselines"),
    ({"baseline_target_options": {"Arts": {"NPE": {"hidden": "wide"}}}}, "the options of baseline NPE on Arts: hidden"),
    ({"select_metric": "mrr@10"}, "select_metric must be one of recall@10,"),
])
def test_a_config_built_in_code_is_refused_the_same_way(tmp_path, kw, message):
    with pytest.raises(ConfigError) as err:
        build_plan(_baselines_cfg(tmp_path, **kw))
    assert message in str(err.value)


def _fake_baseline(work: Path, target, label, seed, **config):
    run = work / "runs" / "baselines" / target / label / f"seed{seed}"
    run.mkdir(parents=True)
    recorded = {"domain": target, "seed": seed, "select_metric": "recall@10", "hidden": 64, "lr": 1e-3, **config}
    (run / "metrics.json").write_text(json.dumps({"method": label, "seed": seed, "config": recorded,
                                                  "test": {target: {"mean": {"recall@10": 0.1}}}}))
    return str(run)


def test_report_inputs_are_the_selected_runs_and_every_baseline_run_as_planned(tmp_path):
    cfg = _baselines_cfg(tmp_path, targets=["Office"], seeds=[0, 1],
                         baseline_target_options={"Office": {"SASRec": {"hidden": 300, "lr": 3e-4}}})
    selection = {"groups": [{"selected": {"run_dir": "relearn/a"}}, {"selected": {"run_dir": "relearn/b"}}]}
    made = [_fake_baseline(tmp_path, "Office", "NPE", s) for s in (0, 1)]
    made.append(_fake_baseline(tmp_path, "Office", "SASRec", 0, hidden=300, lr=3e-4))
    with pytest.raises(ConfigError, match=r"1 baseline run\(s\) have no metrics.json yet, e.g. .*SASRec/seed1"):
        report_inputs(cfg, selection)
    made.append(_fake_baseline(tmp_path, "Office", "SASRec", 1, hidden=300, lr=3e-4))
    assert report_inputs(cfg, selection) == ["relearn/a", "relearn/b", *made]
    # a run left by other options (here: the common lr instead of SASRec's on Office) is refused
    cfg.baseline_target_options = {"Office": {"SASRec": {"hidden": 300}}}
    with pytest.raises(ConfigError, match=r"SASRec/seed0/metrics.json: was run with lr=0.0003, the plan says 0.001"):
        report_inputs(cfg, selection)
    cfg.baselines = []  # no baselines: the selected runs only
    assert report_inputs(cfg, selection) == ["relearn/a", "relearn/b"]


def test_grid_points_expand_list_options_in_order_and_keep_list_typed_options():
    points = grid_points({"beta": [0.1, 0.3], "lr": [1e-3, 3e-3], "dropout": 0.2, "ablate": ["T"]})
    assert points == [{"beta": 0.1, "lr": 1e-3}, {"beta": 0.1, "lr": 3e-3},
                      {"beta": 0.3, "lr": 1e-3}, {"beta": 0.3, "lr": 3e-3}]
    assert grid_points({"ablate": [["T"], ["I", "P"]]}) == [{"ablate": ["T"]}, {"ablate": ["I", "P"]}]
    assert grid_points({"beta": 0.3}) == [{}]


def _code_config(tmp_path, relearn, methods, method_options=None) -> ReproduceConfig:
    return ReproduceConfig(work_dir=str(tmp_path), aux_domains=["Food"], targets=["Office"], methods=methods,
                           seeds=[0], relearn=relearn, method_options=method_options or {},
                           files={d: {"meta": "m", "ratings": "r"} for d in ("Food", "Office")})


def test_a_method_runs_only_the_grid_points_its_run_does_not_ignore_or_set(tmp_path):
    # beta weighs ANT's text-image fusion: ablating MF (an axis here) leaves it unread; "ReL b" sets it itself
    cfg = _code_config(tmp_path, {"beta": [0.1, 0.7], "ablate": [["T"], ["MF"]]}, ["ReL", "ReL b"],
                       {"ReL b": ["mode=relearn", "beta=0.9"]})
    points = {m: [r["point"] for r in relearn_runs(cfg) if r["method"] == m] for m in cfg.methods}
    # the grid's order (beta slowest), a repeat dropped where it first repeats
    assert points == {"ReL": [{"beta": 0.1, "ablate": ["T"]}, {"ablate": ["MF"]}, {"beta": 0.7, "ablate": ["T"]}],
                      "ReL b": [{"ablate": ["T"]}, {"ablate": ["MF"]}]}
    relearn = next(s for s in build_plan(cfg) if s.name == "relearn")
    own = [t.argv for t in relearn.tasks if t.info["method"] == "ReL b"]
    assert all([a for a in argv if a.startswith("beta=")] == ["beta=0.9"] for argv in own)
    # one run each: no fusion term to weigh (ID-SASRec; ANT with MF ablated, written with a minus; a label
    # redefined as SASRec++), or beta fixed outside the grid with the fusion ablated for every run
    cfg = _code_config(tmp_path, {"beta": [0.1, 0.7]}, ["ID-SASRec", "ReL -MF", "GB"],
                       {"ReL -MF": ["mode=relearn", "ablate=[-MF]"], "GB": ["mode=scratch", "item_repr=fused"]})
    runs = relearn_runs(cfg)
    assert [(r["method"], r["point"], r["run_name"].rsplit("/", 1)[1]) for r in runs] == [
        ("ID-SASRec", {}, "default"), ("ReL -MF", {}, "default"), ("GB", {}, "default")]
    assert [r["point"] for r in relearn_runs(_code_config(tmp_path, {"beta": [0.1, 0.7], "ablate": ["MF"]},
                                                          ["ReL"]))] == [{}]
    # a malformed method_options entry is a config error naming the method (exit 2), not a traceback
    for options in (["mode=relearn", "ablate=[T"], ["oops"]):
        with pytest.raises(ConfigError, match="method 'X'"):
            relearn_runs(_code_config(tmp_path, {"beta": [0.1]}, ["X"], {"X": options}))


# ----------------------------------------------------------------------------- selection
def _fake_run(work: Path, target, method, seed, tag, beta, valid, test=0.5):
    run = work / "runs" / "relearn" / target / method / f"seed{seed}" / tag
    run.mkdir(parents=True)
    (run / "metrics.json").write_text(json.dumps({
        "config": {"beta": beta, "seed": seed}, "valid": {target: {"mean": {"recall@10": valid, "ndcg@10": 1 - valid}}},
        "test": {target: {"mean": {"recall@10": test}}}}))
    return str(run)


def test_selection_takes_the_best_validation_point_per_target_method_seed_and_the_earlier_on_a_tie(tmp_path):
    cfg = ReproduceConfig(work_dir=str(tmp_path), aux_domains=["Food"], targets=["Office"], methods=["GB", "ReL"],
                          seeds=[0, 1], relearn={"beta": [0.1, 0.3, 0.5]},
                          files={d: {"meta": "m", "ratings": "r"} for d in ("Food", "Office")})
    valid = {("GB", 0): [0.2, 0.5, 0.4], ("GB", 1): [0.3, 0.3, 0.1],    # seed 1: a tie -> beta 0.1
             ("ReL", 0): [0.1, 0.2, 0.6], ("ReL", 1): [0.7, 0.2, 0.7]}  # test values never matter
    dirs = {}
    for (method, seed), values in valid.items():
        for beta, v in zip((0.1, 0.3, 0.5), values):
            dirs[method, seed, beta] = _fake_run(tmp_path, "Office", method, seed, f"beta{beta}", beta, v, test=1 - v)
    sel = select_runs(cfg)
    chosen = {(g["method"], g["seed"]): g["selected"]["run_dir"] for g in sel["groups"]}
    assert chosen == {("GB", 0): dirs["GB", 0, 0.3], ("GB", 1): dirs["GB", 1, 0.1],
                      ("ReL", 0): dirs["ReL", 0, 0.5], ("ReL", 1): dirs["ReL", 1, 0.1]}
    assert sel["grid"] == {"beta": [0.1, 0.3, 0.5]} and sel["select_metric"] == "recall@10"
    cfg.select_metric = "ndcg@10"  # 1 - recall here: the lowest recall wins
    chosen = {(g["method"], g["seed"]): g["selected"]["run_dir"] for g in select_runs(cfg)["groups"]}
    assert chosen[("GB", 0)] == dirs["GB", 0, 0.1] and chosen[("ReL", 1)] == dirs["ReL", 1, 0.3]


def test_selection_refuses_missing_runs_and_runs_of_another_grid_point(tmp_path):
    cfg = ReproduceConfig(work_dir=str(tmp_path), aux_domains=["Food"], targets=["Office"], methods=["GB"],
                          seeds=[0], relearn={"beta": [0.1, 0.3]},
                          files={d: {"meta": "m", "ratings": "r"} for d in ("Food", "Office")})
    _fake_run(tmp_path, "Office", "GB", 0, "beta0.1", 0.1, 0.2)
    with pytest.raises(ConfigError, match="no metrics.json"):
        select_runs(cfg)
    _fake_run(tmp_path, "Office", "GB", 0, "beta0.3", 0.7, 0.2)  # a stale folder: run with beta 0.7
    with pytest.raises(ConfigError, match="beta=0.7"):
        select_runs(cfg)


def test_selection_checks_a_run_without_grid_options_against_the_options_the_plan_sets(tmp_path):
    cfg = _code_config(tmp_path, {"beta": [0.1, 0.3], "lr": 0.002}, ["ID-SASRec"])
    run = tmp_path / "runs" / "relearn" / "Office" / "ID-SASRec" / "seed0" / "default"
    run.mkdir(parents=True)

    def write(lr):
        (run / "metrics.json").write_text(json.dumps({
            "config": {"lr": lr, "mode": "scratch", "item_repr": "id", "beta": 0.3, "seed": 0, "tracker": "none"},
            "valid": {"Office": {"mean": {"recall@10": 0.2}}}}))

    write(0.002)
    groups = select_runs(cfg)["groups"]
    assert [(g["method"], g["selected"]["run_dir"], g["selected"]["point"]) for g in groups] == \
        [("ID-SASRec", str(run), {})]
    write(0.001)  # left by a config with another learning rate: never selected
    with pytest.raises(ConfigError, match=r"lr=0.001, the plan says 0.002"):
        select_runs(cfg)


def test_rated_meta_keeps_the_items_with_enough_ratings_and_their_lines(tmp_path):
    import gzip

    from ant_dist.pipeline.plan import write_rated_meta

    items = [{"asin": a, "title": f"item {a}", "imageURLHighRes": [f"https://images.example/{a}.jpg"]}
             for a in ("A", "B", "C", "D")]
    with gzip.open(tmp_path / "meta.json.gz", "wt") as fh:
        fh.writelines(json.dumps(i) + "\n" for i in items)
    rows = {"A": 5, "B": 4, "C": 6, "D": 0}  # D: no rating at all; E: ratings without metadata
    lines = [f"{a},U{k},5.0,{1000 + k}" for a, n in [*rows.items(), ("E", 9)] for k in range(n)]
    (tmp_path / "ratings.csv").write_text("\n".join(lines) + "\n")
    out = tmp_path / "rated" / "meta.json.gz"
    assert write_rated_meta(str(tmp_path / "meta.json.gz"), str(tmp_path / "ratings.csv"), str(out), 5) == \
        {"kept": 2, "total": 4}
    with gzip.open(out, "rt") as fh:
        assert [json.loads(ln) for ln in fh] == [items[0], items[2]]


def test_commands_stop_at_the_first_failure_and_share_out_the_gpus(tmp_path):
    from ant_dist.pipeline.runner import run_commands

    ended = []
    probe = "import os, sys; open(sys.argv[1], 'w').write(os.environ.get('CUDA_VISIBLE_DEVICES', '')); sys.exit({})"
    cmds = [(f"c{k}", [sys.executable, "-c", probe.format(code), str(tmp_path / f"c{k}")], {},
             lambda rc, _t, k=k: ended.append((k, rc))) for k, code in enumerate([0, 0, 3, 0])]
    assert run_commands(cmds[:2], parallel=2, gpus=["5", "7"]) == 0
    assert sorted((tmp_path / f"c{k}").read_text() for k in (0, 1)) == ["5", "7"]  # one GPU each
    ended.clear()
    assert run_commands(cmds[1:], parallel=1) == 3
    assert ended == [(1, 0), (2, 3)] and not (tmp_path / "c3").exists()  # nothing starts after a failure


def test_a_command_dies_with_the_runner(tmp_path):
    import os
    import signal
    import time

    import psutil

    pid_file = tmp_path / "child.pid"
    child = f"import os; open({str(pid_file)!r}, 'w').write(str(os.getpid())); os.read(0, 1)"  # blocks on stdin
    runner = ("import sys; from ant_dist.pipeline.runner import run_commands; "
              f"run_commands([('c', [sys.executable, '-c', {child!r}], None, lambda *a: None)], parallel=1)")
    proc = subprocess.Popen([sys.executable, "-c", runner], stdin=subprocess.PIPE)
    try:
        deadline = time.time() + 60
        while not pid_file.exists() or not pid_file.read_text():
            assert proc.poll() is None and time.time() < deadline, "the command did not start"
            time.sleep(0.05)
        grandchild = psutil.Process(int(pid_file.read_text()))
        os.kill(proc.pid, signal.SIGKILL)
        grandchild.wait(timeout=30)  # raises TimeoutExpired if it outlived the runner
    finally:
        proc.kill()
        proc.wait()
        if pid_file.exists() and pid_file.read_text() and psutil.pid_exists(int(pid_file.read_text())):
            psutil.Process(int(pid_file.read_text())).kill()  # only on failure: leave nothing behind


def test_emit_slurm_writes_the_stage_table_and_the_distributed_stages_arguments(tmp_path):
    res = reproduce("--config", ROOT / "configs/paper/ant.yaml", f"work_dir={tmp_path / 'w'}", "--seeds", "0",
                    "--emit-slurm", tmp_path / "plan")
    assert res.returncode == 0, res.stderr
    assert Path(res.stdout.strip()) == (tmp_path / "plan").resolve()
    rows = [ln.split("\t") for ln in (tmp_path / "plan" / "stages.tsv").read_text().splitlines()]
    assert [(r[0], r[1], int(r[2]), r[3], r[4]) for r in rows] == [
        ("fetch", "task", 9, "-", "0"), ("pack", "task", 9, "fetch", "0"), ("embed", "embed", 1, "pack", "0"),
        ("baselines", "task", 5 * 5, "embed", "0"), ("pretrain", "pretrain", 1, "embed", "0"),
        ("embed_worddrop", "embed", 1, "pack", "0"), ("pretrain_unisrec", "pretrain", 1, "embed,embed_worddrop", "0"),
        ("relearn", "task", 5 * (4 * 4 + 7), "pretrain,pretrain_unisrec", "0"), ("select", "task", 1, "relearn", "0"),
        ("report", "task", 1, "select,baselines", "0")]
    assert rows[3][5:] == ["1", "1", "1", "8", "32G", "04:00:00", "-"]  # resources.baselines: one GPU per run
    pretrain_args = (tmp_path / "plan" / "pretrain.args").read_text().splitlines()
    assert "domains=[Food,Movies,Home,Clothing]" in pretrain_args and "loss=exact" in pretrain_args
    assert (tmp_path / "plan" / "pretrain.config").read_text().strip().endswith("configs/pretrain.yaml")
    unisrec_args = (tmp_path / "plan" / "pretrain_unisrec.args").read_text().splitlines()
    assert unisrec_args[-2:] == ["model=unisrec", f"word_drop_features={tmp_path / 'w' / 'features_worddrop'}"]
    assert "run_name=pretrain_unisrec" in unisrec_args and "domains=[Food,Movies,Home,Clothing]" in unisrec_args
    worddrop_args = (tmp_path / "plan" / "embed_worddrop.args").read_text().splitlines()
    assert worddrop_args[-1] == "text_word_drop=0.15" and f"out={tmp_path / 'w' / 'features_worddrop'}" in worddrop_args
    config = yaml.safe_load((tmp_path / "plan" / "config.yaml").read_text())
    assert config["seeds"] == [0] and config["work_dir"] == str(tmp_path / "w")


def test_ablations_config_differs_from_the_main_one_only_in_its_methods_and_report():
    main = yaml.safe_load((ROOT / "configs" / "paper" / "ant.yaml").read_text())
    ablations = yaml.safe_load((ROOT / "configs" / "paper" / "ablations.yaml").read_text())
    own = {"methods", "method_options", "report_dir", "baselines", "baseline_options", "baseline_target_options"}

    def shared(spec):  # the baselines (Table II) are the main config's: their options and resources too
        return {k: {s: r for s, r in v.items() if s != "baselines"} if k == "resources" else v
                for k, v in spec.items() if k not in own}

    assert shared(ablations) == shared(main)
    assert ablations["methods"][0] == "ReL" and ablations["work_dir"] == main["work_dir"]
    # no baselines: the main config's runs of them, in the same work_dir, stay its own
    assert ablations["baselines"] == [] and main["baselines"]


# ----------------------------------------------------------------------------- a tiny reproduction
class ImageServer:
    """The synthetic world's images over HTTP on 127.0.0.1: GET /<item>.<ext> -> the file."""

    def __init__(self, image_dirs):
        files = {p.name: p for d in image_dirs for p in Path(d).iterdir()}
        self.requests = 0

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(handler):
                self.requests += 1
                path = files.get(handler.path.lstrip("/"))
                if path is None:
                    handler.send_error(404)
                    return
                body = path.read_bytes()
                handler.send_response(200)
                handler.send_header("Content-Length", str(len(body)))
                handler.end_headers()
                handler.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.prefix = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, request):
    """Two auxiliary domains and one target in the Amazon 2018 format, tiny local encoders, an image
    server, and a writer of reproduction configs over them."""
    from ant_dist.config import SynthConfig
    from ant_dist.data.synth import synthesize
    from ant_dist.features.encoders import save_random_bert, save_random_swin

    root = tmp_path_factory.mktemp("tiny")
    save_random_bert(root / "bert")
    save_random_swin(root / "swin", image_size=32, embed_dim=16)
    manifest = synthesize(SynthConfig(out=str(root / "raw"), aux_domains=["Food", "Home"], target_domains=["Office"],
                                      items_per_domain=200, users_per_domain=300, target_items_per_domain=100,
                                      target_users_per_domain=120, image_size=32, workers=1, progress=False))
    domains = manifest["aux"] + manifest["target"]
    server = ImageServer([d["images"] for d in domains])
    request.addfinalizer(server.close)

    def write_config(work: Path) -> Path:
        spec = {
            "work_dir": str(work), "raw_dir": str(root / "raw"), "aux_domains": ["Food", "Home"], "targets": ["Office"],
            "files": {d["name"]: {"meta": d["meta"], "ratings": d["interactions"]} for d in domains},
            "fetch_options": {"parallel": 4, "rate_per_host": 0, "url_prefix_from": "https://images.example/",
                              "url_prefix_to": server.prefix, "progress": False},
            "pack": {"shard_max_items": 100, "workers": 1, "progress": False},
            "embed": {"text_encoder": str(root / "bert"), "image_encoder": str(root / "swin"), "text_pooling": "mean",
                      "batch_size": 64, "num_workers": 0, "progress": False},
            "pretrain": {"hidden": 32, "n_experts": 2, "batch_size": 64, "loss": "sampled", "n_negatives": 64,
                         "max_steps": 8, "eval_users": 50, "checkpoint_every": 0, "num_workers": 0,
                         "tracker": "none", "progress": False},
            "relearn": {"beta": [0.1, 0.7], "batch_size": 64, "max_epochs": 2, "min_epochs": 1, "patience_steps": 0,
                        "tracker": "none", "progress": False},
            "methods": ["GB", "FT", "ReL"], "seeds": [0], "alpha": 0.1,
            # one RecBole baseline, tiny: its run joins Table II of the report beside ANT (ReL)
            "baselines": ["SASRec"],
            "baseline_options": {"epochs": 1, "max_len": 10, "batch_size": 64, "s3rec_pretrain_epochs": 1,
                                 "tracker": "none", "progress": False, "device": "cpu", "SASRec": {"hidden": 32}},
            "baseline_target_options": {"Office": {"SASRec": {"hidden": 16, "lr": 0.003}}},
        }
        path = work.parent / f"{work.name}.yaml"
        path.write_text(yaml.safe_dump(spec))
        return path

    return {"root": root, "server": server, "domains": [d["name"] for d in domains], "write_config": write_config}


def check_reproduction(work: Path) -> dict:
    """The report holds the GB / FT / ReL table of the target, built from exactly the runs that won on
    validation (checked here against every metrics.json) and the baseline's run, and nothing else;
    Table II shows the baseline beside ANT (ReL)."""
    selection = json.loads((work / "report" / "selection.json").read_text())
    metric = selection["select_metric"]
    winners = {}
    for method in ("GB", "FT", "ReL"):
        runs = sorted((work / "runs" / "relearn" / "Office" / method / "seed0").glob("beta*/metrics.json"))
        assert [r.parent.name for r in runs] == ["beta0.1", "beta0.7"]
        values = [json.loads(r.read_text())["valid"]["Office"]["mean"][metric] for r in runs]
        winners[method] = str(runs[1 if values[1] > values[0] else 0].parent)
    assert {g["method"]: g["selected"]["run_dir"] for g in selection["groups"]} == winners
    baseline = work / "runs" / "baselines" / "Office" / "SASRec" / "seed0"
    recorded = json.loads((baseline / "metrics.json").read_text())
    assert recorded["method"] == "SASRec" and recorded["seed"] == 0
    assert {k: recorded["config"][k] for k in ("hidden", "lr", "epochs", "max_len", "batch_size")} == \
        {"hidden": 16, "lr": 0.003, "epochs": 1, "max_len": 10, "batch_size": 64}  # Office's SASRec options won
    report = json.loads((work / "report" / "report.json").read_text())
    assert sorted(str(Path(r["path"]).parent) for r in report["runs"]) == sorted([*winners.values(), str(baseline)])
    table = next(t for t in report["tables"] if t["domain"] == "Office")
    assert sorted(r["method"] for r in table["rows"]) == ["FT", "GB", "ReL", "SASRec"]
    table2 = report["table2"]
    assert table2["methods"] == ["SASRec", "ReL"] and table2["domains"] == ["Office"]
    row = next(r for r in table2["rows"] if r["method"] == "SASRec")
    assert row["domains"]["Office"]["mean"]["recall@10"] == \
        pytest.approx(recorded["test"]["Office"]["mean"]["recall@10"])
    text = (work / "report" / "report.md").read_text()
    for method in ("GB", "FT", "ReL", "SASRec"):
        assert re.search(rf"^\| {method} \|", text, re.M), text[:2000]
    assert any(nt["domain"] == "Office" for nt in report["negative_transfer"])
    return selection


@pytest.mark.slow
def test_tiny_reproduction_on_one_machine_runs_the_chain_and_reruns_nothing(tiny, tmp_path):
    config = tiny["write_config"](tmp_path / "local")
    res = reproduce("--config", config, "--parallel", "2", timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    work = tmp_path / "local"
    for d in tiny["domains"]:  # every packed item whose raw image exists got it over HTTP
        fetched = json.loads((work / "images" / d / "fetch_report.json").read_text())
        catalog = pq.read_table(work / "shards" / d / "catalog.parquet").to_pydict()
        served = {p.stem for p in (tiny["root"] / "raw" / d / "images").iterdir()}
        assert [i in served for i in catalog["item_id"]] == catalog["has_image"]
        assert 0 < fetched["counts"]["ok"] < len(served)  # only items with >= 5 ratings were fetched
    check_reproduction(work)
    timings = [json.loads(ln) for ln in (work / "timings.jsonl").read_text().splitlines()]
    assert {t["stage"] for t in timings} == set(CHAIN) and all(t["exit"] == 0 for t in timings)
    # a rerun of the expensive stages finds every output and runs nothing
    again = reproduce("--config", config, "--stages", "fetch,pack,embed,baselines,pretrain,relearn")
    assert again.returncode == 0, again.stderr
    assert "$ " not in again.stdout and again.stdout.count("done already") == 3 + 3 + 1 + 1 + 1 + 6


def _stage_times(jobs: dict) -> dict:
    """Per stage: seconds from its first task's start to its last task's end, and the wait before it
    (from the end of the last stage it depends on), from Slurm's own records (scontrol: whole seconds)."""
    from datetime import datetime

    spans = {}
    for stage, job in jobs.items():
        out = subprocess.run(["scontrol", "-o", "show", "job", job], capture_output=True, text=True).stdout
        records = [dict(kv.split("=", 1) for kv in line.split() if "=" in kv) for line in out.splitlines()]
        starts = [datetime.fromisoformat(r["StartTime"]) for r in records if r.get("StartTime", "-")[0].isdigit()]
        ends = [datetime.fromisoformat(r["EndTime"]) for r in records if r.get("EndTime", "-")[0].isdigit()]
        if starts and ends:
            spans[stage] = (min(starts), max(ends), len(records))
    figures = {}
    for stage, (start, end, n) in spans.items():
        ends = [spans[u][1] for u in CHAIN.get(stage, "-").split(",") if u in spans]
        figures[stage] = {"jobs": n, "wall_s": (end - start).total_seconds(),
                          "waited_s": (start - max(ends)).total_seconds() if ends else None}
    return figures


@slurm
@pytest.mark.slow
@pytest.mark.usefixtures("cluster")
def test_tiny_reproduction_through_slurm_submits_the_chain_and_reports_the_selected_runs(tiny, tmp_path):
    import os
    import time

    config = tiny["write_config"](tmp_path / "slurm")
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}, **ENV_KEYS,
           "ANT_CPU": "1", "ANT_PYTHON": sys.executable}
    env.pop("ACCELERATE_USE_CPU", None)
    t0 = time.time()
    res = subprocess.run(["bash", "slurm/reproduce_paper.sh", "--config", str(config)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    submitted = list((tmp_path / "slurm" / "slurm").glob("*/jobs.tsv"))
    jobs = dict(line.split("\t") for line in submitted[0].read_text().splitlines()) if submitted else {}
    try:
        assert res.returncode == 0, res.stdout + res.stderr
        assert list(jobs) == list(CHAIN)
        plan = submitted[0].parent
        state = _wait_job_done(jobs["report"], timeout=900)
        logs = "".join(p.read_text()[-1500:] for p in sorted((plan / "logs").glob("*.log")))
        assert state["JobState"] == "COMPLETED", f"{state}\n{logs}"
        total = time.time() - t0
        for stage, job in jobs.items():  # an array's state is its tasks' (each listed)
            states = subprocess.run(["scontrol", "-o", "show", "job", job], capture_output=True, text=True).stdout
            assert "JobState=COMPLETED" in states and "JobState=FAILED" not in states, stage
        # as submitted: each stage after the previous one (afterok), the re-learning runs as one array
        after = {stage: set(ids.split()) for stage, ids in
                 re.findall(r"^(\w+): job \d+ \(\d+ task\(s\)(?:, after ([\d ]+))?\)", res.stdout, re.M)}
        assert after == {stage: {jobs[u] for u in ups.split(",") if u in jobs} for stage, ups in CHAIN.items()}, \
            res.stdout
        relearn = subprocess.run(["scontrol", "-o", "show", "job", jobs["relearn"]], capture_output=True, text=True)
        assert relearn.stdout.count("ArrayTaskId=") == 6, relearn.stdout
        check_reproduction(tmp_path / "slurm")
        figures = _stage_times(jobs)
        print(json.dumps({"slurm_stage_times": figures, "submit_to_report_s": round(total, 1)}))
    finally:
        for job in jobs.values():
            subprocess.run(["scancel", job], capture_output=True)
