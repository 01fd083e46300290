"""Pre-training throughput and memory at 10k / 100k / 657k items (not a test: prints figures).

    python bench/pretrain_bench.py [--items 10000,100000,657000] [--losses exact,sampled:1024,sampled:4096]
                                   [--processes 2] [--batch 256] [--steps 5] [--device cpu]

For each catalog size it writes one synthetic domain under bench/.work/: random paper-sized
float16 feature tables (768-d text, 1024-d image, prices), a catalog, and 3 users per item
with 5-50 interactions (geometric, mean ~12; the paper has ~9 per user), Zipf item popularity. Then it runs the real entry point
(`accelerate launch -m ant_dist.pretrain`, validation off) for a few steps per loss and reads
metrics.jsonl: positions/s (median over the steps after the first) and the anonymous memory
sampled after each step, on rank 0 and the largest over all ranks (memory-mapped feature pages
are page cache, not counted; with --features-on auto, features above features_device_max_gb
stay memory-mapped). Results: bench/results/pretrain_<device>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ant_dist.pipeline.launcher import launch_command  # noqa: E402
from ant_dist.features.feature_table import shards_fingerprint, write_manifest  # noqa: E402


def make_domain(work: Path, n_items: int, seed: int = 0) -> Path:
    name = f"Bench{n_items}"
    shards, feats = work / "shards" / name, work / "features" / name
    if (feats / "manifest.json").is_file():
        return work
    rng = np.random.default_rng(seed)
    shards.mkdir(parents=True, exist_ok=True)
    feats.mkdir(parents=True, exist_ok=True)
    n_users = 3 * n_items
    lengths = np.minimum(rng.geometric(1 / 8, n_users) + 4, 50)  # 5-50, mean ~12: the paper's ~9 plus held-out
    offsets = np.r_[0, np.cumsum(lengths)].astype(np.int32)
    items = rng.zipf(1.3, offsets[-1]) % n_items  # a popularity skew like real catalogs
    pq.write_table(pa.table({
        "user_id": pa.array([f"u{i}" for i in range(n_users)]),
        "items": pa.ListArray.from_arrays(pa.array(offsets), pa.array(items.astype(np.int32))),
        "timestamps": pa.ListArray.from_arrays(pa.array(offsets), pa.array(np.arange(offsets[-1], dtype=np.int64))),
    }), shards / "interactions.parquet")
    price = rng.uniform(0, 100, n_items).astype(np.float32)
    pq.write_table(pa.table({"row": np.arange(n_items), "item_id": [str(i) for i in range(n_items)],
                             "price_norm": price.astype(np.float64), "has_image": np.ones(n_items, bool)}),
                   shards / "catalog.parquet")
    for table, dim in (("text", 768), ("image", 1024)):
        arr = np.lib.format.open_memmap(feats / f"{table}.npy", mode="w+", dtype=np.float16, shape=(n_items, dim))
        for a in range(0, n_items, 65536):
            arr[a:a + 65536] = rng.standard_normal((min(65536, n_items - a), dim)).astype(np.float16)
        arr.flush()
        del arr
    np.save(feats / "price.npy", price)
    np.save(feats / "has_image.npy", np.ones(n_items, bool))
    np.save(feats / "done.npy", np.ones(n_items, bool))
    enc = {"fingerprint": "random", "path": "random"}
    write_manifest(feats, {"domain": name, "rows": n_items, "dtype": "float16", "complete": True,
                           "shards_dir": str(shards), "shards_fingerprint": shards_fingerprint(shards),
                           "text": {**enc, "dim": 768}, "image": {**enc, "dim": 1024}, "runs": []})
    print(f"made {name}: {n_items} items, {n_users} users, {offsets[-1]} interactions", flush=True)
    return work


def run_one(work: Path, n_items: int, loss: str, processes: int, batch: int, steps: int, device: str,
            features_on: str = "auto", extra: tuple[str, ...] | list[str] = (), timeout: float | None = None) -> dict:
    """One launch of the real entry point; `extra` are more key=value options (model settings)."""
    name = f"Bench{n_items}"
    kind, _, k = loss.partition(":")
    run = f"{name}-{kind}{k}-p{processes}-{features_on}"
    args = ["-m", "ant_dist.pretrain", f"shards={work / 'shards'}", f"features={work / 'features'}",
            f"domains=[{name}]", f"out={work / 'runs'}", f"run_name={run}", "resume=never", f"loss={kind}",
            f"batch_size={batch}", f"max_steps={steps}", "eval_every=-1", "checkpoint_every=0",
            "tracker=none", "progress=false", "log_every=1", "num_workers=1", f"features_on={features_on}"]
    if k:
        args.append(f"n_negatives={k}")
    args += list(extra)
    if device != "cpu":
        args.append("features_device_max_gb=16")  # paper-scale features (2.4 GB) live on the GPU
    launch, env = launch_command(args, processes, cpu=device == "cpu",
                                 threads_per_process=max(1, (os.cpu_count() or 2) // processes))
    import shutil
    shutil.rmtree(work / "runs" / run, ignore_errors=True)
    t0 = time.time()
    res = subprocess.run(launch, env=env, capture_output=True, text=True, cwd=ROOT, timeout=timeout)
    if res.returncode != 0:
        raise SystemExit(f"{run} failed:\n{res.stderr[-3000:]}")
    recs = [json.loads(x) for x in (work / "runs" / run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if r["event"] == "train"]
    start = next(r for r in recs if r["event"] == "start")
    later = train[1:] or train
    return {"items": n_items, "loss": loss, "processes": processes, "batch": batch,
            "features_on": start["features_on"], "steps": len(train),
            "positions_per_s": round(statistics.median(r["perf/positions_per_s"] for r in later), 1),
            "step_s": round(statistics.median(r["perf/step_s"] for r in later), 3),
            "peak_anon_rss_gib_rank0": round(max(r.get("mem/rss_anon_mib", 0) for r in train) / 1024, 2),
            # the largest sample over the steps and over every rank
            "peak_anon_rss_gib_any_rank": round(max(r.get("mem/max_over_ranks/rss_anon_mib", 0)
                                                    for r in train) / 1024, 2),
            "peak_cuda_mib": max(r.get("mem/cuda_max_allocated_mib", 0) for r in train),
            "loss_paths": sorted({r.get("loss_path", "") for r in train}),
            "wall_s": round(time.time() - t0, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", default="10000,100000,657000")
    ap.add_argument("--losses", default="sampled:1024,sampled:4096,exact")
    ap.add_argument("--processes", default="2")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--exact-steps", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--features-on", default="auto", help="auto | device | mmap (the same for every size: like "
                    "for like; auto keeps 657k memory-mapped and smaller catalogs in memory)")
    ap.add_argument("--work", default=str(ROOT / "bench" / ".work" / "pretrain"))
    a = ap.parse_args()
    work = Path(a.work)
    results = []
    for n in (int(x) for x in a.items.split(",")):
        make_domain(work, n)
        for loss in a.losses.split(","):
            for p in (int(x) for x in a.processes.split(",")):
                r = run_one(work, n, loss, p, a.batch, a.exact_steps if loss == "exact" else a.steps, a.device,
                            a.features_on)
                print(json.dumps(r), flush=True)
                results.append(r)
    out = ROOT / "bench" / "results" / f"pretrain_{a.device}.json"
    old = json.loads(out.read_text()) if out.is_file() else []
    def key(r):
        return r["items"], r["loss"], r["processes"], r["batch"], r["features_on"]
    keep = [r for r in old if key(r) not in {key(x) for x in results}]
    out.write_text(json.dumps(keep + results, indent=1) + "\n")
    print(f"{'items':>8s} {'loss':>13s} {'proc':>4s} {'features':>8s} {'positions/s':>11s} {'step s':>7s} "
          f"{'anon RSS GiB rank 0 / any':>26s}")
    for r in results:
        print(f"{r['items']:8d} {r['loss']:>13s} {r['processes']:4d} {r['features_on']:>8s} "
              f"{r['positions_per_s']:11.0f} {r['step_s']:7.2f} {r['peak_anon_rss_gib_rank0']:19.2f} / "
              f"{r['peak_anon_rss_gib_any_rank']:.2f}")


if __name__ == "__main__":
    main()
