"""Time and peak memory of one forward+backward step of the full-catalog losses, IRL included.

    python bench/loss_bench.py                      # CPU: 10k, 100k, 657k items, batch 256 x 50
    python bench/loss_bench.py --device cuda --batch 2048 --items 657000

Each configuration runs in a fresh process so that its peak memory is its own (CPU: peak RSS,
with a fixed glibc mmap threshold so freed buffers are returned; GPU: max allocated).
Features are random float16 tables of the paper's sizes (text 768-d, image 1024-d).
Prints a table and writes JSON to bench/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch


def one(args) -> dict:
    from ant_dist.train.losses import NegativeSampler, full_softmax, sampled_softmax
    from ant_dist.model.ant import FeatureBank
    from ant_dist.model.irl import IRL, IRLConfig
    from ant_dist.model.sasrec import SASRec, SASRecConfig

    dev = torch.device(args.device)
    torch.manual_seed(0)
    n = args.items
    bank = FeatureBank(torch.randn(n, 768, dtype=torch.float16), torch.randn(n, 1024, dtype=torch.float16),
                       torch.rand(n) * 100, device=dev)
    irl = IRL(IRLConfig()).to(dev).train()
    user = SASRec(SASRecConfig()).to(dev).train()
    params = list(irl.parameters())
    b, l = args.batch, args.seq
    # all-position training: the target at position t is the input at t + 1
    full = torch.randint(0, n, (b, l + 1), device=dev)
    seq, targets = full[:, :-1], full[:, 1:].reshape(-1)
    item_fn = lambda rows: irl(*bank.gather(rows)).embedding  # noqa: E731
    sampler = NegativeSampler(n)

    def step():
        uniq, inverse = seq.flatten().unique(return_inverse=True)  # each input item through IRL once
        inputs = item_fn(uniq)[inverse].view(b, l, -1)
        states = user(inputs, torch.ones(b, l, dtype=torch.bool, device=dev))
        h = states.reshape(b * l, -1)
        if args.method == "exact":
            loss = full_softmax(h, targets, item_fn, n, params, chunk=args.chunk)
        else:
            loss = sampled_softmax(h, targets, item_fn, sampler, args.negatives)
        loss.backward()
        return loss.item()

    if dev.type == "cuda":
        step()  # warm-up (kernels, allocator)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    out = {"method": args.method, "items": n, "batch": b, "seq": l, "negatives": args.negatives,
           "chunk": args.chunk, "device": args.device, "step_s": min(times),
           "torch_threads": torch.get_num_threads()}
    if dev.type == "cuda":
        out["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        out["gpu"] = torch.cuda.get_device_name()
    else:
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        out["peak_gib"] = rss / 1024
        out["peak_over_features_gib"] = (rss - base_rss) / 1024
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", default="10000,100000,657000")
    p.add_argument("--negatives", default="1000,4000,16000")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--seq", type=int, default=50)
    p.add_argument("--chunk", type=int, default=8192)
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None, help="JSON results file (default bench/results/loss_<device>.json)")
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--method", default="exact", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        args.items, args.negatives = int(args.items), int(args.negatives)
        print(json.dumps(one(args)))
        return
    rows = []
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "1048576"}
    for items in [int(x) for x in args.items.split(",")]:
        configs = [("exact", 0)] + [("sampled", int(k)) for k in args.negatives.split(",")]
        for method, k in configs:
            cmd = [sys.executable, __file__, "--one", "--method", method, "--items", str(items),
                   "--negatives", str(k), "--batch", str(args.batch), "--seq", str(args.seq),
                   "--chunk", str(args.chunk), "--steps", str(args.steps), "--device", args.device]
            res = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if res.returncode != 0:
                print(res.stderr[-2000:], file=sys.stderr)
                continue
            r = json.loads(res.stdout.strip().splitlines()[-1])
            rows.append(r)
            label = "exact" if method == "exact" else f"sampled {k}"
            print(f"{items:>8,} items  {label:14s} step {r['step_s']:8.3f} s   peak {r['peak_gib']:6.2f} GiB"
                  + (f" (+{r['peak_over_features_gib']:.2f} over features)" if "peak_over_features_gib" in r else ""),
                  flush=True)
    out = Path(args.out or Path(__file__).parent / "results" / f"loss_{args.device}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
