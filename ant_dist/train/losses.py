"""Losses: exact full-catalog softmax (chunked), sampled softmax with logQ correction, and the
text-image alignment regulariser. The recommendation score is the model's `score`: `cos`,
cosine similarity over a temperature as in the ANT paper (eq. 13), s(h, v) = cos(h, v) / tau;
or `dot`, the plain dot product h . v of SASRec and RecBole (tau is not used). The alignment
regulariser is always a cosine over tau (eq. 14).

Item embeddings come from a callable `item_fn(rows) -> (len(rows), d)` (the IRL applied to
those rows' features), so the full-catalog loss never materialises all item embeddings, nor
the (queries x catalog) logits: peak memory is O(queries x chunk).
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ant_dist.model.scoring import normalise, score_vectors, temperature

ItemFn = Callable[[torch.Tensor], torch.Tensor]



def scaled_logits(hn: torch.Tensor, en: torch.Tensor, tau: float) -> torch.Tensor:
    """(N, d) x (M, d) unit vectors -> (N, M) logits cos / tau, in float32.

    The precision rule (docs/model.md): the matrix product may run in bf16 under autocast (it
    holds the FLOPs); everything after it (the division by tau, the logQ correction, masking,
    log-sum-exp, the target logit) runs in float32. bf16 keeps 8 significant bits: a cosine
    divided by tau = 0.07 and then offset by log(K q) would lose whole units of the logit's
    last digits if the softmax arithmetic stayed in bf16."""
    return (hn @ en.T).float() / tau


class _AutocastState:
    """The autocast setting of the forward, replayed in a custom backward: the engine runs
    backward outside the forward's autocast context (and on CUDA in another thread), and the
    recomputed chunks must be the forward's numbers, bf16 products included."""

    def __init__(self, device: torch.device):
        self.device_type = device.type
        self.enabled = torch.is_autocast_enabled(device.type)
        self.dtype = torch.get_autocast_dtype(device.type)

    def __call__(self):
        return torch.autocast(self.device_type, dtype=self.dtype, enabled=self.enabled)


class _RNGSnapshot:
    """Saves and restores the RNG state, so a chunk recomputed in backward draws the same
    dropout masks and gate noise as in forward (as torch.utils.checkpoint does)."""

    def __init__(self, device: torch.device):
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        self.device = device

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)


class _FullSoftmax(torch.autograd.Function):
    """Exact per-position loss, streamed over catalog rows [start, end) in chunks.

    across_ranks=False: one process, [start, end) is the whole catalog.
    across_ranks=True: h and targets hold ALL ranks' positions and [start, end) is this rank's
    slice. The ranks combine their partial log-sum-exps (all-reduce of the max, then of the
    rescaled sums) and target logits (each target lies in one slice). In backward a rank's
    incoming gradient covers its own positions only; an all-reduce gives every rank all of them,
    so each returns its slice's parameter gradients (data parallelism averages them: the sum
    over slices / world) and a partial gradient for every position (the all-gather's backward
    sums the partials)."""

    @staticmethod
    def forward(ctx, h, targets, item_fn, start, end, chunk, tau, across_ranks, *params):
        # h and item_fn's output are already score vectors (score_vectors)
        n = h.shape[0]
        running_max = torch.full((n,), -math.inf, device=h.device)
        running_sum = torch.zeros(n, device=h.device)
        target_logit = torch.zeros(n, device=h.device)
        snapshots = []
        for a in range(start, end, chunk):
            b = min(a + chunk, end)
            snapshots.append(_RNGSnapshot(h.device))
            rows = torch.arange(a, b, device=h.device)
            with torch.no_grad():
                e = item_fn(rows)
                logits = scaled_logits(h, e, tau)
                # streamed log-sum-exp: rescale the running sum to the new maximum
                new_max = torch.maximum(running_max, logits.max(dim=1).values)
                running_sum = running_sum * torch.exp(running_max - new_max) + \
                    torch.exp(logits - new_max[:, None]).sum(dim=1)
                running_max = new_max
                here = (targets >= a) & (targets < b)
                idx = here.nonzero(as_tuple=True)[0]
                target_logit[idx] = logits[idx, targets[idx] - a]
        if across_ranks:
            global_max = running_max.clone()
            dist.all_reduce(global_max, op=dist.ReduceOp.MAX)
            running_sum = torch.where(torch.isfinite(running_max), running_sum * torch.exp(running_max - global_max),
                                      torch.zeros_like(running_sum))  # an empty slice adds nothing
            dist.all_reduce(running_sum)
            dist.all_reduce(target_logit)
            running_max = global_max
        lse = running_max + torch.log(running_sum)
        ctx.save_for_backward(h, targets, lse)
        ctx.item_fn, ctx.start, ctx.end, ctx.chunk, ctx.tau = item_fn, start, end, chunk, tau
        ctx.across_ranks, ctx.snapshots = across_ranks, snapshots
        ctx.autocast = _AutocastState(h.device)
        ctx.params = params  # leaves: safe to keep on ctx
        return lse - target_logit

    @staticmethod
    def backward(ctx, grad_loss):
        h, targets, lse = ctx.saved_tensors
        if ctx.across_ranks:
            grad_loss = grad_loss.contiguous().clone()
            dist.all_reduce(grad_loss)  # each position's gradient comes from the rank that owns it
        params = ctx.params
        grad_h = torch.zeros_like(h)
        grad_params = [torch.zeros_like(p) if p.requires_grad else None for p in params]
        live = [p for p in params if p.requires_grad]
        rng_now = _RNGSnapshot(h.device)
        for i, a in enumerate(range(ctx.start, ctx.end, ctx.chunk)):
            b = min(a + ctx.chunk, ctx.end)
            ctx.snapshots[i].restore()
            rows = torch.arange(a, b, device=h.device)
            with torch.enable_grad(), ctx.autocast():
                e = ctx.item_fn(rows)
            ed = e.detach()
            with ctx.autocast():
                logits = scaled_logits(h, ed, ctx.tau)
            # d loss_i / d logit_ij = softmax_ij - [j == target_i], scaled by the incoming grad
            g = torch.exp(logits - lse[:, None]) * grad_loss[:, None]
            here = (targets >= a) & (targets < b)
            idx = here.nonzero(as_tuple=True)[0]
            g[idx, targets[idx] - a] -= grad_loss[idx]
            g = g / ctx.tau
            with ctx.autocast():  # the two products may run in bf16, their sums stay float32
                grad_h += (g @ ed).float()
                grad_e = (g.T @ h).to(e.dtype)
            if live:
                grads = torch.autograd.grad(e, live, grad_outputs=grad_e, allow_unused=True)
                for k, gp in zip([j for j, p in enumerate(params) if p.requires_grad], grads):
                    if gp is not None:
                        grad_params[k] += gp
        rng_now.restore()
        return (grad_h, None, None, None, None, None, None, None, *grad_params)


# the exact loss materialises (positions x items) logits when they stay below this many (128 MB fp32)
DENSE_MAX_LOGITS = 2**25


# ----------------------------------------------------------------------------- exact, sharded
def _sharded_full_softmax(h: torch.Tensor, targets: torch.Tensor, item_fn: ItemFn, n_items: int,
                          params: Sequence[torch.nn.Parameter], tau: float, chunk: int, most: int,
                          score: str) -> torch.Tensor:
    """Per-position exact losses of this rank's positions; this rank runs the item model over
    its 1/world slice of the catalog only. Ranks may hold different numbers of positions:
    `most`, the largest, is what every rank pads to."""
    world, rank = dist.get_world_size(), dist.get_rank()
    pad = most - h.shape[0]
    h_pad = F.pad(score_vectors(h, score), (0, 0, 0, pad))  # padding rows: zero vectors, never selected below
    t_pad = F.pad(targets, (0, pad), value=-1)
    h_all = _AllGatherWithGrad.apply(h_pad)
    rows = [torch.empty_like(t_pad) for _ in range(world)]
    dist.all_gather(rows, t_pad.contiguous())
    per_rank = -(-n_items // world)
    start, end = min(rank * per_rank, n_items), min((rank + 1) * per_rank, n_items)
    loss_all = _FullSoftmax.apply(h_all, torch.cat(rows), item_fn, start, end, chunk, tau, True, *params)
    return loss_all[rank * most: rank * most + h.shape[0]]


def full_softmax(h: torch.Tensor, targets: torch.Tensor, item_fn: ItemFn, n_items: int,
                 params: Sequence[torch.nn.Parameter], tau: float = 0.07, chunk: int = 8192,
                 reduction: str = "mean", shard_across_ranks: bool = False,
                 path_log: Optional[list] = None, score: str = "cos") -> torch.Tensor:
    """Exact cross entropy of the score s(h, v_target) (cos/tau, or dot) against ALL n_items items.

    h: (N, d) user states (any N: flatten positions first); targets: (N,) catalog rows.
    `params` are the parameters `item_fn` depends on: the backward recomputes each chunk's
    item embeddings and returns their gradients (they must be listed to receive them).
    shard_across_ranks: under torch.distributed, every rank passes its own positions and runs
    the item model over 1/world of the catalog only (collective: all ranks must call it).
    `path_log`, if given, receives the path taken: "dense", "chunked" or "split" (across ranks).
    """
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= n_items):
        raise ValueError("targets must be catalog rows in [0, n_items)")
    sharded = shard_across_ranks and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    positions = h.shape[0]
    if sharded:  # every rank must take the same path: decide on the largest rank's positions
        most = torch.tensor([positions], device=h.device)
        dist.all_reduce(most, op=dist.ReduceOp.MAX)
        positions = int(most)
    dense = n_items <= chunk and positions * n_items <= DENSE_MAX_LOGITS
    if path_log is not None:
        path_log.append("dense" if dense else "split" if sharded else "chunked")
    if dense:
        # a small catalog (a target domain): the dense logits are cheap, and plain autograd skips
        # the chunked path's second pass over the item model in backward (same value, same gradients)
        return naive_full_softmax(h, targets, item_fn(torch.arange(n_items, device=h.device)), tau, reduction,
                                  score)
    tau = temperature(score, tau)

    def vectors(rows: torch.Tensor) -> torch.Tensor:
        return score_vectors(item_fn(rows), score)

    if sharded:
        return _reduce(_sharded_full_softmax(h, targets, vectors, n_items, params, tau, chunk, positions, score),
                       reduction)
    loss = _FullSoftmax.apply(score_vectors(h, score), targets, vectors, 0, n_items, chunk, tau, False, *params)
    return _reduce(loss, reduction)


def naive_full_softmax(h: torch.Tensor, targets: torch.Tensor, item_emb: torch.Tensor,
                       tau: float = 0.07, reduction: str = "mean", score: str = "cos") -> torch.Tensor:
    """Reference: dense logits over the whole catalog (for tests and small catalogs)."""
    logits = scaled_logits(score_vectors(h, score), score_vectors(item_emb, score), temperature(score, tau))
    return F.cross_entropy(logits, targets, reduction=reduction)


def _reduce(loss: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    if reduction == "none":
        return loss
    raise ValueError(f"unknown reduction {reduction!r}")


# ----------------------------------------------------------------------------- sampled
class NegativeSampler:
    """Draws negatives from the full catalog: uniform, or proportional to (popularity + smoothing)^alpha.

    The smoothing keeps every item drawable: an item with no training interactions would
    otherwise have q = 0, never appear as a negative, and the sampled loss could not approach
    the exact one however large K grows.
    """

    def __init__(self, n_items: int, popularity: Optional[torch.Tensor] = None, alpha: float = 0.0,
                 smoothing: float = 1.0):
        if popularity is None or alpha == 0.0:
            self.probs = torch.full((n_items,), 1.0 / n_items)
        else:
            if smoothing < 0:
                raise ValueError("smoothing must be >= 0")
            w = (popularity.double().clamp(min=0) + smoothing) ** alpha
            if w.sum() <= 0:
                raise ValueError("popularity must have a positive entry")
            self.probs = (w / w.sum()).float()
        self.n_items = n_items

    def sample(self, k: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        return torch.multinomial(self.probs, k, replacement=True, generator=generator)


class _AllGatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient for each slice (an all-reduce), so a
    rank's negatives get the gradient from all ranks' rows. Written out rather than
    torch.distributed.nn's, whose backward path differs per backend; this one works on gloo."""

    @staticmethod
    def forward(ctx, x):
        world = dist.get_world_size()
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        ctx.rank, ctx.n = dist.get_rank(), len(x)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n]


def _gather_negatives(neg_emb: torch.Tensor, neg_rows: torch.Tensor,
                      full_gradient: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """All ranks' negatives (every rank must draw the same number).

    full_gradient=False: the gradient flows only into this rank's slice (the other ranks'
    negatives are constants here; common and cheaper, but not the global batch's gradient).
    full_gradient=True: each slice gets the sum over ranks, so with data-parallel gradient
    averaging and a loss scaled by world size the update equals one big batch's.
    """
    world, rank = dist.get_world_size(), dist.get_rank()
    rows = [torch.empty_like(neg_rows) for _ in range(world)]
    dist.all_gather(rows, neg_rows.contiguous())
    if full_gradient:
        return _AllGatherWithGrad.apply(neg_emb), torch.cat(rows)
    embs = [torch.empty_like(neg_emb) for _ in range(world)]
    dist.all_gather(embs, neg_emb.detach().contiguous())
    embs[rank] = neg_emb
    return torch.cat(embs), torch.cat(rows)


def _gather_batch_targets(pos_emb: torch.Tensor, targets: torch.Tensor,
                          full_gradient: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Every rank's targets and their embeddings, for in-batch negatives over the GLOBAL batch.
    Ranks may hold different numbers of positions: each pads to the largest with row -1, and the
    padding is dropped after the gather. The gradient goes back as `_gather_negatives` sends it."""
    n = torch.tensor([len(targets)], device=targets.device)
    dist.all_reduce(n, op=dist.ReduceOp.MAX)
    pad = int(n) - len(targets)
    rows_pad = F.pad(targets, (0, pad), value=-1)
    emb_pad = F.pad(pos_emb, (0, 0, 0, pad))
    emb_all, rows_all = _gather_negatives(emb_pad, rows_pad, full_gradient)
    real = rows_all >= 0
    return emb_all[real], rows_all[real]


def sampled_softmax(h: torch.Tensor, targets: torch.Tensor, item_fn: ItemFn, sampler: NegativeSampler,
                    n_negatives: int, tau: float = 0.07, logq: bool = True,
                    in_batch_negatives: bool = False, popularity: Optional[torch.Tensor] = None,
                    gather_across_ranks: bool = False, generator: Optional[torch.Generator] = None,
                    reduction: str = "mean", negatives: Optional[torch.Tensor] = None,
                    gather_full_gradient: bool = False, gather_in_batch: bool = False,
                    score: str = "cos") -> torch.Tensor:
    """Cross entropy over {target} + negatives shared by the batch, sampled from the catalog.

    With logQ correction, negative j's logit becomes s_j - log(K q_j): then
    exp(s_target) + sum_j exp(s_j)/(K q_j) estimates the full partition function, and the loss
    approaches the exact full softmax as K grows. A negative equal to a row's own target (an
    accidental hit) is masked out for that row. `in_batch_negatives` adds the batch's targets
    as extra negatives (mixed negative sampling); they are drawn from the data distribution,
    estimated by `popularity`, and the correction uses the mixture log(K q_j + B p_j).
    `gather_across_ranks` all-gathers every rank's sampled negatives (K x world in total);
    `gather_full_gradient` sends each rank's gradient back to the negatives' owners (and to the
    in-batch targets' owners). `gather_in_batch` makes the in-batch negatives every rank's targets
    (the global batch, B = all ranks' positions), so 2 processes compute what 1 process with the
    whole batch computes; independent of `gather_across_ranks` (shared negatives need no gather).
    `negatives` (K,) are pre-drawn catalog rows (e.g. by a data-loader worker) used instead of
    drawing `n_negatives` from `sampler`; `sampler.probs` still gives q for the correction.
    """
    device = h.device
    if negatives is not None:
        neg_rows = negatives.to(device)
        n_negatives = len(neg_rows)
    else:
        neg_rows = sampler.sample(n_negatives, generator).to(device)
    # one item-model pass over the distinct rows of negatives and targets
    uniq, inverse = torch.cat([neg_rows, targets]).unique(return_inverse=True)
    emb = score_vectors(item_fn(uniq), score)[inverse]
    tau = temperature(score, tau)
    neg_emb, pos_emb = emb[:n_negatives], emb[n_negatives:]
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if gather_across_ranks and distributed:
        neg_emb, neg_rows = _gather_negatives(neg_emb, neg_rows, gather_full_gradient)
    k = len(neg_rows)
    q = sampler.probs.to(device)
    hn = score_vectors(h, score)
    pos_logit = (hn * pos_emb).sum(-1, keepdim=True) / tau
    cand_rows, cand_emb = neg_rows, neg_emb
    if in_batch_negatives:
        batch_emb, batch_rows = pos_emb, targets
        if gather_in_batch and distributed:
            batch_emb, batch_rows = _gather_batch_targets(pos_emb, targets, gather_full_gradient)
        cand_rows = torch.cat([neg_rows, batch_rows])
        cand_emb = torch.cat([neg_emb, batch_emb])
    neg_logit = scaled_logits(hn, cand_emb, tau)
    if logq:
        expected = k * q[cand_rows]
        if in_batch_negatives:
            if popularity is None:
                raise ValueError("in_batch_negatives with logq needs item popularity")
            p = popularity.to(device).double()
            # a row's own target is masked, so only the other B - 1 in-batch draws can be its negatives
            expected = expected + max(len(batch_rows) - 1, 0) * (p / p.sum())[cand_rows].float()
        neg_logit = neg_logit - torch.log(expected)
    neg_logit = neg_logit.masked_fill(cand_rows[None, :] == targets[:, None], -math.inf)
    logits = torch.cat([pos_logit, neg_logit], dim=1)
    loss = torch.logsumexp(logits, dim=1) - pos_logit[:, 0]
    return _reduce(loss, reduction)


# ----------------------------------------------------------------------------- alignment
def alignment_loss(z_image: torch.Tensor, z_text: torch.Tensor, has_image: torch.Tensor,
                   tau: float = 0.07) -> torch.Tensor:
    """R_c (eq. 14): image -> text InfoNCE over the given (unique) items that have images.

    q_i = exp(cos(z_m_i, z_t_i)/tau) / sum_i' exp(cos(z_m_i, z_t_i')/tau); returns mean -log q_i,
    or 0 when fewer than two items have images.
    """
    keep = has_image.bool()
    if int(keep.sum()) < 2:
        return z_image.sum() * 0.0
    zm, zt = normalise(z_image[keep]), normalise(z_text[keep])
    logits = scaled_logits(zm, zt, tau)
    return F.cross_entropy(logits, torch.arange(len(zm), device=logits.device))
