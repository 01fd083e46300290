"""SASRec, the user intent model (paper eqs. 11-12).

Sequences are right-padded: items at positions 0..len-1, padding after. Position ids are
absolute (0..L-1), so padding a batch to a longer L never changes the outputs at real
positions: attention is causal and padded keys are masked out.

Θ_P (the position embeddings) is its own module, `position`, so that re-learning can
re-initialise it while the rest of the user model (Θ_SASRec-P) stays frozen.

`nova=True` gives NOVA's non-invasive attention (Liu et al., AAAI 2021; model/side_info.py): the
item embeddings (IDs) alone form the values and pass from layer to layer; the side information
(the items' feature vectors s_i, and the positions, which NOVA treats as side information too)
enters only the queries and keys, through a gating fusion in every layer,
    F = sum_j alpha_j f_j,  alpha = softmax_j(f_j . w_gate),  f = (x, s, position),
    Q = F W_Q,  K = F W_K,  V = x W_V.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class SASRecConfig:
    hidden: int = 256
    n_layers: int = 2
    n_heads: int = 2
    max_len: int = 50
    dropout: float = 0.5
    # The authors' code uses a feed-forward width equal to the hidden size.
    ffn_mult: int = 1
    # NOVA's non-invasive attention (module docstring): side information in queries and keys only
    nova: bool = False


class Block(nn.Module):
    """Post-norm Transformer block as in RecBole's SASRec: attention, add & norm, FFN, add & norm."""

    def __init__(self, cfg: SASRecConfig):
        super().__init__()
        if cfg.hidden % cfg.n_heads:
            raise ValueError("hidden must be divisible by n_heads")
        self.n_heads = cfg.n_heads
        self.qkv = nn.Linear(cfg.hidden, 3 * cfg.hidden)
        self.out = nn.Linear(cfg.hidden, cfg.hidden)
        self.norm1 = nn.LayerNorm(cfg.hidden, eps=1e-12)
        self.ffn = nn.Sequential(nn.Linear(cfg.hidden, cfg.ffn_mult * cfg.hidden), nn.GELU(),
                                 nn.Linear(cfg.ffn_mult * cfg.hidden, cfg.hidden))
        self.norm2 = nn.LayerNorm(cfg.hidden, eps=1e-12)
        self.dropout = nn.Dropout(cfg.dropout)
        self.attn_dropout = cfg.dropout
        # NOVA's gating fusion: one score vector per layer (zero at start: the features' mean)
        self.gate = nn.Parameter(torch.zeros(cfg.hidden)) if cfg.nova else None

    def project(self, x: torch.Tensor, side: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        """(q, k, v), each (B, heads, L, head_dim); with `side` (B, L, n, d), NOVA's: q and k from the
        gated fusion of x and the side features, v from x alone."""
        b, l, d = x.shape
        if side is None:
            return self.qkv(x).view(b, l, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        feats = torch.cat([x.unsqueeze(-2), side], dim=-2)  # (B, L, 1 + n, d)
        alpha = torch.softmax(feats @ self.gate, dim=-1)   # (B, L, 1 + n)
        fused = (alpha.unsqueeze(-1) * feats).sum(dim=-2)
        w, bias = self.qkv.weight, self.qkv.bias
        q, k = F.linear(fused, w[:2 * d], bias[:2 * d]).view(b, l, 2, self.n_heads, d // self.n_heads) \
            .permute(2, 0, 3, 1, 4)
        v = F.linear(x, w[2 * d:], bias[2 * d:]).view(b, l, self.n_heads, d // self.n_heads).transpose(1, 2)
        return q, k, v

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor, side: torch.Tensor | None = None) -> torch.Tensor:
        b, l, d = x.shape
        q, k, v = self.project(x, side)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                           dropout_p=self.attn_dropout if self.training else 0.0)
        x = self.norm1(x + self.dropout(self.out(a.transpose(1, 2).reshape(b, l, d))))
        return self.norm2(x + self.dropout(self.ffn(x)))


class SASRec(nn.Module):
    def __init__(self, cfg: SASRecConfig):
        super().__init__()
        self.cfg = cfg
        self.position = nn.Embedding(cfg.max_len, cfg.hidden)  # Θ_P
        self.input_norm = nn.LayerNorm(cfg.hidden, eps=1e-12)
        self.input_dropout = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # RecBole's SASRec init: N(0, 0.02) for linear/embedding weights, zero biases.
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
                if isinstance(m, nn.Linear):
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for block in self.blocks:
            if block.gate is not None:
                nn.init.zeros_(block.gate)

    def reset_positions(self) -> None:
        nn.init.normal_(self.position.weight, std=0.02)

    def forward(self, item_emb: torch.Tensor, mask: torch.Tensor, side: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states at every position, (B, L, hidden).

        item_emb: (B, L, hidden) item embeddings; mask: (B, L) bool, True at real items; side:
        (B, L, hidden) the items' side information, for a NOVA model only (and required there).
        """
        b, l, _ = item_emb.shape
        if l > self.cfg.max_len:
            raise ValueError(f"sequence length {l} > max_len {self.cfg.max_len}")
        if (side is not None) != self.cfg.nova:
            raise ValueError("side information goes with a NOVA user model (nova=True), and only with it")
        pos = self.position(torch.arange(l, device=item_emb.device))
        if self.cfg.nova:  # positions are side information too: they reach queries and keys only
            x = self.input_dropout(self.input_norm(item_emb))
            side = torch.stack([side, pos.expand_as(side)], dim=-2)  # (B, L, 2, hidden)
        else:
            x = self.input_dropout(self.input_norm(item_emb + pos))
        causal = torch.ones(l, l, dtype=torch.bool, device=item_emb.device).tril()
        # a query may see earlier real items and itself (so no row is fully masked)
        attn_mask = (causal & (mask.unsqueeze(1) | torch.eye(l, dtype=torch.bool, device=mask.device)))
        attn_mask = attn_mask.unsqueeze(1)  # (B, 1, L, L), broadcast over heads
        for block in self.blocks:
            x = block(x, attn_mask, side)
        return x

    @staticmethod
    def last(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The state at each sequence's last real item, (B, hidden)."""
        idx = (mask.long().sum(dim=1) - 1).clamp(min=0)
        return states[torch.arange(states.shape[0], device=states.device), idx]
