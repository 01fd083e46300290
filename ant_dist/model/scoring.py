"""The scoring function of a user state h and an item vector v (docs/model.md, "Scores"):
`cos` = cos(h, v) / tau (the ANT paper, eq. 13), `dot` = h . v (SASRec's). Training, evaluation
and serving all score through these, so the ranking a user is served is the one trained.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ant_dist.config import SCORES


def normalise(x: torch.Tensor) -> torch.Tensor:
    """Unit vectors in float32: a cosine score is the dot product of these."""
    return F.normalize(x.float(), dim=-1)


def score_vectors(x: torch.Tensor, score: str = "cos") -> torch.Tensor:
    """The float32 vectors whose dot product is the score: unit vectors for cos, x itself for dot."""
    if score == "cos":
        return normalise(x)
    if score == "dot":
        return x.float()
    raise ValueError(f"score must be one of {SCORES}, got {score!r}")


def temperature(score: str, tau: float) -> float:
    """The divisor of the logits: tau for cos; 1 for dot (a dot product learns its own scale)."""
    return tau if score == "cos" else 1.0
