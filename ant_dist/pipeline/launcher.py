"""`accelerate launch` as the demo, the reproduction runner, the benches and the tests start it.

One place for the command line and its environment, because two facts of this machine's
Accelerate are easy to get wrong: on CPU, `--cpu --num_processes 2` silently starts ONE
process, so several CPU processes need `--multi_gpu` with ACCELERATE_USE_CPU=1; and DeepSpeed
must not get ACCELERATE_USE_CPU (Accelerate would quietly fall back to DDP).
"""

from __future__ import annotations

import os
import socket
import sys
from typing import Optional, Sequence


def free_port() -> int:
    """A TCP port nobody listens on now (for the rendezvous of one local run)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(module_args: Sequence[str], processes: int, *, cpu: Optional[bool] = None,
                   config_file: Optional[str] = None, port: Optional[int] = None,
                   threads_per_process: Optional[int] = 1, env: Optional[dict] = None) -> tuple[list[str], dict]:
    """(argv, environment) of `accelerate launch <module_args>` on this machine.

    module_args: what follows the launcher, e.g. ["-m", "ant_dist.pretrain", "out=runs"].
    cpu: run on CPU (default: when torch sees no GPU). config_file: an Accelerate config (its
    engine, e.g. DeepSpeed, is kept: no CPU switch is set for it). threads_per_process: the
    default OMP_NUM_THREADS of each process (None: leave it to torch); an explicit one in `env`
    wins. env: the environment to start from (default: this process's).
    """
    if cpu is None:
        import torch

        cpu = not torch.cuda.is_available()
    env = dict(os.environ if env is None else env)
    argv = [sys.executable, "-m", "accelerate.commands.launch"]
    if config_file:
        argv += ["--config_file", str(config_file)]
    else:
        argv += ["--mixed_precision", "no", "--dynamo_backend", "no"]
        if processes > 1:
            argv.append("--multi_gpu")
        if cpu:
            env["ACCELERATE_USE_CPU"] = "1"  # `--cpu` would silently start one process
    argv += ["--num_processes", str(processes), "--num_machines", "1",
             "--main_process_port", str(port if port is not None else free_port())]
    if cpu and threads_per_process is not None:
        env.setdefault("OMP_NUM_THREADS", str(threads_per_process))
    return [*argv, *module_args], env
