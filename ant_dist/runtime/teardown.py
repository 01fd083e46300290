"""Clean exit of a distributed process.

Tear the process group down before the interpreter exits. Left to interpreter finalization,
gloo's worker threads can still hold work objects with Python references, and destroying them
then aborts the process (SIGABRT, "terminate called without an active exception"; see
pytorch/pytorch#179291). It was seen once in CI, in a rank of a resumed 2-process run.
"""

from __future__ import annotations


def close_process_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
