"""The item side of two multi-modal baselines the paper re-implemented (docs/model.md, "SASRec++ and
NOVA"), on the same text, image and price features as ANT. Both are trained from scratch on a
target (relearn mode=scratch item_repr=fused|nova) with our SASRec as the user model.

- SASRec++ (Rashed et al., "Context and attribute-aware sequential recommendation via
  cross-attention", RecSys 2022; the paper's [13]): SASRec whose item embedding fuses the item's
  ID embedding with its features by concatenation and one linear layer,
      e_i = W [m_i ; t_i ; g_i ; p_i] + b,
  the same e_i as the input of the user model and as the item side of the score.
- NOVA (Liu et al., "Non-invasive self-attention for side information fusion in sequential
  recommendation", AAAI 2021; the paper's [12]): the ID embedding m_i is the item's only
  representation (values and scores); side information s_i = W_s [t_i ; g_i ; p_i] + b_s enters
  the attention's queries and keys only (model/sasrec.py, `nova`).

m_i: the item's ID embedding (ANT's `id_embedding`); t_i, g_i: the frozen text and image
features; p_i: the sinusoidal price encoding, a learned vector for an unknown price (model/irl.py).
"""

from __future__ import annotations

import torch
from torch import nn

from ant_dist.model.irl import IRLConfig, PriceEncoder


def feature_dim(cfg: IRLConfig) -> int:
    return cfg.text_dim + cfg.image_dim + cfg.price_dim


class SideFeatures(nn.Module):
    """[t ; g ; p]: the features as one vector per item (only the price encoding has parameters)."""

    def __init__(self, cfg: IRLConfig):
        super().__init__()
        self.price = PriceEncoder(cfg.price_dim, cfg.price_omega)

    def forward(self, text: torch.Tensor, image: torch.Tensor, price_norm: torch.Tensor) -> torch.Tensor:
        return torch.cat([text.float(), image.float(), self.price(price_norm)], dim=-1)


class FusedItems(nn.Module):
    """SASRec++'s item embedding: e_i = W [m_i ; t_i ; g_i ; p_i] + b."""

    def __init__(self, cfg: IRLConfig):
        super().__init__()
        self.features = SideFeatures(cfg)
        self.proj = nn.Linear(cfg.hidden + feature_dim(cfg), cfg.hidden)

    def reset_parameters(self) -> None:
        self.features.price.reset_parameters()
        self.proj.reset_parameters()

    def forward(self, id_emb: torch.Tensor, text, image, price_norm) -> torch.Tensor:
        return self.proj(torch.cat([id_emb, self.features(text, image, price_norm)], dim=-1))


class NovaSide(nn.Module):
    """NOVA's item side information: s_i = W_s [t_i ; g_i ; p_i] + b_s."""

    def __init__(self, cfg: IRLConfig):
        super().__init__()
        self.features = SideFeatures(cfg)
        self.proj = nn.Linear(feature_dim(cfg), cfg.hidden)

    def reset_parameters(self) -> None:
        self.features.price.reset_parameters()
        self.proj.reset_parameters()

    def forward(self, text, image, price_norm) -> torch.Tensor:
        return self.proj(self.features(text, image, price_norm))
