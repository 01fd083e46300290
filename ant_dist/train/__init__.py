"""The training loop shared by pre-training and re-learning, and its parts.

    data.py        sequences of every domain (Arrow via `datasets`), the joint catalog, the
                   per-epoch plan of which process trains which sequence, batch building
    features.py    the joint catalog's frozen features, on the device or memory-mapped
    objective.py   the loss as one nn.Module forward (so DDP/DeepSpeed see every gradient)
    evaluate.py    leave-one-out validation with the chunked full-catalog ranker
    checkpoint.py  atomic checkpoints, resume, the exported model/
    tracking.py    W&B / TensorBoard through Accelerate, metrics.jsonl
    loop.py        the loop itself
"""


class TrainError(RuntimeError):
    """Bad input or state that stops a run with a clear message (the entry point prints it)."""
