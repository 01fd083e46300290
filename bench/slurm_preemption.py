"""Preemption timings through a real Slurm: signal -> checkpoint, and requeue -> training again.

    bash slurm/ci/start.sh                      # as root, once: a one-node Slurm
    python -m ant_dist.demo                     # once: writes demo/shards and demo/features
    python bench/slurm_preemption.py [--repeats 3]

Each repeat submits `slurm/pretrain.sh` (2 CPU processes, the demo's 4 auxiliary domains, the
demo's pre-training settings), waits for its first checkpoint, sends the time-limit warning
(`scancel --signal=USR1 --batch`) and follows the job through Slurm until it completes. Phases:
- signal -> checkpoint: the signal is sent until the run's `stopped` record (the checkpoint is
  complete on disk when that record is written);
- checkpoint -> requeued: until Slurm shows the job PENDING again with one restart;
- hold: Slurm holds a requeued job before it may start (BeginTime, ~2 min by default); the
  bench moves the begin time to now+5 s as the tests do, and prints the hold Slurm had set;
- started -> training again: from the restarted job's StartTime until the resumed run's `start`
  record (launch, imports, data, checkpoint load; training steps follow at once).
Writes bench/results/slurm_preemption.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRETRAIN = ["hidden=64", "batch_size=256", "lr=5e-3", "warmup_steps=20", "schedule=constant", "dropout=0.2",
            "loss=sampled", "n_negatives=1024", "eval_every=-1", "max_steps=120", "checkpoint_every=50",
            "tracker=wandb", "progress=false", "domains=[Food,Movies,Home,Clothing]"]


def job_state(job: str) -> dict:
    out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
    return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)


def slurm_time(text: str) -> float:
    return dt.datetime.strptime(text, "%Y-%m-%dT%H:%M:%S").timestamp()


def records(run: Path, event: str) -> list[dict]:
    path = run / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    return [r for r in map(json.loads, lines) if r["event"] == event]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what: str, check, timeout: float = 600.0, poll: float = 0.05):
    deadline = time.time() + timeout
    while time.time() < deadline:
        got = check()
        if got:
            return got
        time.sleep(poll)
    raise SystemExit(f"timed out waiting for {what}")


def one_run(work: Path, k: int) -> dict:
    run = work / f"preempt-{k}"
    shutil.rmtree(run, ignore_errors=True)
    env = {kk: v for kk, v in os.environ.items() if not kk.startswith("SLURM_")}
    env.update({"ANT_CPU": "1", "ANT_GPUS_PER_NODE": "2", "ANT_CONFIG": "", "ANT_PYTHON": sys.executable,
                "ANT_MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline",
                "HF_HUB_OFFLINE": "1"})
    log = work / f"preempt-{k}.log"
    args = [f"shards={ROOT / 'demo/shards'}", f"features={ROOT / 'demo/features'}", f"out={work}",
            f"run_name=preempt-{k}", *PRETRAIN]
    job = subprocess.run(["sbatch", "--parsable", "-o", str(log), "slurm/pretrain.sh", *args], cwd=ROOT, env=env,
                         capture_output=True, text=True, check=True).stdout.strip()
    try:
        wait_for("the first checkpoint", lambda: (run / "checkpoints" / "step-00000050").is_dir())
        signalled = time.time()
        subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True)
        stopped = wait_for("the stopped record", lambda: records(run, "stopped"))[0]
        requeued = wait_for("the requeue", lambda: job_state(job).get("Restarts") == "1"
                            and job_state(job).get("JobState") == "PENDING" and time.time())
        hold = slurm_time(job_state(job)["StartTime"]) - requeued  # the begin time Slurm set
        subprocess.run(["scontrol", "update", f"jobid={job}", "starttime=now+5"], check=True, capture_output=True)
        state = wait_for("the restart", lambda: (s := job_state(job)).get("JobState") != "PENDING" and s)
        started = slurm_time(state["StartTime"])
        resumed = wait_for("the resumed start record",
                           lambda: [r for r in records(run, "start") if r["resumed_from"]])[0]
        final = wait_for("the end", lambda: (s := job_state(job)).get("JobState") in
                         ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT") and s, timeout=900)
    finally:
        subprocess.run(["scancel", job], capture_output=True)
    if final["JobState"] != "COMPLETED":
        raise SystemExit(f"job {job} ended {final['JobState']}: {log.read_text()[-2000:]}")
    return {"job": job, "stopped_at_step": stopped["step"],
            "signal_to_checkpoint_s": round(stopped["time"] - signalled, 2),
            "checkpoint_to_requeued_s": round(requeued - stopped["time"], 2),
            "slurm_hold_s": round(hold, 1),
            "started_to_training_s": round(resumed["time"] - started, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--work", default=str(ROOT / "bench" / ".work" / "slurm"))
    a = ap.parse_args()
    if shutil.which("sbatch") is None:
        raise SystemExit("sbatch not found: start a one-node Slurm first (as root: bash slurm/ci/start.sh)")
    if not (ROOT / "demo" / "features").is_dir():
        raise SystemExit("demo/features not found: run python -m ant_dist.demo once")
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    runs = []
    for k in range(a.repeats):
        runs.append(one_run(work, k))
        print(json.dumps(runs[-1]), flush=True)
    summary = {key: statistics.median(r[key] for r in runs) for key in runs[0] if key.endswith("_s")}
    print("median:", json.dumps(summary))
    out = ROOT / "bench" / "results" / "slurm_preemption.json"
    out.write_text(json.dumps({"runs": runs, "median": summary}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
