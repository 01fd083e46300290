"""UniSRec's item model and its two pre-training tasks (Hou et al., "Towards Universal Sequence
Representation Learning for Recommender Systems", KDD 2022; the ANT paper's [3]); docs/model.md,
"UniSRec", states every choice the paper leaves open.

Item model (`TextItems`): the item's frozen text vector x_i (our text table: the same encoder
output ANT reads) through UniSRec's MoE adaptor with parametric whitening,
    v_i = sum_k g_k (x_i - b_k) W_k,   g = softmax(x_i W_g [+ noise while training]),
which is ANT's text branch (model/irl.py `MoEAdaptor`, kind="whitening") with no image, price
or fusion term. Transductive fine-tuning (UniSRec_e, item_source "text+id") adds a target ID
embedding to v_i. The user model is our SASRec, and items are scored by cos(s, v)/tau, as in
UniSRec's code (temperature 0.07).

Pre-training (eqs. 9-11 of the UniSRec paper): over a batch of (prefix, next item) instances
(every prefix of the batch's sequences, RecBole's augmentation) with normalised sequence states
s_j and item vectors v_j,
    L_SI = -mean_j log exp(s_j.v_j/tau) / sum_j' exp(s_j.v_j'/tau)          (sequence-item)
    L_SS = -mean_j log exp(s_j.s~_j/tau) / sum_j' exp(s_j.s~_j'/tau)         (sequence-sequence)
    L = L_SI + lambda L_SS
where s~_j is the state of an augmented view of prefix j. As UniSRec's data transform, each step
takes one of two views for the whole batch: with probability `item_drop_coefficient` (0.9) the
item-drop view (each item dropped with probability `item_drop`, the first always kept), else the
word-drop view (the items that draw a drop keep their place but take the vector of their
word-dropped text, from `word_drop_features`, written by `ant_dist.embed text_word_drop=...`:
UniSRec's feat2CLS). L_SI and L_SS are means over the batch's instances, as UniSRec's loss.mean().
In-batch columns whose instance has the same next item as the row's (other than the row's own)
are left out of the denominators: UniSRec's code sets their logit to 0 (exp = 1); we drop them,
so a duplicate positive is never a negative.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ant_dist.model.irl import IRLConfig, MoEAdaptor


class TextItems(nn.Module):
    """UniSRec's item model: v_i = MoE-adaptor(x_i) over the text vector (parametric whitening)."""

    def __init__(self, cfg: IRLConfig):
        super().__init__()
        self.text = MoEAdaptor(cfg.text_dim, cfg.hidden, cfg.n_heads, "whitening", cfg.dropout, cfg.gate_noise)

    def reset_parameters(self) -> None:
        self.text.reset_parameters()

    def forward(self, text: torch.Tensor, image=None, price_norm=None) -> torch.Tensor:
        return self.text(text.float())


def in_batch_contrastive(queries: torch.Tensor, keys: torch.Tensor, query_ids: torch.Tensor,
                         key_ids: torch.Tensor, positive: torch.Tensor, tau: float,
                         query_views: Optional[torch.Tensor] = None,
                         key_views: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-row loss -log softmax(q_j . k / tau)[positive_j] over normalised q and k.

    queries (n, d); keys (m, d), the batch's columns (every process's, when gathered); key_ids (m,)
    the next item of each column's instance, -1 for padding (never a candidate); positive (n,) the
    column of each row's own positive. A column with the same id as the row's, other than its
    positive, is left out (module doc). With query_views / key_views (ids of the sequence a key
    was computed from), a column computed from the row's own positive sequence is left out too:
    it is the positive itself, not a negative.
    """
    q = F.normalize(queries.float(), dim=-1)
    k = F.normalize(keys.float(), dim=-1)
    logits = q @ k.T / tau
    cols = torch.arange(len(keys), device=keys.device)
    own = cols.unsqueeze(0) == positive.unsqueeze(1)
    drop = (key_ids.unsqueeze(0) == query_ids.unsqueeze(1)) | (key_ids < 0).unsqueeze(0)
    if query_views is not None:
        drop = drop | (key_views.unsqueeze(0) == query_views.unsqueeze(1))
    logits = logits.masked_fill(drop & ~own, float("-inf"))
    return F.cross_entropy(logits, positive, reduction="none")


def drop_items(index: torch.Tensor, length: torch.Tensor, p: float,
               uniforms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """UniSRec's item-drop view of right-padded sequences: item t of a row (t < length) is dropped
    when uniforms[row, t] < p, except the first, which is always kept; the kept ones move left in
    order. index (B, L) item indices; length (B,) >= 1; uniforms (B, >= L) draws in [0, 1).

    Returns (index', length', last): the view padded with index 0, its lengths, and for every
    position t the view's position of the last kept item at or before t. The view of a prefix
    ending at t is the view's prefix ending at last[t] (the drops are per item), so under causal
    attention one pass over the view gives the states of every prefix's view."""
    b, l = index.shape
    pos = torch.arange(l, device=index.device).unsqueeze(0)
    real = pos < length.unsqueeze(1)
    keep = real & ((uniforms[:, :l].to(index.device) >= p) | (pos == 0))
    last = torch.cumsum(keep.long(), dim=1) - 1
    out = torch.zeros_like(index)
    rows = torch.arange(b, device=index.device).unsqueeze(1).expand(b, l)
    out[rows[keep], last[keep]] = index[keep]
    return out, keep.sum(dim=1), last
