"""Embedding-pass throughput on this machine: items/s and where the time goes.

    python bench/embed_bench.py [--items 4000] [--batches 64,256] [--processes 1]

Builds (once, under bench/.work/) a synthetic domain packed into shards and a small random
Swin, then runs the real pass (`python -m ant_dist.embed`) with the real all-MiniLM-L6-v2 text
encoder at each batch size, from scratch (overwrite=true), and prints items/s and the share
of the time spent in the encoders (the rest: waiting for the DataLoader, writing tables).
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

from ant_dist.pipeline.launcher import launch_command  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, default=4000)
    p.add_argument("--batches", default="64,256")
    p.add_argument("--processes", type=int, default=1)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--work", default=str(ROOT / "bench" / ".work" / "embed"))
    args = p.parse_args()
    from ant_dist.config import PackConfig, SynthConfig
    from ant_dist.data.pack import pack_domain
    from ant_dist.data.synth import synthesize
    from ant_dist.features.encoders import minilm_path, save_random_swin

    work = Path(args.work)
    shards = work / f"shards-{args.items}"
    if not (shards / "Food" / "catalog.parquet").is_file():
        m = synthesize(SynthConfig(out=str(work / f"raw-{args.items}"), aux_domains=["Food"], target_domains=[],
                                   items_per_domain=args.items, users_per_domain=args.items * 2, progress=False))
        d = m["aux"][0]
        pack_domain(PackConfig(domain="Food", meta=d["meta"], interactions=d["interactions"], images=d["images"],
                               out=str(shards), shard_max_items=250, progress=False))
    swin = work / "random-swin"
    if not (swin / "config.json").is_file():
        save_random_swin(swin)
    results = []
    for bs in [int(b) for b in args.batches.split(",")]:
        out = work / "features"
        cmd = ["-m", "ant_dist.embed", f"shards={shards}", f"out={out}", f"text_encoder={minilm_path()}",
               f"image_encoder={swin}", "text_pooling=mean", f"batch_size={bs}", f"num_workers={args.workers}",
               "overwrite=true", "progress=false"]
        argv, env = ([sys.executable, *cmd], {**os.environ, "ACCELERATE_USE_CPU": "1"}) if args.processes == 1 else \
            launch_command(cmd, args.processes, cpu=True, threads_per_process=None)
        env["HF_HUB_OFFLINE"] = "1"
        res = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=ROOT)
        if res.returncode:
            sys.exit(res.stderr[-3000:])
        run = json.loads((out / "Food" / "manifest.json").read_text())["runs"][-1]
        lines = [ln.strip() for ln in res.stdout.splitlines() if ln.strip().startswith("process ")]
        items_s = run["rows_computed"] / run["seconds"]
        print(f"batch {bs:4d}: {run['rows_computed']} items in {run['seconds']:.1f}s = {items_s:.1f} items/s "
              f"({args.processes} process(es), {args.workers} loader worker(s) each)")
        for ln in lines:
            print(f"    {ln}")
        results.append({"batch": bs, "items": run["rows_computed"], "seconds": run["seconds"],
                        "items_per_s": round(items_s, 1), "per_process": lines})
    dest = ROOT / "bench" / "results" / "embed_cpu.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {dest}")


if __name__ == "__main__":
    main()
