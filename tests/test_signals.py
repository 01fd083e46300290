import os
import signal

from ant_dist.signals import flag_stop_signals


def test_stop_signals_set_the_flag_and_the_callers_handlers_come_back():
    seen = []
    before = signal.signal(signal.SIGUSR1, lambda n, _f: seen.append(n))
    try:
        with flag_stop_signals() as stop:
            assert stop["signal"] == 0
            os.kill(os.getpid(), signal.SIGUSR1)  # delivered to this (main) thread before kill returns
            assert stop["signal"] == signal.SIGUSR1 and seen == []
        os.kill(os.getpid(), signal.SIGUSR1)
        assert seen == [signal.SIGUSR1]  # the caller's handler is back
    finally:
        signal.signal(signal.SIGUSR1, before)
