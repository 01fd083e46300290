"""Does pre-training help, and does re-learning avoid negative transfer? (an experiment, not a test)

    .venv/bin/python bench/transfer.py [--work bench/.work/transfer] [--pretrain-seeds 0,1,2]
                                       [--run-seeds 0,1,2] [--fractions 0.1,0.25,1] [--parallel 2]
                                       [--pretrain-steps 1000]
                                       [--worlds shift0,shift1,merge1] [--methods GB,FT,ReL,...]

One synthetic world (the demo's: 4 auxiliary domains of 2,000 items and 3,000 users), with two
target domains of 1,000 users drawn three times from the same seed: at target_render_shift 0
(targets render the shared styles like the auxiliary domains), at shift 1 (every style looks
like another one in the targets: an aux-trained item model misleads) and at
target_render_merge 1 (styles merged in pairs that look alike in the targets only: an
aux-trained item model is confidently wrong; docs/synthetic.md). The auxiliary domains are
identical in all three, so one pre-training per seed (ANT's, and UniSRec's `model=unisrec`)
serves every world.

For each target, each fraction of its users trained on (all users are validated and tested),
and each method: GB, FT, ReL, ANT_e, ID-SASRec, UniSRec-GB, UniSRec, UniSRec-ReL (3 seeds; the
transfer methods over 3 pre-training seeds) and zero-shot. `--run-seeds` decouples the two: the
i-th run seed then starts its transfer runs from the (i mod P)-th of the P pre-training seeds, so
one pre-training can serve several target seeds when pre-training is the cost that does not fit.
Every run is `python -m ant_dist.relearn` with the demo's target settings (patience 200 steps); finished runs are
skipped on a rerun. The report (`ant_dist.report`) gives the tables, Table III and the paired
t-tests; this script adds the issue's checks and a plot:
- shift 0, 10 % of users: the better of FT and ReL beats GB with p < 0.05 on both targets;
- shift 1: ReL >= GB at every fraction; and whether ReL > FT (the paper's claim);
- merge 1, 25 % of users: FT < GB with p < 0.05 (negative transfer) and ReL >= GB, and what
  UniSRec's FT and ReL do there.
Results: bench/results/transfer.json, docs/img/transfer.png, the report under <work>/report/.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ant_dist.config import SynthConfig  # noqa: E402
from ant_dist.methods import PRETRAINED_MODEL  # noqa: E402
from ant_dist.pipeline.demo import DEMO_PRETRAIN, relearn_command  # noqa: E402
from ant_dist.pipeline.launcher import launch_command  # noqa: E402

TARGETS = ("Scientific", "Office")
SHIFTED = {t: f"{t}_s1" for t in TARGETS}  # the shift-1 copies of the targets
MERGED = {t: f"{t}_m1" for t in TARGETS}   # the merge-1 copies
WORLDS = {"shift0": {t: t for t in TARGETS}, "shift1": SHIFTED, "merge1": MERGED}
SYNTH = {"shift0": {}, "shift1": {"target_render_shift": 1.0}, "merge1": {"target_render_merge": 1.0}}
TRANSFER = ("FT", "ReL", "ANT_e", "UniSRec", "UniSRec-ReL")
FROM_SCRATCH = ("GB", "ID-SASRec", "UniSRec-GB")
METHODS = (*FROM_SCRATCH, *TRANSFER)
# validate every 5 steps, whatever the fraction: per epoch, a 10 % run (one step per epoch) would
# spend most of its time validating 600 users
RUN_OPTIONS = ["eval_every=5", "tracker=none", "progress=false"]


def world_of(target: str) -> str:
    return next(w for w, names in WORLDS.items() if target in names.values())


def build_data(work: Path, target_users: int) -> None:
    from ant_dist.config import EmbedConfig
    from ant_dist.data.synth import synthesize
    from ant_dist.features.embedding import run as run_embed
    from ant_dist.features.encoders import minilm_path, save_random_swin
    from ant_dist.pipeline.world import embed_world, pack_manifest

    if (work / "features" / ".done").is_file():
        return
    common = dict(seed=0, target_users_per_domain=target_users, progress=False, workers=2)
    worlds = {w: synthesize(SynthConfig(out=str(work / f"raw_{w}"), target_domains=list(WORLDS[w].values()),
                                        **SYNTH[w], **common)) for w in WORLDS}
    first = worlds["shift0"]
    for w in worlds.values():  # one pre-training serves every world
        for a, b in zip(first["aux"], w["aux"]):
            assert Path(a["interactions"]).read_bytes() == Path(b["interactions"]).read_bytes(), a["name"]
    options = {"workers": 2, "shard_max_items": 500, "progress": False}
    pack_manifest(first, work / "shards", **options)
    for w in ("shift1", "merge1"):
        pack_manifest(worlds[w], work / "shards", roles=("target",), **options)
    swin = work / "encoders" / "random-swin"
    save_random_swin(swin)
    embed_world(work, minilm_path(), swin, overwrite=True, num_workers=2, progress=False)
    # UniSRec's word-drop text table of the auxiliary domains (its sequence-sequence view)
    run_embed(EmbedConfig(shards=str(work / "shards"), out=str(work / "features_worddrop"),
                          domains=[d["name"] for d in first["aux"]], text_encoder=str(minilm_path()),
                          image_encoder=str(swin), text_pooling="mean", text_word_drop=0.15, num_workers=2,
                          progress=False, overwrite=True))
    (work / "features" / ".done").write_text("ok\n")


def pretrained_name(model: str, seed: int) -> str:
    return f"pretrain-s{seed}" if model == "ant" else f"pretrain-{model}-s{seed}"


def pretrain(work: Path, seed: int, steps: int, model: str = "ant") -> Path:
    """The demo's pre-training (model=ant), or UniSRec's with the same settings (model=unisrec)."""
    run = work / "runs" / pretrained_name(model, seed)
    if (run / "model" / "model_config.json").is_file():
        return run / "model"
    unisrec = [f"model={model}", f"word_drop_features={work / 'features_worddrop'}"] if model == "unisrec" else []
    cmd, env = launch_command([
           "-m", "ant_dist.pretrain", f"shards={work / 'shards'}", f"features={work / 'features'}",
           f"out={work / 'runs'}", f"run_name={run.name}", f"max_steps={steps}", f"seed={seed}",
           "progress=false", "tracker=none", *DEMO_PRETRAIN, *unisrec], 2, cpu=True)
    t0 = time.time()
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"pre-training {model} seed {seed} failed:\n{res.stderr[-3000:]}")
    print(f"pre-trained {model} seed {seed} in {time.time() - t0:.0f}s", flush=True)
    return run / "model"


def target_jobs(work: Path, seeds: list[int], fractions: list[float], worlds: list[str],
                methods: list[str], pretrain_seeds: list[int] | None = None) -> list[tuple[str, list[str]]]:
    """seeds: the target runs' seeds; the i-th takes pre-training seed pretrain_seeds[i mod P]
    (default: the same seeds)."""
    pretrain_seeds = pretrain_seeds or seeds
    pre_seed = {s: pretrain_seeds[i % len(pretrain_seeds)] for i, s in enumerate(seeds)}
    jobs = []
    for target in [t for w in worlds for t in WORLDS[w].values()]:
        for f in fractions:
            for s in seeds:
                for method in methods:
                    name = f"t/{target}/f{f:g}/{method}-s{s}"
                    model = PRETRAINED_MODEL.get(method, "ant")
                    pre = work / "runs" / pretrained_name(model, pre_seed[s] if method in TRANSFER
                                                          else pretrain_seeds[0]) / "model"
                    jobs.append((name, relearn_command(work, target, method, name, s, pre,
                                                       [f"train_users_fraction={f}", *RUN_OPTIONS])))
        for s in pretrain_seeds:  # no training: one evaluation per pre-trained model
            name = f"t/{target}/f1/zero-shot-s{s}"
            jobs.append((name, relearn_command(work, target, "zero-shot", name, s,
                                               work / "runs" / pretrained_name("ant", s) / "model",
                                               RUN_OPTIONS)))

    def priority(job):  # the runs the checks need first, so a partial run already answers them
        name = job[0]
        shifted, smallest = name.split("/")[1].endswith(("_s1", "_m1")), f"/f{min(fractions):g}/" in name
        core = any(f"/{m}-s" in name for m in ("GB", "FT", "ReL"))
        quick = "/zero-shot-s" in name  # evaluation only: seconds each
        return (not core, not quick, not (smallest or shifted), not smallest)
    return sorted(jobs, key=priority)


def run_jobs(work: Path, jobs, parallel: int) -> None:
    todo = [(n, c) for n, c in jobs if not (work / "runs" / n / "metrics.json").is_file()]
    print(f"{len(jobs)} target runs, {len(todo)} to do, {parallel} at a time", flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = {"n": 0}
    t0 = time.time()

    def one(job):
        name, cmd = job
        shutil.rmtree(work / "runs" / name, ignore_errors=True)  # an interrupted run starts over
        res = subprocess.run(cmd, env=env, capture_output=True, text=True)
        done["n"] += 1
        if res.returncode != 0:
            print(f"FAILED {name}:\n{res.stderr[-2000:]}", flush=True)
        elif done["n"] % 10 == 0:
            print(f"  {done['n']}/{len(todo)} runs in {time.time() - t0:.0f}s", flush=True)

    with ThreadPoolExecutor(parallel) as pool:
        list(pool.map(one, todo))


def _checks(world: str, target: str, f: float, fractions: list[float], by: dict, nt: dict) -> list[dict]:
    """The issue's checks on one (world, target, fraction) cell: by = method -> mean metrics."""
    out = []

    def p_vs_gb(method, metric):  # the paired t-test against GB, from the report's table
        return next(r for r in nt["rows"] if r["metric"] == metric)["methods"].get(method)

    for metric in ("recall@10", "ndcg@10"):
        if not {"GB", "FT", "ReL"} <= set(by):
            continue
        if world == "shift0" and f == min(fractions):
            best = max(("FT", "ReL"), key=lambda m: by[m][metric])
            cell = p_vs_gb(best, metric)
            out.append({"check": "shift 0, smallest fraction: max(FT, ReL) > GB with p < 0.05", "target": target,
                        "metric": metric, "best": best, "p": cell["p_value"],
                        "passed": bool(cell["significant"] and by[best][metric] > by["GB"][metric])})
        if world == "shift1":
            out.append({"check": "shift 1: ReL >= GB", "target": target, "fraction": f, "metric": metric,
                        "passed": by["ReL"][metric] >= by["GB"][metric]})
            out.append({"check": "shift 1: ReL > FT (the paper's claim; reported, not required)", "target": target,
                        "fraction": f, "metric": metric, "passed": by["ReL"][metric] > by["FT"][metric]})
        if world == "merge1" and f == 0.25:
            cell = p_vs_gb("FT", metric)
            out.append({"check": "merge 1, 25 %: FT < GB with p < 0.05 (negative transfer)", "target": target,
                        "metric": metric, "p": cell["p_value"],
                        "passed": bool(cell["significant"] and by["FT"][metric] < by["GB"][metric])})
            out.append({"check": "merge 1, 25 %: ReL >= GB", "target": target, "metric": metric,
                        "passed": by["ReL"][metric] >= by["GB"][metric]})
            if {"UniSRec-GB", "UniSRec", "UniSRec-ReL"} <= set(by):  # reported: what UniSRec does there
                out.append({"check": "merge 1, 25 %: UniSRec FT and ReL vs its GB (reported, not required)",
                            "target": target, "metric": metric, "passed": True,
                            **{m: by[m][metric] for m in ("UniSRec-GB", "UniSRec", "UniSRec-ReL")}})
    return out


def analyse(work: Path, fractions: list[float]) -> dict:
    from ant_dist.eval.report import build_report

    report = build_report([str(work / "runs" / "t")], work / "report", ["recall@10", "ndcg@10"], 0.05)
    tables = {(t["domain"], t["train_users_fraction"]): t for t in report["tables"]}
    nts = {(t["domain"], t["train_users_fraction"]): t for t in report["negative_transfer"]}
    rows, checks = [], []
    for world, names in WORLDS.items():
        for target in names.values():
            for f in fractions:
                if (target, f) not in nts:
                    continue
                table, nt = tables[(target, f)], nts[(target, f)]
                for r in table["rows"]:
                    cell = {"world": world, "target": target, "fraction": f, "method": r["method"],
                            "seeds": r["n_seeds"], **{f"{m}_mean": r["mean"][m] for m in ("recall@10", "ndcg@10")},
                            **{f"{m}_std": r["std"][m] for m in ("recall@10", "ndcg@10")}}
                    for row in nt["rows"]:
                        if r["method"] in row["methods"]:
                            cell[f"p_vs_GB_{row['metric']}"] = row["methods"][r["method"]]["p_value"]
                    rows.append(cell)
                checks += _checks(world, target, f, fractions, {r["method"]: r["mean"] for r in table["rows"]}, nt)
    return {"rows": rows, "checks": checks, "table3": report.get("table3")}


def markdown_table(result: dict, metric: str = "ndcg@10") -> str:
    """Rows (world, target, fraction) x method columns: mean ± std over seeds; vs GB, paired t-test
    p < 0.05: * better, ! worse."""
    methods = [m for m in (*METHODS, "zero-shot") if any(r["method"] == m for r in result["rows"])]
    cells: dict[tuple, dict[str, str]] = {}
    for r in result["rows"]:
        mean, std, p = r[f"{metric}_mean"], r[f"{metric}_std"], r.get(f"p_vs_GB_{metric}")
        mark = ""
        if p is not None and p < 0.05 and r["method"] != "GB":
            gb = next(x for x in result["rows"] if (x["target"], x["fraction"], x["method"]) ==
                      (r["target"], r["fraction"], "GB"))
            mark = "*" if mean > gb[f"{metric}_mean"] else "!"
        text = f"{mean:.4f}" + (f" ± {std:.4f}" if std is not None else "") + mark
        cells.setdefault((r["world"], r["target"].split("_")[0], r["fraction"]), {})[r["method"]] = text
    lines = ["| world | target | users trained on | " + " | ".join(methods) + " |",
             "| --- | --- | --- | " + " | ".join("---" for _ in methods) + " |"]
    for (world, target, f), row in sorted(cells.items()):
        lines.append(f"| {world} | {target} | {f:.0%} | " + " | ".join(row.get(m, "–") for m in methods) + " |")
    return "\n".join(lines) + "\n"


def plot(result: dict, fractions: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    worlds = [w for w in WORLDS if any(r["world"] == w for r in result["rows"])] or list(WORLDS)[:1]
    targets = [t for t in TARGETS if any(r["target"].split("_")[0] == t for r in result["rows"])] or list(TARGETS)[:1]
    # a row per target, a column per world: one target's worlds side by side on one y scale
    fig, grid = plt.subplots(len(targets), len(worlds), figsize=(4.2 * len(worlds), 3.4 * len(targets)),
                             sharey="row", squeeze=False)
    panels = [(w, WORLDS[w][t]) for t in targets for w in worlds]
    axes = [ax for row in grid for ax in row]
    for ax, (world, target) in zip(axes, panels):
        for method in METHODS:
            pts = sorted((r["fraction"], r["ndcg@10_mean"], r["ndcg@10_std"]) for r in result["rows"]
                         if r["target"] == target and r["method"] == method)
            if pts:
                x, y, e = zip(*[(a, b, c if c is not None else 0.0) for a, b, c in pts])  # one seed: no std
                ax.errorbar(x, y, yerr=e, marker="o", capsize=3, label=method)
        zs = [r["ndcg@10_mean"] for r in result["rows"] if r["target"] == target and r["method"] == "zero-shot"]
        if zs:
            ax.axhline(zs[0], color="grey", ls=":", label="zero-shot")
        ax.set_xscale("log")
        ax.set_xticks(fractions)
        ax.set_xticklabels([f"{f:g}" for f in fractions])
        ax.set_title(f"{target.split('_')[0]}, {world}")
        ax.set_xlabel("fraction of target users trained on")
    for row in grid:
        row[0].set_ylabel("test NDCG@10 (mean ± std over seeds)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize=8)  # outside the panels: it hides no curve
    fig.tight_layout(rect=(0, 0, 0.9, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default=str(ROOT / "bench" / ".work" / "transfer"))
    p.add_argument("--pretrain-seeds", default="0,1,2")
    p.add_argument("--run-seeds", default=None, help="target runs' seeds (default: the pre-training seeds)")
    p.add_argument("--fractions", default="0.1,0.25,1")
    p.add_argument("--parallel", type=int, default=2)
    p.add_argument("--pretrain-steps", type=int, default=1000)
    p.add_argument("--target-users", type=int, default=1000)
    p.add_argument("--worlds", default=",".join(WORLDS), help="target worlds: shift0, shift1, merge1")
    p.add_argument("--methods", default=",".join(METHODS), help="target methods (zero-shot always runs)")
    p.add_argument("--analyse-only", action="store_true", help="no new runs: analyse the finished ones")
    args = p.parse_args()
    work = Path(args.work)
    seeds = [int(s) for s in args.pretrain_seeds.split(",")]
    run_seeds = [int(s) for s in args.run_seeds.split(",")] if args.run_seeds else seeds
    fractions = [float(f) for f in args.fractions.split(",")]
    worlds, methods = args.worlds.split(","), args.methods.split(",")
    unknown = sorted((set(worlds) - set(WORLDS)) | (set(methods) - set(METHODS)))
    if unknown:
        p.error(f"unknown world(s) or method(s): {unknown}")
    models = ["ant"] + ["unisrec"] * any(PRETRAINED_MODEL.get(m) == "unisrec" for m in methods)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    t0 = time.time()
    if not args.analyse_only:
        build_data(work, args.target_users)
    t_data = time.time()
    for s in seeds if not args.analyse_only else []:
        for model in models:
            pretrain(work, s, args.pretrain_steps, model)
    t_pre = time.time()
    if not args.analyse_only:
        run_jobs(work, target_jobs(work, run_seeds, fractions, worlds, methods, seeds), args.parallel)
    t_runs = time.time()
    result = analyse(work, fractions)
    result["seconds"] = {"data": round(t_data - t0), "pretrain": round(t_pre - t_data),
                         "target_runs": round(t_runs - t_pre)}
    result["setup"] = {"pretrain_seeds": seeds, "run_seeds": run_seeds, "fractions": fractions,
                       "pretrain_steps": args.pretrain_steps,
                       "worlds": worlds, "methods": methods,
                       "target_users": args.target_users, "pretrain": DEMO_PRETRAIN}
    out = ROOT / "bench" / "results" / "transfer.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    tables = "".join(f"\n{m}:\n\n" + markdown_table(result, m) for m in ("ndcg@10", "recall@10"))
    (out.parent / "transfer.md").write_text(tables)
    print(tables)
    plot(result, fractions, ROOT / "docs" / "img" / "transfer.png")
    for c in result["checks"]:
        print(("PASS " if c["passed"] else "FAIL ") + json.dumps(c))
    print(f"results: {out}; report: {work / 'report' / 'report.md'}; plot: docs/img/transfer.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
