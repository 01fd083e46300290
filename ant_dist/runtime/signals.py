"""Stop signals as a flag: the training loop and the embedding pass act on SIGTERM/SIGUSR1 at
their next step boundary (checkpoint or mark rows done, then exit 75) instead of dying mid-write."""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Iterator, Optional

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


@contextmanager
def flag_stop_signals(signals=STOP_SIGNALS, event: Optional[threading.Event] = None) -> Iterator[dict]:
    """Yields {"signal": 0}, set to the signal's number when one arrives (and `event` set, for
    worker threads that wait on it). The previous handlers come back on exit, so a caller running
    this in-process (a notebook, a test) keeps its own. Off the main thread Python cannot install
    handlers: nothing is installed, the flag stays 0."""
    stop = {"signal": 0}

    def flag(number, _frame):
        stop["signal"] = int(number)
        if event is not None:
            event.set()

    on_main = threading.current_thread() is threading.main_thread()
    previous = {s: signal.signal(s, flag) for s in signals} if on_main else {}
    try:
        yield stop
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
