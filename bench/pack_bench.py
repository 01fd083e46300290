"""Packing throughput and peak memory on this machine.

    python bench/pack_bench.py [--items 100000] [--workers 2]

Synthesises one domain of `--items` items with images (once, under bench/.work/), then runs
`tools/pack.py` on it in a fresh process and reports items/s (images included: each is read,
fully decoded once to validate it, and written into a shard) and the packer's peak RSS
(including its shard-writing worker processes).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, default=100_000)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--work", default=str(ROOT / "bench" / ".work" / "pack"))
    args = p.parse_args()
    sys.path.insert(0, str(ROOT))
    from ant_dist.config import SynthConfig
    from ant_dist.data.synth import synthesize

    raw = Path(args.work) / f"raw-{args.items}"
    if not (raw / "synth_manifest.json").is_file():
        t0 = time.time()
        synthesize(SynthConfig(out=str(raw), aux_domains=["Food"], target_domains=[], items_per_domain=args.items,
                               users_per_domain=args.items * 3 // 2, workers=args.workers, progress=False))
        print(f"synthesised {args.items} items in {time.time() - t0:.0f}s")
    d = json.loads((raw / "synth_manifest.json").read_text())["aux"][0]
    out = Path(args.work) / "shards"
    cmd = [sys.executable, str(ROOT / "tools" / "pack.py"), "domain=Food", f"meta={d['meta']}",
           f"interactions={d['interactions']}", f"images={d['images']}", f"out={out}", f"workers={args.workers}",
           "progress=false"]
    t0 = time.time()
    res = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.time() - t0
    if res.returncode:
        sys.exit(res.stderr[-3000:])
    # ru_maxrss of children is the largest single child (the packer or one of its workers)
    peak_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    report = json.loads((out / "Food" / "pack_report.json").read_text())
    n_in = report["meta"]["records"]
    result = {"items_in": n_in, "items_out": report["output"]["items"],
              "images_out": report["output"]["items_with_image"], "interactions_in": report["interactions_in"]["rows"],
              "seconds": round(seconds, 1), "items_per_s": round(n_in / seconds, 1), "peak_rss_mib": round(peak_mib),
              "workers": args.workers, "shard_bytes": report["output"]["shard_bytes"]}
    print(res.stdout.strip())
    print(json.dumps(result, indent=2))
    dest = ROOT / "bench" / "results" / "pack_cpu.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
