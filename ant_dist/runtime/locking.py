"""One writer per output folder, and no worker outliving the process that started it.

Two ways a folder gets two writers, both seen in practice with the packer:
- the same command started twice (a resubmitted job, a second terminal);
- a killed run whose forked workers keep running and keep writing, while its rerun writes the
  same `*.tmp` paths.

`DirectoryLock` stops the first: the writer holds `fcntl.flock` on `<folder>/.lock` for the
whole run, and a second writer is refused with a `LockedError` that says who holds it. The
kernel drops the lock when the holder dies, however it dies, so a crash never leaves a stale
lock behind. `processes.die_with_parent` stops the second: used as a pool initializer, it makes the
kernel SIGKILL each worker when the process that started it dies.

How the two fit together: flock belongs to the open file description, which `fork()` shares
with the children, so forked workers (DataLoader workers) hold the lock too: if the parent is
SIGKILLed while they live, the folder stays locked until the last of them is gone, a matter of
milliseconds with `die_with_parent`. `O_CLOEXEC` keeps the descriptor out of programs started
with exec, spawned pool workers included (the packer's): they never hold the lock, and the
kernel kills them as their parent exits.
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import sys
import time
from pathlib import Path
from typing import Optional

try:
    import fcntl
except ImportError:  # Windows: no flock; DirectoryLock does nothing there (not enforced)
    fcntl = None

LOCK_NAME = ".lock"


class LockedError(RuntimeError):
    """The folder is locked by another process. `holder` is what that process wrote, if read."""

    def __init__(self, message: str, holder: Optional[dict] = None):
        super().__init__(message)  # message only in args: the error pickles (sent across ranks)
        self.holder = holder


class DirectoryLock:
    """An exclusive, non-blocking lock on a folder: `<folder>/.lock`, held with flock.

    Use as `with DirectoryLock(folder, "packer"):` (or `exclusive_dir_lock`), or call
    `acquire()` and later `release()`. While held, the lock file says who holds it (pid, host,
    start time, command), for the error message of whoever is refused; on release it is emptied.
    The file itself is never deleted: deleting it would let a late opener lock a new file while
    an earlier one still holds the old, unlinked one, i.e. two writers.
    """

    def __init__(self, folder: str | os.PathLike, what: str):
        self.folder = Path(folder)
        self.what = what  # what the folder's user is, for the message: "packer", "embedding pass"
        self.path = self.folder / LOCK_NAME
        self._fd: Optional[int] = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> "DirectoryLock":
        """Take the lock or raise LockedError at once (never waits)."""
        if self._fd is not None:
            raise RuntimeError(f"{self.path} is already held by this DirectoryLock")
        self.folder.mkdir(parents=True, exist_ok=True)
        if fcntl is None:
            return self
        # No O_TRUNC: a refused opener must not wipe the holder's details.
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise LockedError(_refusal(self.folder, self.what, holder), holder) from None
        except OSError as exc:  # e.g. a network filesystem mounted without flock support
            os.close(fd)
            raise OSError(exc.errno, f"cannot lock {self.path}: {exc.strerror} "
                                     f"(does this filesystem support flock?)") from exc
        self._fd = fd
        try:
            info = {"pid": os.getpid(), "host": socket.gethostname(),
                    "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                    "command": shlex.join(getattr(sys, "orig_argv", sys.argv))}
            data = (json.dumps(info) + "\n").encode()
            os.pwrite(fd, data, 0)  # one write, then cut whatever an earlier holder left after it
            os.ftruncate(fd, len(data))
        except BaseException:
            self.release()
            raise
        return self

    def release(self) -> None:
        """Give the lock up (idempotent)."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            try:
                os.ftruncate(fd, 0)  # while still ours: no "held by" details of a finished run linger
            except OSError:
                pass  # only cosmetic
            # An explicit unlock frees the lock even if forked children still share the
            # descriptor; closing alone would leave it held by them.
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def __enter__(self) -> "DirectoryLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def exclusive_dir_lock(folder: str | os.PathLike, what: str) -> DirectoryLock:
    """Context manager: `with exclusive_dir_lock(out, "packer"): ...` holds `<out>/.lock`."""
    return DirectoryLock(folder, what)


def acquire_dir_lock(folder: str | os.PathLike, what: str) -> DirectoryLock:
    """Take the lock now; call `.release()` on the result when done."""
    return DirectoryLock(folder, what).acquire()


def _read_holder(fd: int) -> Optional[dict]:
    """What the holder wrote, or None (not written yet, or caught half-written)."""
    try:
        holder = json.loads(os.pread(fd, 64 * 1024, 0).decode("utf-8", "replace"))
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def _refusal(folder: Path, what: str, holder: Optional[dict]) -> str:
    if not holder:
        who = f"see {folder / LOCK_NAME}"
    else:
        pid, host = holder.get("pid"), holder.get("host", "?")
        who = f"pid {pid} on host {host}, started {holder.get('started', '?')}"
        if host == socket.gethostname() and isinstance(pid, int) and not _alive(pid):
            # Without die_with_parent (non-Linux) an orphaned worker keeps the lock.
            who += ", which has exited: a process it started still holds the lock"
        command = str(holder.get("command", ""))
        if command:
            who += f": {command[:300]}"
    message = f"{folder} is in use by another {what} ({who}): wait for it to finish or stop it"
    return message.replace("\n", " ")  # one line, whatever the command was


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True
