"""Seconds per epoch of ID-SASRec on a ~1k-item, ~1k-user, ~40k-interaction domain (an experiment).

    .venv/bin/python bench/relearn_speed.py [--work bench/.work/relearn_speed] [--epochs 8]

The issue's goal: under 3 s per epoch on 2 CPU cores, with validation NDCG@10 rising over the
first epochs (hidden 64, 2 layers, 2 heads, a loss on every position of every sequence). A
popular library's SASRec takes ~136 s per epoch on data of that size on the same machine,
because it trains on one prefix at a time. The run is `python -m ant_dist.relearn mode=scratch
item_repr=id`; the epoch time is the wall time between the first and the last training record
of metrics.jsonl, minus validation, divided by the epochs. Results: bench/results/relearn_speed.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build(work: Path) -> dict:
    import pyarrow.parquet as pq

    from ant_dist.config import SynthConfig
    from ant_dist.features.encoders import save_random_bert, save_random_swin
    from ant_dist.pipeline.world import build_world

    inter = work / "shards" / "Speed" / "interactions.parquet"
    if not (work / "features" / "Speed" / "manifest.json").is_file():
        save_random_bert(work / "bert")  # ID-SASRec never reads features; tiny encoders only make the tables exist
        save_random_swin(work / "swin", image_size=32, embed_dim=16)
        build_world(work, SynthConfig(aux_domains=["Speed"], target_domains=[], items_per_domain=1000,
                                      users_per_domain=1000, seq_len_min=30, seq_len_max=52, image_size=32,
                                      progress=False),
                    work / "bert", work / "swin", pack_options={"workers": 2, "progress": False},
                    embed_options={"num_workers": 0, "progress": False})
    lengths = [len(s) for s in pq.read_table(inter).column("items").to_pylist()]
    items = pq.read_metadata(work / "shards" / "Speed" / "catalog.parquet").num_rows
    return {"items": items, "users": len(lengths), "interactions": sum(lengths)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default=str(ROOT / "bench" / ".work" / "relearn_speed"))
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=256)
    args = p.parse_args()
    work = Path(args.work)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    data = build(work)
    run = work / "runs" / "id-sasrec"
    cmd = [sys.executable, "-m", "ant_dist.relearn", f"shards={work / 'shards'}", f"features={work / 'features'}",
           "domain=Speed", "mode=scratch", "item_repr=id", "hidden=64", "n_layers=2", "n_heads=2", "dropout=0.2",
           f"batch_size={args.batch_size}", f"max_epochs={args.epochs}", "patience_steps=0", "log_every=1",
           f"out={work / 'runs'}", "run_name=id-sasrec", "resume=never", "tracker=none", "progress=false"]
    import shutil

    shutil.rmtree(run, ignore_errors=True)
    subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    start = next(r["time"] for r in records if r["event"] == "start")
    end = max(r["time"] for r in records if r["event"] in ("train", "validation"))
    vals = [r for r in records if r["event"] == "validation"]
    validation_s = sum(r["perf/validation_s"] for r in vals)
    epoch_s = (end - start - validation_s) / args.epochs
    ndcg = [round(r["val/Speed/ndcg@10"], 4) for r in vals]
    result = {"data": data, "epochs": args.epochs, "batch_size": args.batch_size, "seconds_per_epoch": round(epoch_s, 2),
              "validation_seconds_per_epoch": round(validation_s / max(len(vals), 1), 2),
              "validation_ndcg@10_by_epoch": ndcg, "goal_seconds_per_epoch": 3.0, "cpu_cores": os.cpu_count()}
    out = ROOT / "bench" / "results" / "relearn_speed.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
