"""RecBole's five baselines on MovieLens-100K through `python -m ant_dist.baselines` (an experiment).

    .venv/bin/python bench/baselines_ml100k.py [--work bench/.work/realdata] [--seeds 0]
                                               [--models NPE,SASRec,BERT4Rec,FDSA,S3-Rec] [--epochs 300]

Data and features: bench/realdata.py's (ml-100k from the recbole wheel, packed as RecBole does;
titles and genres through all-MiniLM-L6-v2), built by it when missing. Settings: RecBole's
defaults for each model (hidden 64, feed-forward 256, 2 layers and heads, its dropout, batch 2048,
Adam lr 1e-3, max_len 50) and early stopping after 10 epochs without a better validation NDCG@10.
Each run reports two test figures of the same selected weights: ours (history excluded, pessimistic
ties: eval/metrics.py) and RecBole's own full-sort evaluator (history ranked), i.e. RecBole's
protocol, to set beside RecBole's published numbers and bench/realdata.py's ID-SASRec.
Results: bench/results/baselines_ml100k.json and the table printed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.realdata import DOMAIN, build  # noqa: E402

COMMON = ["hidden=64", "inner_size=256", "n_layers=2", "n_heads=2", "max_len=50", "batch_size=2048", "lr=0.001",
          "patience=10", "select_metric=ndcg@10", "exclude_history=true", "tracker=none", "progress=false"]


def run(work: Path, model: str, seed: int, epochs: int) -> dict:
    name = f"baselines/{model}/seed{seed}"
    metrics = work / "runs" / name / "metrics.json"
    if not metrics.is_file():
        cmd = [sys.executable, "-m", "ant_dist.baselines", f"model={model}", f"domain={DOMAIN}",
               f"shards={work / 'shards'}", f"features={work / 'features'}", f"out={work / 'runs'}",
               f"run_name={name}", f"seed={seed}", f"epochs={epochs}", *COMMON]
        print(f"[baselines] {name}", flush=True)
        subprocess.run(cmd, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    m = json.loads(metrics.read_text())
    test = m["test"][DOMAIN]["mean"]
    return {"model": model, "seed": seed, "wall_s": m["wall_s"], "train_s": m["train_s"], "epochs": m["epochs"],
            "best_epoch": m["best"]["epoch"], "best_val_ndcg@10": m["best"]["value"],
            "ours": {k: test[k] for k in ("recall@10", "ndcg@10")},
            "recbole": {k: m["recbole_test"][k] for k in ("recall@10", "ndcg@10")}}


def markdown(rows: list) -> str:
    lines = ["| model | seed | epochs (best) | train s | ours Recall@10 | ours NDCG@10 | RecBole's Recall@10 | "
             "RecBole's NDCG@10 |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['seed']} | {r['epochs']} ({r['best_epoch']}) | {r['train_s']:.0f} | "
                     f"{r['ours']['recall@10']:.4f} | {r['ours']['ndcg@10']:.4f} | {r['recbole']['recall@10']:.4f} | "
                     f"{r['recbole']['ndcg@10']:.4f} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default=str(ROOT / "bench" / ".work" / "realdata"))
    p.add_argument("--seeds", default="0")
    p.add_argument("--models", default="NPE,SASRec,BERT4Rec,FDSA,S3-Rec")
    p.add_argument("--epochs", type=int, default=300)
    args = p.parse_args()
    work = Path(args.work)
    build(work)
    rows = []
    started = time.time()
    for model in args.models.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            rows.append(run(work, model, seed, args.epochs))
    table = markdown(rows)
    print(table)
    out = ROOT / "bench" / "results" / "baselines_ml100k.json"
    out.write_text(json.dumps({"data": DOMAIN, "cpu_cores": os.cpu_count(), "common": COMMON, "epochs": args.epochs,
                               "rows": rows, "table": table, "wall_s": round(time.time() - started)}, indent=1) + "\n")
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
