"""What `python -m ant_dist.pretrain` and `python -m ant_dist.relearn` share: run the loop, map its
outcome to an exit code, print one line per outcome (on the main process), tear the process
group down on every path."""

from __future__ import annotations

import os
import sys
from typing import Callable

from ant_dist.runtime.exit_codes import EXIT_BAD_INPUT, EXIT_NONFINITE, EXIT_OK, EXIT_STOPPED, BadInput
from ant_dist.runtime.processes import die_with_launcher
from ant_dist.runtime.teardown import close_process_group
from ant_dist.train.loop import NonFiniteError, Stopped, run
from ant_dist.train.stage import Stage


def is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


def say(message: str) -> None:
    # every process reaches the same outcome; one line is enough
    if is_main_process():
        print(message, file=sys.stderr, flush=True)


def run_stage(cfg, stage: Stage, on_done: Callable[[dict], None], prepare: Callable[[], None] | None = None) -> int:
    """Run `stage`; `prepare` may raise BadInput (TrainError) before anything starts; `on_done(summary)` runs on
    success (on every process: print only on the main one)."""
    die_with_launcher()  # a killed launcher then stops this process like SIGTERM does
    try:
        if prepare is not None:
            prepare()
        summary = run(cfg, stage)
    except NonFiniteError as exc:
        say(f"{stage.name}: stopped: {exc}")
        return EXIT_NONFINITE
    except Stopped as exc:
        say(f"{stage.name}: {exc}")
        return EXIT_STOPPED
    except BadInput as exc:  # TrainError, and a damaged model or feature file met on the way
        say(f"{stage.name}: error: {exc}")
        return EXIT_BAD_INPUT
    finally:
        close_process_group()
    on_done(summary)
    return EXIT_OK
