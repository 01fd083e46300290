"""Full-ranking evaluation: Recall@k and NDCG@k over every item of the catalog.

Conventions (docs/model.md):
- The rank of the target is pessimistic: every other item with a score >= the target's
  counts as ranked above it, so ties never flatter a model (a model that scores all items
  equally gets the worst rank, deterministically).
- History exclusion: by default a user's earlier items (other than the target itself) are
  removed from the ranking, as the ANT code does; RecBole does not. `exclude_history=False`
  gives RecBole's setting.
- Only columns 0..n_items-1 are ranked (padding columns never are); users whose target is
  negative (padding) are skipped.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np
import torch
from scipy import stats

from .losses import normalise

DEFAULT_KS = (10, 20, 50)


def target_ranks(scores: torch.Tensor, targets: torch.Tensor, n_items: Optional[int] = None,
                 history: Optional[Sequence[Sequence[int]]] = None) -> torch.Tensor:
    """0-based pessimistic rank of each user's target among the catalog's items.

    scores: (U, >= n_items); targets: (U,); history: per user, catalog rows to exclude
    (the target itself is never excluded).
    """
    n_items = scores.shape[1] if n_items is None else n_items
    s = scores[:, :n_items].float().clone()
    if history is not None:
        for u, rows in enumerate(history):
            if len(rows):
                s[u, torch.as_tensor(list(rows), dtype=torch.long)] = -torch.inf
    t = targets.long()
    target_score = scores[torch.arange(len(t)), t].float()
    s[torch.arange(len(t)), t] = -torch.inf  # the target does not count against itself
    return (s >= target_score[:, None]).sum(dim=1)


def chunked_target_ranks(users: torch.Tensor, targets: torch.Tensor,
                         item_fn: Callable[[torch.Tensor], torch.Tensor], n_items: int,
                         history: Optional[Sequence[Sequence[int]]] = None, chunk: int = 8192,
                         tie_eps: float = 1e-5) -> torch.Tensor:
    """`target_ranks` of cosine scores without materialising (U x n_items): streams item chunks.

    The target's score is computed on its own, so a float rounding difference of the same
    score computed inside a chunk could break a true tie either way; scores within
    `tie_eps` of the target's count as ties, i.e. against the target (pessimistic).
    """
    un = normalise(users)
    t = targets.long()
    target_score = (un * normalise(item_fn(t))).sum(-1)
    ranks = torch.zeros(len(t), dtype=torch.long, device=users.device)
    excl = None
    if history is not None:
        excl = [torch.as_tensor(sorted(set(int(r) for r in rows) - {int(t[u])}), dtype=torch.long)
                for u, rows in enumerate(history)]
    for start in range(0, n_items, chunk):
        end = min(start + chunk, n_items)
        e = normalise(item_fn(torch.arange(start, end, device=users.device)))
        s = un @ e.T
        idx = ((t >= start) & (t < end)).nonzero(as_tuple=True)[0]
        s[idx, t[idx] - start] = -torch.inf
        if excl is not None:
            for u, rows in enumerate(excl):
                r = rows[(rows >= start) & (rows < end)]
                if len(r):
                    s[u, r - start] = -torch.inf
        ranks += (s >= (target_score - tie_eps)[:, None]).sum(dim=1)
    return ranks


def metrics_from_ranks(ranks: torch.Tensor | np.ndarray, ks: Sequence[int] = DEFAULT_KS) -> dict[str, np.ndarray]:
    """Per-user Recall@k and NDCG@k (one relevant item: IDCG = 1)."""
    r = np.asarray(ranks.cpu() if isinstance(ranks, torch.Tensor) else ranks, dtype=np.int64)
    out: dict[str, np.ndarray] = {}
    for k in ks:
        hit = r < k
        out[f"recall@{k}"] = hit.astype(np.float64)
        out[f"ndcg@{k}"] = np.where(hit, 1.0 / np.log2(r + 2.0), 0.0)
    return out


def full_ranking_metrics(scores: torch.Tensor, targets: torch.Tensor, ks: Sequence[int] = DEFAULT_KS,
                         n_items: Optional[int] = None, history: Optional[Sequence[Sequence[int]]] = None,
                         exclude_history: bool = True) -> dict[str, np.ndarray]:
    """Per-user metrics from a score matrix; users with a negative (padding) target are dropped.

    `history` (each user's earlier items) is excluded from the ranking unless
    `exclude_history=False` (RecBole's setting).
    """
    valid = targets >= 0
    hist = None if history is None or not exclude_history else [h for h, v in zip(history, valid.tolist()) if v]
    ranks = target_ranks(scores[valid], targets[valid], n_items, hist)
    return metrics_from_ranks(ranks, ks)


def summarise(per_user: dict[str, np.ndarray]) -> dict[str, float]:
    return {k: float(np.mean(v)) if len(v) else float("nan") for k, v in per_user.items()}


def paired_t_test(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Two-sided paired t-test of per-user values of two runs on the same users (scipy)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError("paired test needs the same users in both runs")
    res = stats.ttest_rel(a, b)
    return {"t": float(res.statistic), "p": float(res.pvalue), "mean_diff": float(np.mean(a - b))}
