"""The one script a lent GPU runs (through bench/gpu_checks.sh), writing one JSON; exits non-zero
when any part fails. Within 8 minutes on one H100:

    bash bench/gpu_checks.sh                        # cuda, paper sizes -> bench/results/gpu_checks_cuda.json
    bash bench/gpu_checks.sh --device cpu --tiny    # every part at toy sizes (CI runs this: it cannot rot)

Parts:
  precision   the precision matrix of the test suite (tests/test_precision.py) on this device:
              every loss path and re-learning method, one step in fp32 and in bf16 autocast
              (one process; on CUDA inside a 1-process NCCL group)
  pretrain    the real entry point with configs/paper/ant.yaml's model and loss settings, exact and
              sampled K=4,096, on synthetic paper-sized features (657k items, 768-d text, 1024-d
              image), batch 2,048, 20 steps: positions/s, step time, peak GPU memory, and the epoch
              time over 21.4M interactions (goals: sampled one epoch < 5 min; exact step < 250 ms)
  relearn     re-learning (GB, the paper's re-learning settings: exact loss) at batch 2,048 on a
              5k-item target for 50 steps: the chunked exact path under bf16
  encoders    bert-base and swin-base throughput, bf16 (goals 8,000 texts/s, 2,500 images/s)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import pretrain_bench  # noqa: E402

PART_TIMEOUT_S = 300  # a hung part fails alone instead of eating the whole device budget
EPOCH_INTERACTIONS = 21.4e6  # the paper's four auxiliary domains (docs/reproduce.md)
SIZES = {  # full: the sizes; tiny: every code path at toy sizes, for CI
    "full": {"items": 657_000, "batch": 2048, "steps": 20, "exact_steps": 20, "negatives": 4096,
             "target_items": 5000, "relearn_batch": 2048, "relearn_steps": 50,
             "encoders": ["--text-batch", "1024", "--image-batch", "256", "--steps", "10"]},
    "tiny": {"items": 1000, "batch": 32, "steps": 2, "exact_steps": 2, "negatives": 128,
             "target_items": 300, "relearn_batch": 32, "relearn_steps": 3, "exact_chunk": 256,
             "encoders": ["--text-batch", "2", "--image-batch", "1", "--steps", "1", "--tiny"]},
}


def paper_pretrain_options(tiny: bool) -> list[str]:
    """configs/paper/ant.yaml's model and loss settings as key=value overrides."""
    from omegaconf import OmegaConf

    paper = OmegaConf.to_container(OmegaConf.load(ROOT / "configs" / "paper" / "ant.yaml"))["pretrain"]
    keys = ("hidden", "n_layers", "n_heads", "n_experts", "max_len", "tau", "align_weight", "lr", "weight_decay")
    opts = {k: paper[k] for k in keys if k in paper}
    if tiny:
        opts["hidden"] = 32
    # bf16 is what precision=auto picks on a GPU; said explicitly so the CPU run takes the same path
    return [f"{k}={v}" for k, v in opts.items()] + ["precision=bf16"]


def part_precision(device: str, out_dir: Path) -> dict:
    env = {**os.environ, "ANT_TEST_DEVICE": device, "ANT_PRECISION_RESULTS_DIR": str(out_dir),
           "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    # on one GPU: the one-process matrix and the evaluation check (the 2-process cases need gloo on
    # CPU or two GPUs: the suite runs them on CPU)
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x",
                          str(ROOT / "tests" / "test_precision.py"), "-k", "one_process or evaluation"],
                         env=env, cwd=ROOT, capture_output=True, text=True, timeout=PART_TIMEOUT_S)
    if res.returncode != 0:
        raise RuntimeError(f"the precision matrix failed on {device}:\n{res.stdout[-4000:]}{res.stderr[-2000:]}")
    return {"cases": json.loads((out_dir / "precision_one_process.json").read_text()),
            "pytest": res.stdout.strip().splitlines()[-1]}


def part_pretrain(device: str, size: dict, work: Path, tiny: bool) -> dict:
    pretrain_bench.make_domain(work, size["items"])
    extra = paper_pretrain_options(tiny) + ([f"exact_chunk={size['exact_chunk']}"] if "exact_chunk" in size else [])
    out = {}
    for loss, steps in ((f"sampled:{size['negatives']}", size["steps"]), ("exact", size["exact_steps"])):
        r = pretrain_bench.run_one(work, size["items"], loss, 1, size["batch"], steps, device, extra=extra,
                                   timeout=PART_TIMEOUT_S)
        r["epoch_minutes_over_21.4M"] = round(EPOCH_INTERACTIONS / r["positions_per_s"] / 60, 2)
        out[loss] = r
    out["goals"] = {"sampled one epoch < 5 min": out[f"sampled:{size['negatives']}"]["epoch_minutes_over_21.4M"] < 5,
                    "exact step < 250 ms": out["exact"]["step_s"] < 0.25}
    return out


ARCHITECTURE = ("hidden", "n_layers", "n_heads", "n_experts", "max_len")


def part_relearn(device: str, size: dict, work: Path, tiny: bool) -> dict:
    pretrain_bench.make_domain(work, size["target_items"])
    name, run = f"Bench{size['target_items']}", "relearn-gb"
    shutil.rmtree(work / "runs" / run, ignore_errors=True)
    cmd = [sys.executable, "-m", "ant_dist.relearn", "--config", str(ROOT / "configs" / "relearn.yaml"),
           f"shards={work / 'shards'}", f"features={work / 'features'}", f"domain={name}", "mode=scratch",
           f"batch_size={size['relearn_batch']}", f"max_steps={size['relearn_steps']}", "eval_users=500",
           "log_every=1", f"out={work / 'runs'}", f"run_name={run}", "resume=never", "tracker=none",
           "progress=false", "num_workers=1",
           *[o for o in paper_pretrain_options(tiny) if o.split("=")[0] in (*ARCHITECTURE, "precision")]]
    if "exact_chunk" in size:
        cmd.append(f"exact_chunk={size['exact_chunk'] // 4}")
    env = {**os.environ, "ACCELERATE_USE_CPU": "1"} if device == "cpu" else dict(os.environ)
    t0 = time.time()
    res = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=PART_TIMEOUT_S)
    if res.returncode != 0:
        raise RuntimeError(f"relearn failed:\n{res.stderr[-3000:]}")
    recs = [json.loads(x) for x in (work / "runs" / run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if r["event"] == "train"]
    later = train[1:] or train
    if "exact-chunked" not in {r["loss_path"] for r in train}:
        raise RuntimeError(f"re-learning never took the chunked exact path: {sorted({r['loss_path'] for r in train})}")
    return {"items": size["target_items"], "batch": size["relearn_batch"], "steps": len(train),
            "loss_paths": sorted({r["loss_path"] for r in train}),
            "positions_per_s": round(statistics.median(r["perf/positions_per_s"] for r in later), 1),
            "step_s": round(statistics.median(r["perf/step_s"] for r in later), 4),
            "peak_cuda_mib": max(r.get("mem/cuda_max_allocated_mib", 0) for r in train),
            "wall_s": round(time.time() - t0, 1)}


def part_encoders(device: str, size: dict, work: Path) -> dict:
    out = work / "encoders.json"
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "encoder_throughput.py"), "--device", device,
                          "--out", str(out), *size["encoders"]], cwd=ROOT, capture_output=True, text=True,
                         timeout=PART_TIMEOUT_S)
    if res.returncode != 0:
        raise RuntimeError(f"encoder throughput failed:\n{res.stderr[-3000:]}")
    return json.loads(out.read_text())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="toy sizes: every part runs in a few minutes on a CPU")
    p.add_argument("--out", default=None, help="the JSON (default bench/results/gpu_checks_<device>.json)")
    p.add_argument("--work", default=str(ROOT / "bench" / ".work" / "gpu_checks"))
    p.add_argument("--only", default="", help="comma-separated parts to run (default: all)")
    args = p.parse_args()
    size = SIZES["tiny" if args.tiny else "full"]
    work = Path(args.work) / ("tiny" if args.tiny else "full")
    out = Path(args.out or ROOT / "bench" / "results" / f"gpu_checks_{args.device}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    report = {"device": args.device, "tiny": args.tiny, "parts": {}}
    if args.device == "cuda":
        import torch
        report["gpu"] = torch.cuda.get_device_name()
    parts = {"precision": lambda: part_precision(args.device, work),
             "pretrain": lambda: part_pretrain(args.device, size, work, args.tiny),
             "relearn": lambda: part_relearn(args.device, size, work, args.tiny),
             "encoders": lambda: part_encoders(args.device, size, work)}
    if args.only:
        unknown = set(args.only.split(",")) - set(parts)
        if unknown:
            p.error(f"--only: unknown part(s) {sorted(unknown)}; choose from {list(parts)}")
        parts = {k: v for k, v in parts.items() if k in args.only.split(",")}
    failed = []
    for name, fn in parts.items():
        t0 = time.time()
        print(f"[gpu_checks] {name} ...", flush=True)
        try:
            report["parts"][name] = {"ok": True, **fn()}
        except BaseException as exc:  # every part runs; the exit code says whether any failed
            if isinstance(exc, KeyboardInterrupt):
                raise
            failed.append(name)
            report["parts"][name] = {"ok": False, "error": "".join(traceback.format_exception_only(exc))[-6000:]}
        report["parts"][name]["seconds"] = round(time.time() - t0, 1)
        print(f"[gpu_checks] {name}: {'ok' if name not in failed else 'FAILED'} "
              f"({report['parts'][name]['seconds']} s)", flush=True)
        out.write_text(json.dumps(report, indent=1) + "\n")  # what is done so far survives a time-out
    print(json.dumps(report, indent=1))
    if os.environ.get("OUT"):  # the device tool brings back what lies under $OUT
        shutil.copy(out, Path(os.environ["OUT"]) / out.name)
    if failed:
        print(f"[gpu_checks] FAILED: {', '.join(failed)} (details in {out})", file=sys.stderr)
        return 1
    print(f"[gpu_checks] all parts passed; {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
