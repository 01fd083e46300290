"""ant_dist.runtime.locking with real processes: a held folder is refused, and workers die with their parent."""

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from ant_dist.runtime.locking import LockedError, acquire_dir_lock, exclusive_dir_lock

# Takes the lock on argv[1] and holds it until its stdin is closed.
HOLDER = """
import sys
from ant_dist.runtime.locking import exclusive_dir_lock
with exclusive_dir_lock(sys.argv[1], "test holder"):
    sys.stdin.read()
"""

# Forks a child that asks to die with its parent and then idles forever; prints the child's pid.
FORKER = """
import os, signal, sys
from ant_dist.runtime.processes import die_with_parent
parent = os.getpid()
child = os.fork()
if child == 0:
    die_with_parent(parent)
    while True:
        signal.pause()
print(child, flush=True)
sys.stdin.read()
"""


def wait_for(condition, what: str, timeout: float = 60.0):
    """Poll `condition` until it returns something truthy (returned), or fail after `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.01)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")


def lock_pid(folder):
    """The pid written in `<folder>/.lock`, or None (no file, empty, half-written)."""
    try:
        return json.loads((folder / ".lock").read_text())["pid"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait()


@pytest.mark.parametrize("holder_ends", ["exits", "is_killed"])
def test_held_folder_is_refused_naming_the_holder_then_free_once_it_ends(tmp_path, holder_ends):
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], stdin=subprocess.PIPE)
    try:
        wait_for(lambda: lock_pid(tmp_path) == proc.pid or proc.poll() is not None, "the holder to lock")
        assert proc.poll() is None, "the holder died"
        with pytest.raises(LockedError) as refused:
            with exclusive_dir_lock(tmp_path, "tester"):
                pytest.fail("locked a folder that another process holds")
        message = str(refused.value)
        assert message.startswith(f"{tmp_path} is in use by another tester (pid {proc.pid} on host ")
        assert message.endswith("wait for it to finish or stop it") and "\n" not in message
        assert refused.value.holder["pid"] == proc.pid
        assert lock_pid(tmp_path) == proc.pid, "a refused opener must leave the holder's details alone"
        if holder_ends == "exits":
            proc.stdin.close()
        else:
            proc.send_signal(signal.SIGKILL)  # the kernel drops a dead holder's lock: never stale
        proc.wait(timeout=60)
    finally:
        kill(proc)
    with exclusive_dir_lock(tmp_path, "tester") as lock:
        assert lock_pid(tmp_path) == os.getpid()
        assert lock.held
    assert (tmp_path / ".lock").read_text() == ""  # released: no details of a finished run linger


def test_two_locks_in_one_process_conflict_and_release_is_idempotent(tmp_path):
    folder = tmp_path / "new" / "folder"  # created on demand
    first = acquire_dir_lock(folder, "packer")
    try:
        with pytest.raises(LockedError, match=f"in use by another packer \\(pid {os.getpid()} "):
            acquire_dir_lock(folder, "packer")
    finally:
        first.release()
    first.release()
    assert not first.held
    second = acquire_dir_lock(folder, "packer")  # free again
    second.release()
    assert sorted(p.name for p in folder.iterdir()) == [".lock"]


linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")


@linux_only
def test_die_with_parent_kills_the_child_when_the_parent_is_killed():
    proc = subprocess.Popen([sys.executable, "-c", FORKER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    child = None
    try:
        line = proc.stdout.readline()  # EOF (''), not a hang, if the forker dies first
        child = int(line)
        assert alive(child)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        wait_for(lambda: not alive(child), "the child to die with its parent", timeout=30)
    finally:
        kill(proc)
        if child is not None and alive(child):
            os.kill(child, signal.SIGKILL)


@linux_only
def test_die_with_parent_when_the_parent_is_already_gone():
    # The parent dying between fork and the prctl call looks like a different parent pid.
    proc = subprocess.run([sys.executable, "-c", "from ant_dist.runtime.processes import die_with_parent\n"
                           "die_with_parent(-1)\nprint('still alive')"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == -signal.SIGKILL and "still alive" not in proc.stdout
    proc = subprocess.run([sys.executable, "-c", f"from ant_dist.runtime.processes import die_with_parent\n"
                           f"die_with_parent({os.getpid()})\nprint('still alive')"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0 and "still alive" in proc.stdout
