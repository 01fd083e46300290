import os
import signal
import time

from ant_dist.runtime.signals import flag_stop_signals


def _wait_until(condition) -> bool:
    # a handler runs in the main thread at the interpreter's next check: wait on the condition
    deadline = time.monotonic() + 10
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.001)
    return condition()


def test_stop_signals_set_the_flag_and_the_callers_handlers_come_back():
    seen = []
    before = signal.signal(signal.SIGUSR1, lambda n, _f: seen.append(n))
    try:
        with flag_stop_signals() as stop:
            assert stop["signal"] == 0
            os.kill(os.getpid(), signal.SIGUSR1)
            assert _wait_until(lambda: stop["signal"] == signal.SIGUSR1)
            assert seen == []
        os.kill(os.getpid(), signal.SIGUSR1)
        assert _wait_until(lambda: seen == [signal.SIGUSR1])  # the caller's handler is back
    finally:
        signal.signal(signal.SIGUSR1, before)
