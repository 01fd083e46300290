"""Stop signals as a flag: the training loop and the embedding pass act on SIGTERM/SIGUSR1 at
their next step boundary (checkpoint or mark rows done, then exit 75) instead of dying mid-write."""

from __future__ import annotations

import signal
from contextlib import contextmanager
from typing import Iterator

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


@contextmanager
def flag_stop_signals(signals=STOP_SIGNALS) -> Iterator[dict]:
    """Yields {"signal": 0}, set to the signal's number when one arrives. The previous handlers
    come back on exit, so a caller running this in-process (a notebook, a test) keeps its own."""
    stop = {"signal": 0}
    previous = {s: signal.signal(s, lambda n, _frame: stop.__setitem__("signal", int(n))) for s in signals}
    try:
        yield stop
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
