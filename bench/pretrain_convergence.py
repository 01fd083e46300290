"""Convergence on the demo's synthetic world: auxiliary validation NDCG@10 against wall time.

    python -m ant_dist.demo            # once: writes demo/shards and demo/features
    python bench/pretrain_convergence.py [--runs tuned,exact,k256,k4096] [--processes 2]

Each named run is a real `accelerate launch -m ant_dist.pretrain` (2 CPU processes by
default) over the 4 auxiliary domains, validating every `eval_every` steps on 1,000 users per
domain, ranked against the whole joint catalog. A run whose folder already ended is reused.
Writes bench/results/pretrain_convergence.json and docs/img/pretrain_convergence.png.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ant_dist.pipeline.launcher import launch_command  # noqa: E402

# The demo's settings (configs/pretrain_demo.yaml) and the variants compared against them.
TUNED = ["hidden=64", "batch_size=256", "lr=5e-3", "warmup_steps=20", "schedule=constant", "dropout=0.2",
         "loss=sampled", "n_negatives=1024"]
RUNS = {
    "tuned": TUNED + ["max_steps=1100", "eval_every=100"],
    "tuned-b128": TUNED + ["batch_size=128", "max_steps=2000", "eval_every=200"],
    # the same number of steps, other losses (what the sampled default costs)
    "exact-300": TUNED + ["loss=exact", "max_steps=300", "eval_every=100"],
    "k256-300": TUNED + ["n_negatives=256", "max_steps=300", "eval_every=100"],
    "k1024-300": TUNED + ["max_steps=300", "eval_every=100"],
    "k4096-300": TUNED + ["n_negatives=4096", "max_steps=300", "eval_every=100"],
    # one change at a time back towards the reference (what each change bought)
    "dropout0.5-300": TUNED + ["dropout=0.5", "max_steps=300", "eval_every=100"],
    "lr1e-3-300": TUNED + ["lr=1e-3", "max_steps=300", "eval_every=100"],
    "batch128-300": TUNED + ["batch_size=128", "max_steps=300", "eval_every=100"],
    # torch.compile (inductor) of the item and user models; compilation is in the wall time
    "compile-300": TUNED + ["compile=true", "max_steps=300", "eval_every=100"],
    # the reference setting (hidden 64, batch 128, lr 1e-3, exact, paper dropout)
    "reference": ["hidden=64", "batch_size=128", "lr=1e-3", "loss=exact", "dropout=0.5", "max_steps=400",
                  "eval_every=100"],
}


def run(name: str, args: list[str], processes: int, work: Path) -> list[dict]:
    out = work / name
    metrics = out / "metrics.jsonl"
    done = metrics.is_file() and any(json.loads(x)["event"] == "end" for x in metrics.read_text().splitlines())
    if not done:
        import shutil
        shutil.rmtree(out, ignore_errors=True)
        cmd, env = launch_command([
               "-m", "ant_dist.pretrain", "shards=demo/shards", "features=demo/features",
               "domains=[Food,Movies,Home,Clothing]", f"out={work}", f"run_name={name}", "tracker=none",
               "progress=false", "eval_users=1000", "checkpoint_every=0", "max_epochs=1000", *args], processes, cpu=True)
        res = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
        if res.returncode != 0:
            raise SystemExit(f"{name} failed:\n{res.stderr[-3000:]}")
    recs = [json.loads(x) for x in metrics.read_text().splitlines()]
    t0 = recs[0]["time"]
    curve = []
    for r in recs:
        if r["event"] == "validation":
            nd = [v for k, v in r.items() if k.endswith("ndcg@10")]
            curve.append({"seconds": round(r["time"] - t0, 1), "step": r["step"],
                          "ndcg@10": round(sum(nd) / len(nd), 4)})
    train = [r for r in recs if r["event"] == "train"]
    pos = sorted(r["perf/positions_per_s"] for r in train[1:] or train)
    return {"args": args, "curve": curve, "positions_per_s": round(pos[len(pos) // 2], 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", default="tuned,exact-300,k256-300,k1024-300,k4096-300")
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--work", default=str(ROOT / "bench" / ".work" / "convergence"))
    a = ap.parse_args()
    results = {}
    for name in a.runs.split(","):
        results[name] = run(name, RUNS[name], a.processes, Path(a.work))
        last = results[name]["curve"][-1]
        print(f"{name:10s} {results[name]['positions_per_s']:8.0f} positions/s; " + ", ".join(
            f"{c['seconds']:.0f}s/{c['step']}: {c['ndcg@10']:.4f}" for c in results[name]["curve"]), flush=True)
        del last
    out = ROOT / "bench" / "results" / "pretrain_convergence.json"
    old = json.loads(out.read_text()) if out.is_file() else {}
    out.write_text(json.dumps({**old, **results}, indent=1) + "\n")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.set_prop_cycle(color=plt.cm.tab20.colors)  # more runs than the default 10 colours
    for name, r in {**old, **results}.items():
        ax.plot([0] + [c["seconds"] for c in r["curve"]], [0] + [c["ndcg@10"] for c in r["curve"]], marker="o",
                ms=3, label=name)
    ax.axhline(0.10, color="grey", ls="--", lw=0.8)
    ax.axvline(300, color="grey", ls=":", lw=0.8)
    ax.set_xlabel("wall time since start (s), 2 CPU processes on 2 cores")
    ax.set_ylabel("validation NDCG@10 (mean of 4 aux domains)")
    ax.set_title("Pre-training on the demo's synthetic world")
    ax.legend(fontsize=8)
    fig.tight_layout()
    img = ROOT / "docs" / "img" / "pretrain_convergence.png"
    img.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(img, dpi=110)
    print(f"wrote {out} and {img}")


if __name__ == "__main__":
    main()
