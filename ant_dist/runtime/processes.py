"""No process outliving the one that started it: pool and loader workers, training ranks under a
launcher, the reproduction runner's children (Linux `PR_SET_PDEATHSIG`; a no-op elsewhere)."""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import warnings
from typing import Optional

_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def die_with_parent(expected_parent: Optional[int] = None, signum: int = signal.SIGKILL) -> None:
    """Ask Linux to send `signum` (SIGKILL by default) to this process when its parent dies. A
    no-op elsewhere.

    Meant for the first thing a forked worker runs, e.g.
    `ctx.Pool(n, initializer=die_with_parent, initargs=(os.getpid(),))`.
    `expected_parent` is the pid of the process that forked us, read *in the parent*: if the
    parent died between fork and this call, we were already reparented, the death signal will
    never come, and we kill ourselves instead. Leave it None when the parent is not the process
    that asked for the worker (a forkserver), which only skips that check.

    Caveats: the signal fires when the parent *thread* that forked us exits, not the parent
    process, so fork workers from a thread that lives as long as they should (a Pool forks its
    first workers from the thread creating it, replacements from its own handler thread, which
    lives as long as the pool). Never raises: an exception in a Pool initializer would make the
    pool respawn workers forever.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)  # the libc already loaded into this process
        prctl = libc.prctl
        prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
        prctl.restype = ctypes.c_int
        if prctl(_PR_SET_PDEATHSIG, int(signum), 0, 0, 0) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
    except (OSError, AttributeError) as exc:
        warnings.warn(f"die_with_parent: prctl(PR_SET_PDEATHSIG) failed ({exc}); this worker may "
                      f"outlive its parent", RuntimeWarning)
        return
    if expected_parent is not None and os.getppid() != expected_parent:
        os.kill(os.getpid(), signum)  # the parent is already gone: do what the signal would


def die_with_launcher() -> None:
    """Under `accelerate launch` / torchrun, have the kernel send this process SIGTERM when the
    launcher dies (an OOM kill, a closed terminal, a notebook restart), so that it stops like on
    any stop signal: a checkpoint at the next step boundary, exit 75. Without it the training
    processes are re-parented to init and go on training, holding the run folder's lock.

    SIGTERM, not SIGKILL: the work since the last checkpoint is saved. A process started without
    a launcher is left alone (its parent is a shell or a notebook, whose end is not a reason)."""
    if "TORCHELASTIC_RUN_ID" not in os.environ and "LOCAL_RANK" not in os.environ:
        return
    # read before the request: if the launcher died in between, we were already re-parented
    die_with_parent(os.getppid(), signal.SIGTERM)


def _worker_dies_with(parent_pid: Optional[int], worker_id: int) -> None:
    die_with_parent(parent_pid)


def loader_worker_init():
    """A DataLoader `worker_init_fn` that makes each loader worker die with this process.

    Forked loader workers share the main process's lock descriptor; torch's own watchdog notices
    a dead parent only within ~5 s, and until then a rerun would be refused. Under a forkserver
    we are not the workers' parent, so the parent check is skipped there.
    """
    import functools
    import multiprocessing

    parent = None if multiprocessing.get_start_method(allow_none=True) == "forkserver" else os.getpid()
    return functools.partial(_worker_dies_with, parent)
