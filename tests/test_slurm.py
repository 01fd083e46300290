"""The Slurm batch scripts on a real one-node Slurm (started by .ci/run with slurm/ci/start.sh),
and a two-"machine" launch over loopback without Slurm.

The Slurm tests are skipped, with the reason shown, when `sbatch` is absent or no cluster
answers; with ANT_REQUIRE_SLURM=1 (set by .ci/run, which starts the cluster) either fails them.
"""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ant_dist.pipeline.launcher import free_port, launch_command
from test_pretrain import ENV, _args, _params, _records, _run

ROOT = Path(__file__).resolve().parents[1]
HAVE_SBATCH = shutil.which("sbatch") is not None
if not HAVE_SBATCH and os.environ.get("ANT_REQUIRE_SLURM") == "1":
    raise RuntimeError("ANT_REQUIRE_SLURM=1 but sbatch is not installed: the Slurm tests must run here")
_no_sbatch = pytest.mark.skipif(not HAVE_SBATCH, reason="Slurm is not installed (no sbatch): Slurm tests skipped")


def slurm(test):
    """Marks a test `slurm` (select with -m slurm) and skips it where sbatch is absent."""
    return pytest.mark.slurm(_no_sbatch(test))


def _export(**extra):
    env = {k: v for k, v in ENV.items() if not k.startswith("SLURM_")}
    env.update({"ANT_CPU": "1", "ANT_GPUS_PER_NODE": "2", "ANT_CONFIG": "", "ANT_PYTHON": sys.executable,
                "ANT_MASTER_PORT": str(free_port()), **extra})
    return env


def _job_state(job: str) -> dict:
    out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
    return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)


def _wait_job_done(job: str, timeout: float = 600) -> dict:
    deadline = time.time() + timeout
    hurried = set()  # restart counts whose begin time was already moved (moving it again delays it)
    while time.time() < deadline:
        state = _job_state(job)
        if state.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            return state
        if state.get("JobState") == "PENDING" and state.get("Reason") == "BeginTime" \
                and state.get("Restarts") not in hurried:
            hurried.add(state.get("Restarts"))
            # A requeued job waits ~2 min before it may start again; the test need not. But not
            # "now": slurmd revokes the old instance's credential at whole-second resolution, and a
            # restart within that second is killed ("Job credential revoked") and ends FAILED.
            subprocess.run(["scontrol", "update", f"jobid={job}", "starttime=now+5"], capture_output=True)
        time.sleep(0.5)
    raise AssertionError(f"job {job} did not finish in {timeout}s: {_job_state(job)}")


@pytest.fixture(scope="module")
def cluster():
    if not HAVE_SBATCH:
        pytest.skip("Slurm is not installed")
    up = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True)
    if up.returncode != 0 or not any(s in up.stdout for s in ("idle", "mix", "alloc")):
        message = f"sbatch is installed but no Slurm cluster answers (as root: bash slurm/ci/start.sh): {up.stderr}"
        if os.environ.get("ANT_REQUIRE_SLURM") == "1":
            pytest.fail(message)
        pytest.skip(message)


@slurm
@pytest.mark.slow
def test_sbatch_pretrain_runs_two_processes(world, cluster, tmp_path):
    log = tmp_path / "job.log"
    res = subprocess.run(["sbatch", "--wait", "-o", str(log), "slurm/pretrain.sh",
                          *_args(world, "slurm-ok", "max_epochs=2", "tracker=wandb")],
                         cwd=ROOT, env=_export(), capture_output=True, text=True, timeout=900)
    text = log.read_text()
    assert res.returncode == 0, text[-3000:]
    run = world / "runs" / "slurm-ok"
    assert _records(run, "start")[0]["world_size"] == 2
    assert (run / "model" / "model.safetensors").is_file()
    assert f"run folder {run.resolve()}" in text  # rank 0's log names the run folder


@slurm
@pytest.mark.slow
def test_preempted_job_checkpoints_requeues_and_ends_like_an_uninterrupted_run(world, cluster, tmp_path):
    common = ["max_epochs=10", "checkpoint_every=20", "tracker=wandb"]
    ref = _run(launch_command(["-m", "ant_dist.pretrain", *_args(world, "slurm-ref", *common)], 2, cpu=False)[0])
    assert ref.returncode == 0, ref.stderr[-3000:]

    run = world / "runs" / "slurm-pre"
    log = tmp_path / "job.log"
    job = subprocess.run(["sbatch", "--parsable", "-o", str(log), "slurm/pretrain.sh",
                          *_args(world, "slurm-pre", *common)],
                         cwd=ROOT, env=_export(), capture_output=True, text=True, check=True).stdout.strip()
    try:
        deadline = time.time() + 300
        while not (run / "checkpoints" / "step-00000020").is_dir():
            assert _job_state(job).get("JobState") in ("PENDING", "RUNNING"), log.read_text()[-3000:]
            assert time.time() < deadline, "no checkpoint in 300 s"
            time.sleep(0.1)
        signalled = time.time()
        subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True)
        state = _wait_job_done(job)
    finally:
        subprocess.run(["scancel", job], capture_output=True)
    text = log.read_text()
    assert state["JobState"] == "COMPLETED" and state["ExitCode"] == "0:0", text[-3000:]
    assert state["Restarts"] == "1", text[-3000:]
    stopped = _records(run, "stopped")
    assert len(stopped) == 1 and 20 <= stopped[0]["step"] < 160
    resumed = [r for r in _records(run, "start") if r["resumed_from"]]
    assert len(resumed) == 1
    a, b = _params(world / "runs" / "slurm-ref"), _params(run)
    assert all(torch.equal(a[k], b[k]) for k in a)  # same process count: bitwise
    ids = {p.name.rsplit("-", 1)[1] for p in (run / "wandb").glob("offline-run-*")}
    assert len(ids) == 1, ids  # the requeued job continued the same W&B run
    # figures for the record: signal -> checkpoint, requeue -> training again
    stop_time = stopped[0]["time"]
    restart = resumed[0]["time"]
    print(json.dumps({"signal_to_checkpoint_s": round(stop_time - signalled, 2),
                      "stop_to_training_again_s": round(restart - stop_time, 2)}))


@slurm
@pytest.mark.slow
def test_sbatch_embed_then_verify(world, cluster, tmp_path):
    out = tmp_path / "features"
    log = tmp_path / "job.log"
    res = subprocess.run(["sbatch", "--wait", "-o", str(log), "slurm/embed.sh", f"shards={world / 'shards'}",
                          f"out={out}", f"text_encoder={world / 'bert'}", f"image_encoder={world / 'swin'}",
                          "text_pooling=mean", "batch_size=32", "num_workers=1", "progress=false"],
                         cwd=ROOT, env=_export(), capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, log.read_text()[-3000:]
    for domain in ("Food", "Home"):
        check = subprocess.run([sys.executable, "-m", "ant_dist.embed", "verify", str(out / domain)],
                               capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr
        assert json.loads((out / domain / "manifest.json").read_text())["runs"][-1]["processes"] == 2


@pytest.mark.slow
def test_two_machines_over_loopback_train_like_one_machine_with_two_processes(world):
    common = ["max_epochs=2", "checkpoint_every=10"]
    one = _run(launch_command(["-m", "ant_dist.pretrain", *_args(world, "one-machine", *common)], 2, cpu=False)[0])
    assert one.returncode == 0, one.stderr[-3000:]
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                               "2", "--num_machines", "2", "--machine_rank", str(rank), "--main_process_ip",
                               "127.0.0.1", "--main_process_port", port, "--mixed_precision", "no",
                               "--dynamo_backend", "no", "-m", "ant_dist.pretrain",
                               *_args(world, "two-machines", *common)],
                              env={**ENV, "ACCELERATE_USE_CPU": "1"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for rank in (0, 1)]
    try:
        outs = [p.communicate(timeout=600)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert all(p.returncode == 0 for p in procs), outs[0][-2000:] + outs[1][-2000:]
    run = world / "runs" / "two-machines"
    assert _records(run, "start")[0]["world_size"] == 2
    a, b = _params(world / "runs" / "one-machine"), _params(run)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("accelerate_config,engine", [("", "ddp"), ("configs/accelerate/zero2.yaml", "deepspeed")])
def test_node_launcher_on_cpu_keeps_the_chosen_engine(world, accelerate_config, engine):
    # slurm/launch_node.sh as a Slurm task runs it (one node, 2 CPU processes), without Slurm:
    # ANT_CPU=1 must not turn a DeepSpeed run into DDP (ACCELERATE_USE_CPU does that silently)
    run_name = f"node-{engine}"
    env = _export(SLURM_NNODES="1", SLURM_NODEID="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
                  ANT_ACCELERATE_CONFIG=accelerate_config)
    res = subprocess.run(["bash", "slurm/launch_node.sh", "ant_dist.pretrain",
                          *_args(world, run_name, "max_steps=2", "eval_every=-1")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    start = _records(world / "runs" / run_name, "start")[0]
    assert (start["engine"], start["world_size"]) == (engine, 2)
