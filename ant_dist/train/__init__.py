"""The training loop shared by pre-training and re-learning, and its parts.

    loop.py        the loop itself, top to bottom
    engine.py      Accelerate, DeepSpeed and torch.compile set-up
    session.py     a run's progress, checkpoints and validations
    stage.py       what a stage plugs into the loop (model, checks, selection, finish)
    data.py        sequences of every domain (Arrow via `datasets`), the joint catalog, the
                   per-epoch plan of which process trains which sequence, batch building
    losses.py      exact (chunked) and sampled softmax, text-image alignment
    objective.py   the loss as one nn.Module forward (so DDP/DeepSpeed see every gradient)
    evaluate.py    leave-one-out validation with the chunked full-catalog ranker
    checkpoint.py  atomic checkpoints, resume
    selection.py   best validation step, early stopping
    target.py      the target model of each adaptation mode
    tracking.py    W&B / TensorBoard through Accelerate, metrics.jsonl
    entry.py       a run's outcome -> exit code
"""

from ant_dist.runtime.exit_codes import BadInput


class TrainError(BadInput):
    """Bad input or state that stops a run with a clear message (the entry point prints it)."""
