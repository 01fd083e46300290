"""Full-ranking evaluation: Recall@k and NDCG@k over every item of the catalog.

Conventions (docs/model.md):
- The rank of the target is pessimistic: every other ranked item whose score is >= the
  target's, within the tie tolerance, counts as ranked above it, so ties never flatter a model
  (a model that scores all items equally gets the worst rank, deterministically).
- Ties do not depend on the hardware: a score within `TIE_RTOL * scale` below the target's is a
  tie, `scale = max(1, |target score|)`, and in the chunked ranker also at least
  `|h| * |v_target|` (1 for cosines; the size of a dot product's rounding error). TIE_RTOL =
  2^-22 (2 float32 ulps at 1.0, 4 just below it): about 2.4e-7 for a cosine. Two copies of one
  item vector can score a few ulps apart when the kernel accumulates columns in different orders
  (BLAS does for odd chunk widths; GPUs may anywhere), so exact equality made a duplicate a tie on
  one machine and not on another. The chunked ranker computes its scores in float64 from the
  vectors (normalised in float64 for cos), so its own arithmetic adds ~1e-16, far inside the
  tolerance; the tolerance absorbs a few ulps of float32 rounding of the vectors upstream. Scores
  further apart than that are ranked by value. Its limit: two items with the same features give
  the same vector only if the item model computes them alike; a deep item model run on batches
  of different shapes may put them further apart than a few ulps on some kernels. `target_ranks`
  ranks the scores it is given: their own rounding (float32 or bf16 from a caller) is theirs.
- NaN counts against the target: a NaN target score ranks every other ranked item above it
  (the worst rank), and an item with a NaN score counts as above the target.
- History exclusion: by default a user's earlier items (other than the target itself) are
  removed from the ranking, as the ANT code does; RecBole does not. `exclude_history=False`
  gives RecBole's setting. History rows outside 0..n_items-1 (padding) are ignored.
- Only columns 0..n_items-1 are ranked (padding columns never are).
- Padding users: a negative target gets rank -1 from the rank functions (so ranks stay
  aligned with their users); `full_ranking_metrics` drops those users, and
  `metrics_from_ranks` refuses negative ranks. A target >= n_items is an error.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import stats

from ant_dist.config import METRIC_KS, SCORES

DEFAULT_KS = METRIC_KS
PADDING_RANK = -1  # the rank returned for a user whose target is negative (padding)
TIE_RTOL = 2.0 ** -22  # 2 float32 ulps at 1.0: scores this close to the target's are ties (module docstring)


def _check_targets(targets: torch.Tensor, n_items: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(targets as long with padding clamped to row 0, mask of real targets)."""
    t = targets.long()
    if bool((t >= n_items).any()):
        raise ValueError(f"a target is >= n_items ({n_items}): only columns 0..n_items-1 are ranked")
    real = t >= 0
    return t.clamp(min=0), real


def _exclusion_pairs(history: Sequence[Sequence[int]], t: torch.Tensor, real: torch.Tensor, n_items: int,
                     device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat (user, row) pairs to remove from the ranking: each real user's history rows within the
    catalog, minus the target itself (padding rows and padding users contribute nothing)."""
    if len(history) != len(t):
        raise ValueError(f"history has {len(history)} users, targets {len(t)}")
    users, rows = [], []
    for u, hist in enumerate(history):
        if not real[u]:
            continue
        keep = sorted({int(r) for r in hist if 0 <= int(r) < n_items} - {int(t[u])})
        users += [u] * len(keep)
        rows += keep
    return (torch.tensor(users, dtype=torch.long, device=device),
            torch.tensor(rows, dtype=torch.long, device=device))


def tie_floor(target_score: torch.Tensor, scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The lowest score that still ties with each target: target - TIE_RTOL * max(1, |target|,
    scale), `scale` the size of the score's rounding error where the vectors are known."""
    size = target_score.abs().clamp(min=1.0)
    if scale is not None:
        size = torch.maximum(size, scale)
    return target_score - TIE_RTOL * size


def _count_above(s: torch.Tensor, target_score: torch.Tensor, ranked: torch.Tensor,
                 scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per user, the ranked items that count above the target: score >= the target's within the
    tie tolerance (ties against the target), a NaN score, or anything at all when the target's
    score is NaN."""
    above = (s >= tie_floor(target_score, scale)[:, None]) | s.isnan() | target_score.isnan()[:, None]
    return (above & ranked).sum(dim=1)


def target_ranks(scores: torch.Tensor, targets: torch.Tensor, n_items: Optional[int] = None,
                 history: Optional[Sequence[Sequence[int]]] = None) -> torch.Tensor:
    """0-based pessimistic rank of each user's target among the catalog's items.

    scores: (U, >= n_items); targets: (U,), negative = padding user (rank -1); history: per user,
    catalog rows to exclude (the target itself is never excluded). Every other ranked item with
    a score >= the target's (within the tie tolerance), or a NaN score, counts above it; a NaN
    target score gets the worst rank (all other ranked items above it).
    """
    n_items = scores.shape[1] if n_items is None else n_items
    s = scores[:, :n_items].double()
    t, real = _check_targets(targets.to(s.device), n_items)
    users = torch.arange(len(t), device=s.device)
    ranked = torch.ones_like(s, dtype=torch.bool)
    if history is not None:
        ex_u, ex_r = _exclusion_pairs(history, t, real, n_items, s.device)
        ranked[ex_u, ex_r] = False
    ranked[users, t] = False  # the target does not count against itself
    ranks = _count_above(s, s[users, t], ranked)
    return torch.where(real, ranks, torch.full_like(ranks, PADDING_RANK))


def chunked_target_ranks(users: torch.Tensor, targets: torch.Tensor,
                         item_fn: Callable[[torch.Tensor], torch.Tensor], n_items: int,
                         history: Optional[Sequence[Sequence[int]]] = None, chunk: int = 8192,
                         tie_eps: Optional[float] = None, score: str = "cos") -> torch.Tensor:
    """`target_ranks` of the model's scores (`score`: cos or dot, docs/model.md) without
    materialising (U x n_items): streams item chunks.

    Same rules as `target_ranks` (pessimistic ties within TIE_RTOL, NaN against the target,
    rank -1 for a negative target). Scores are computed in float64 from vectors (for cos,
    normalised in float64), whatever autocast is active, so the ranks of a given model do not depend on the
    chunk width, the kernel, the number of threads or the training precision; two copies of an
    item vector tie with each other on any hardware. `item_fn(rows)` returns each row's vector.
    `tie_eps` is accepted for backward compatibility and ignored (TIE_RTOL is the rule).
    """
    del tie_eps  # superseded by TIE_RTOL (module docstring)
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
    if n_items < 1:
        raise ValueError("chunked_target_ranks needs n_items >= 1")
    device = users.device
    t, real = _check_targets(targets.to(device), n_items)
    with torch.autocast(device.type, enabled=False):  # float64 ranks, whatever the caller's autocast
        return _chunked_ranks(users, t, real, item_fn, n_items, history, min(chunk, n_items), score)


def _chunked_ranks(users: torch.Tensor, t: torch.Tensor, real: torch.Tensor,
                   item_fn: Callable[[torch.Tensor], torch.Tensor], n_items: int,
                   history: Optional[Sequence[Sequence[int]]], width: int, score: str) -> torch.Tensor:
    device = users.device

    def vectors(x: torch.Tensor) -> torch.Tensor:  # float64 vectors whose dot product is the score
        return F.normalize(x.double(), dim=-1) if score == "cos" else x.double()

    un = vectors(users)
    n_users = len(t)

    def block_vectors(rows: torch.Tensor) -> torch.Tensor:
        return vectors(item_fn(rows))

    target_score = torch.empty(n_users, dtype=torch.float64, device=device)
    scale = torch.empty(n_users, dtype=torch.float64, device=device)  # |h| |v_target|: 1 for cos
    for a in range(0, n_users, width):
        b = min(a + width, n_users)
        v = block_vectors(t[a:b])
        target_score[a:b] = (un[a:b] * v).sum(dim=-1)
        scale[a:b] = un[a:b].norm(dim=-1) * v.norm(dim=-1)

    ex_u = ex_r = None
    if history is not None:
        ex_u, ex_r = _exclusion_pairs(history, t, real, n_items, device)
    ranks = torch.zeros(n_users, dtype=torch.long, device=device)
    for start in range(0, n_items, width):
        end = min(start + width, n_items)
        s = un @ block_vectors(torch.arange(start, end, device=device)).T
        ranked = torch.ones_like(s, dtype=torch.bool)
        here = ((t >= start) & (t < end)).nonzero(as_tuple=True)[0]
        ranked[here, t[here] - start] = False  # the target does not count against itself
        if ex_u is not None:
            sel = (ex_r >= start) & (ex_r < end)
            ranked[ex_u[sel], ex_r[sel] - start] = False
        ranks += _count_above(s, target_score, ranked, scale)
    return torch.where(real, ranks, torch.full_like(ranks, PADDING_RANK))


def metrics_from_ranks(ranks: torch.Tensor | np.ndarray, ks: Sequence[int] = DEFAULT_KS) -> dict[str, np.ndarray]:
    """Per-user Recall@k and NDCG@k (one relevant item: IDCG = 1).

    Padding users (rank -1) must be dropped first: a negative rank is refused rather than
    counted as a hit.
    """
    r = np.asarray(ranks.cpu() if isinstance(ranks, torch.Tensor) else ranks, dtype=np.int64)
    if (r < 0).any():
        raise ValueError("negative rank (a padding user?): drop users with a negative target first")
    out: dict[str, np.ndarray] = {}
    for k in ks:
        hit = r < k
        out[f"recall@{k}"] = hit.astype(np.float64)
        out[f"ndcg@{k}"] = np.where(hit, 1.0 / np.log2(r + 2.0), 0.0)
    return out


def full_ranking_metrics(scores: torch.Tensor, targets: torch.Tensor, ks: Sequence[int] = DEFAULT_KS,
                         n_items: Optional[int] = None, history: Optional[Sequence[Sequence[int]]] = None,
                         exclude_history: bool = True) -> dict[str, np.ndarray]:
    """Per-user metrics from a score matrix; users with a negative (padding) target are dropped
    (the arrays hold the real users only, in order).

    `history` (each user's earlier items) is excluded from the ranking unless
    `exclude_history=False` (RecBole's setting).
    """
    ranks = target_ranks(scores, targets, n_items, history if exclude_history else None)
    return metrics_from_ranks(ranks[targets.to(ranks.device) >= 0], ks)


def summarise(per_user: dict[str, np.ndarray]) -> dict[str, float]:
    return {k: float(np.mean(v)) if len(v) else float("nan") for k, v in per_user.items()}


def paired_t_test(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Two-sided paired t-test of per-user values of two runs on the same users (scipy)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError("paired test needs the same users in both runs")
    res = stats.ttest_rel(a, b)
    return {"t": float(res.statistic), "p": float(res.pvalue), "mean_diff": float(np.mean(a - b))}
