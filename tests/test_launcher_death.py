"""A killed launcher never leaves its training processes running (issue 15, item 0).

SIGKILL of `accelerate launch` itself (an OOM killer, a closed terminal) used to re-parent both
training processes to init: they went on training, holding the run folder's lock, so the user's
rerun was refused. Now each training process asks the kernel for SIGTERM when its launcher dies
(runtime/processes.py: die_with_launcher) and stops like on any stop signal: a checkpoint at the next step
boundary, exit 75. The same command then resumes to the uninterrupted result, bitwise on CPU.
"""

import subprocess

import psutil
import pytest
import torch

from ant_dist.runtime.locking import exclusive_dir_lock
from test_pretrain import _cmd, _env, _kill_tree, _params, _records, _run, _wait_for

MAX_STEPS = 24
COMMON = [f"max_steps={MAX_STEPS}", "checkpoint_every=4", "log_every=1"]


@pytest.mark.slow
def test_sigkill_of_the_launcher_stops_both_ranks_with_a_checkpoint_then_resume_is_bitwise(world):
    ref = _run(_cmd(world, "launcher-ref", *COMMON, processes=2))
    assert ref.returncode == 0, ref.stderr[-3000:]
    run = world / "runs" / "launcher-killed"
    proc = subprocess.Popen(_cmd(world, "launcher-killed", *COMMON, processes=2), env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ranks = []
    try:
        _wait_for(lambda: (run / "checkpoints" / "step-00000004").is_dir(), proc, "the first checkpoint")
        ranks = psutil.Process(proc.pid).children()
        assert len(ranks) == 2
        at_kill = max(r["step"] for r in _records(run, "train"))
        proc.kill()  # the launcher only: nothing signals the ranks but the kernel's death signal
        proc.wait()
        gone, alive = psutil.wait_procs(ranks, timeout=120)
        assert not alive, f"training processes outlived their launcher: {[p.pid for p in alive]}"
    finally:
        for p in ranks:
            if p.is_running():
                p.kill()
        _kill_tree(proc)
    assert {p.returncode for p in gone} <= {75, None}  # not our children: None when not reapable
    assert not _records(run, "end"), "the training processes trained on to the end without their launcher"
    [stopped] = _records(run, "stopped")
    # they stop at a step boundary after the kill, with a checkpoint there, well before the end. How many
    # steps after is a matter of timing (the kernel's death signal and the step boundary race on a loaded
    # machine: CI once saw 3), so only the order is asserted; "end" above is absent
    assert at_kill <= stopped["step"] < MAX_STEPS, (at_kill, stopped)
    assert (run / "checkpoints" / f"step-{stopped['step']:08d}" / "state.json").is_file()
    assert not (run / "model").exists()
    with exclusive_dir_lock(run, "test"):  # nobody holds the run folder any more
        pass
    res = _run(_cmd(world, "launcher-killed", *COMMON, processes=2))
    assert res.returncode == 0, res.stderr[-3000:]
    assert _records(run, "start")[-1]["resumed_from"].endswith(f"step-{stopped['step']:08d}")
    a, b = _params(world / "runs" / "launcher-ref"), _params(run)
    assert all(torch.equal(a[k], b[k]) for k in a)
