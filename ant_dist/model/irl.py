"""Item representation learning (IRL), the paper's eqs. 3-10.

Frozen-encoder features of an item (text v_t, image v_m) and its sinusoidal price encoding
v_p each pass through a mixture of experts with Gaussian routing; the three results and a
text-image fusion term are summed into the item embedding:

    v = z_t + z_m + z_p + beta * (z_t * z_m)

Fidelity to the authors' code (UniSRec's MoE adaptor): experts apply input dropout, subtract
a learned bias (parametric whitening) and map with a bias-free linear layer; price experts
are plain linear layers with bias. The gate reads the raw feature; during training the gate
logits get Gaussian noise with std softplus(x W_noise) + 0.01 (the reparameterised sample of
eqs. 6-7); in evaluation the mean is used. Gate and noise weights start at zero.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

GATE_NOISE_FLOOR = 0.01


def sinusoidal_price_encoding(price_norm: torch.Tensor, dim: int = 64, omega: float = 50_000.0) -> torch.Tensor:
    """(..., dim) encoding of prices on [0, 100]: dims 2j, 2j+1 = sin, cos(price * omega^(-2j/dim)).

    NaN (unknown) prices give NaN rows; `PriceEncoder` replaces them with a learned vector.
    """
    if dim % 2:
        raise ValueError("price encoding dim must be even")
    j = torch.arange(dim // 2, device=price_norm.device, dtype=torch.float32)
    freq = omega ** (-2.0 * j / dim)
    angles = price_norm.float().unsqueeze(-1) * freq
    return torch.stack((torch.sin(angles), torch.cos(angles)), dim=-1).flatten(-2)


class PriceEncoder(nn.Module):
    """Sinusoidal price encoding; an unknown price (NaN) gets its own learned vector."""

    def __init__(self, dim: int = 64, omega: float = 50_000.0):
        super().__init__()
        self.dim, self.omega = dim, omega
        self.unknown = nn.Parameter(torch.zeros(dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.unknown, std=0.02)

    def forward(self, price_norm: torch.Tensor) -> torch.Tensor:
        known = torch.isfinite(price_norm)
        enc = sinusoidal_price_encoding(torch.where(known, price_norm, torch.zeros_like(price_norm)),
                                        self.dim, self.omega)
        return torch.where(known.unsqueeze(-1), enc, self.unknown.to(enc.dtype))


class MoEAdaptor(nn.Module):
    """n_heads experts over one modality, mixed by a noisy (Gaussian) softmax gate.

    kind="whitening": e_k = (dropout(x) - b_k) W_k   (text, image; eq. 4)
    kind="linear":    e_k = dropout(x) W_k + b_k     (price; eq. 5)
    """

    def __init__(self, in_dim: int, out_dim: int, n_heads: int = 8, kind: str = "whitening",
                 dropout: float = 0.2, gate_noise: bool = True):
        super().__init__()
        self.gate_noise = gate_noise
        if kind not in ("whitening", "linear"):
            raise ValueError(f"unknown expert kind {kind!r}")
        self.kind, self.n_heads = kind, n_heads
        self.weight = nn.Parameter(torch.empty(n_heads, in_dim, out_dim))
        bias_dim = in_dim if kind == "whitening" else out_dim
        self.bias = nn.Parameter(torch.empty(n_heads, bias_dim))
        self.w_gate = nn.Parameter(torch.empty(in_dim, n_heads))
        self.w_noise = nn.Parameter(torch.empty(in_dim, n_heads))
        self.dropout = nn.Dropout(dropout)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Linear's default init for each expert, zero gates (all experts equal at start).
        bound = 1.0 / math.sqrt(self.weight.shape[1])
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.zeros_(self.bias)
        nn.init.zeros_(self.w_gate)
        nn.init.zeros_(self.w_noise)

    def gates(self, x: torch.Tensor) -> torch.Tensor:
        logits = x @ self.w_gate
        if self.training and self.gate_noise:
            std = F.softplus(x @ self.w_noise) + GATE_NOISE_FLOOR
            logits = logits + torch.randn_like(logits) * std
        return torch.softmax(logits, dim=-1)

    def experts(self, x: torch.Tensor) -> torch.Tensor:
        """(N, n_heads, out_dim)."""
        h = self.dropout(x)
        out = torch.einsum("ni,hio->nho", h, self.weight)
        if self.kind == "whitening":
            # (x - b_k) W_k = x W_k - b_k W_k: one batched matmul instead of n_heads subtractions
            return out - torch.einsum("hi,hio->ho", self.bias, self.weight)
        return out + self.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.gates(x).unsqueeze(-1) * self.experts(x)).sum(dim=-2)


class LinearAdaptor(nn.Module):
    """The ANT-MoE ablation: one plain linear projection instead of the mixture."""

    def __init__(self, in_dim: int, out_dim: int, dropout: float = 0.2):
        super().__init__()
        self.proj = nn.Linear(in_dim, out_dim)
        self.dropout = nn.Dropout(dropout)

    def reset_parameters(self) -> None:
        self.proj.reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.dropout(x))


@dataclass
class IRLConfig:
    text_dim: int = 768
    image_dim: int = 1024
    hidden: int = 256
    price_dim: int = 64
    price_omega: float = 50_000.0
    n_heads: int = 8
    dropout: float = 0.2
    beta: float = 0.3
    # Gaussian gate noise while training (eqs. 6-7); off only for exactness tests of the trainer
    gate_noise: bool = True
    # ablations (paper Table IV): a disabled modality gets a zero input vector
    use_text: bool = True
    use_image: bool = True
    use_price: bool = True
    use_moe: bool = True
    use_fusion: bool = True


@dataclass
class ItemOutput:
    embedding: torch.Tensor  # v, (N, hidden)
    z_text: torch.Tensor
    z_image: torch.Tensor
    z_price: torch.Tensor
    side: Optional[torch.Tensor] = None  # NOVA's side information s_i (model/side_info.py), else None


class IRL(nn.Module):
    """Φ_IRL: the whole item model, from (text, image, price_norm) features to embeddings."""

    def __init__(self, cfg: IRLConfig):
        super().__init__()
        self.cfg = cfg

        def adaptor(in_dim: int, kind: str) -> nn.Module:
            if cfg.use_moe:
                return MoEAdaptor(in_dim, cfg.hidden, cfg.n_heads, kind, cfg.dropout, cfg.gate_noise)
            return LinearAdaptor(in_dim, cfg.hidden, cfg.dropout)

        self.price_encoder = PriceEncoder(cfg.price_dim, cfg.price_omega)
        self.text = adaptor(cfg.text_dim, "whitening")
        self.image = adaptor(cfg.image_dim, "whitening")
        self.price = adaptor(cfg.price_dim, "linear")

    def reset_parameters(self) -> None:
        for m in self.modules():
            if m is not self and hasattr(m, "reset_parameters"):
                m.reset_parameters()

    def forward(self, text: torch.Tensor, image: torch.Tensor, price_norm: torch.Tensor) -> ItemOutput:
        cfg = self.cfg
        text = text.float() if cfg.use_text else torch.zeros_like(text, dtype=torch.float32)
        image = image.float() if cfg.use_image else torch.zeros_like(image, dtype=torch.float32)
        v_p = self.price_encoder(price_norm)
        if not cfg.use_price:
            v_p = torch.zeros_like(v_p)
        z_t, z_m, z_p = self.text(text), self.image(image), self.price(v_p)
        v = z_t + z_m + z_p
        if cfg.use_fusion:
            v = v + cfg.beta * (z_t * z_m)
        return ItemOutput(v, z_t, z_m, z_p)
