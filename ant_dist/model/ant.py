"""The whole ANT model: an item encoder (IRL, an ID table, or both) and the SASRec user model.
The same class holds the two multi-modal baselines (model/side_info.py): SASRec++ (item_source
"fused": ID table and features fused into one embedding) and NOVA ("nova": ID embeddings, with
the features as side information in the user model's queries and keys); and UniSRec
(model/unisrec.py: "text", its MoE adaptor over the text vector alone; "text+id" adds a target
ID table, UniSRec's transductive fine-tuning).

Parameter groups, addressable by name (`param_groups()`), every parameter in exactly one:
    "irl"      Φ_IRL      the item model (MoE experts, gates, price encoder; SASRec++'s and
                          NOVA's feature layers; UniSRec's text adaptor)
    "position" Θ_P        SASRec's position embeddings
    "sasrec"   Θ_SASRec-P the rest of the user model
    "id"                  per-item ID embeddings (ANT_e, or the pure-ID SASRec baseline)

Features are not parameters and not part of the model's state: a `FeatureBank` holds them
(on the device when they fit, memory-mapped on the CPU otherwise) and is passed in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
from torch import nn

from ant_dist.config import SCORES
from ant_dist.model.irl import IRL, IRLConfig, ItemOutput
from ant_dist.model.sasrec import SASRec, SASRecConfig
from ant_dist.model.side_info import FusedItems, NovaSide
from ant_dist.model.unisrec import TextItems

ITEM_SOURCES = ("irl", "irl+id", "id", "fused", "nova", "text", "text+id")
# the item sources with a per-item ID table over the catalog
ID_TABLE_SOURCES = ("irl+id", "id", "fused", "nova", "text+id")
# the item sources whose item model is a mixture of experts over features, and which can be pre-trained:
# the family is the model a pre-training builds (ANT's IRL or UniSRec's text adaptor)
EXPERT_FAMILIES = {"irl": "irl", "irl+id": "irl", "text": "text", "text+id": "text"}


class FeatureBank:
    """Frozen item features of one catalog: text (N, D_t), image (N, D_m), price_norm (N,) NaN = unknown."""

    def __init__(self, text, image, price_norm, device: str | torch.device = "cpu"):
        def as_tensor(a):
            t = a if isinstance(a, torch.Tensor) else torch.from_numpy(np.asarray(a))
            return t.to(device)

        self.text, self.image, self.price_norm = as_tensor(text), as_tensor(image), as_tensor(price_norm)
        n = len(self.text)
        if len(self.image) != n or len(self.price_norm) != n:
            raise ValueError("text, image and price features must have one row per item")

    def __len__(self) -> int:
        return len(self.text)

    def gather(self, rows: torch.Tensor):
        rows_here = rows.to(self.text.device)
        out = self.text[rows_here], self.image[rows_here], self.price_norm[rows_here]
        return tuple(t.to(rows.device, non_blocking=True) for t in out)


@dataclass
class ANTConfig:
    # "irl": ANT; "irl+id": ANT_e; "id": the pure-ID SASRec baseline; "fused": SASRec++; "nova": NOVA;
    # "text": UniSRec (inductive); "text+id": UniSRec_e (transductive)
    item_source: str = "irl"
    n_items: int = 0  # size of the ID table when item_source uses "id"
    # how a user state h scores an item v, in training and ranking (docs/model.md): "cos",
    # cos(h, v)/tau, the ANT paper's eq. 13; "dot", h . v, SASRec's (and RecBole's), no tau
    score: str = "cos"
    irl: IRLConfig = field(default_factory=IRLConfig)
    sasrec: SASRecConfig = field(default_factory=SASRecConfig)


class ANT(nn.Module):
    def __init__(self, cfg: ANTConfig):
        super().__init__()
        if cfg.item_source not in ITEM_SOURCES:
            raise ValueError(f"item_source must be one of {', '.join(ITEM_SOURCES)}, got {cfg.item_source!r}")
        if cfg.sasrec.nova != (cfg.item_source == "nova"):
            raise ValueError("a NOVA user model (sasrec.nova) goes with item_source=nova, and only with it")
        if cfg.score not in SCORES:
            raise ValueError(f"score must be one of {SCORES}, got {cfg.score!r}")
        if cfg.irl.hidden != cfg.sasrec.hidden:
            raise ValueError("IRL and SASRec hidden sizes must match")
        self.cfg = cfg
        self.irl = IRL(cfg.irl) if "irl" in cfg.item_source else None
        self.side_items = {"fused": FusedItems, "nova": NovaSide, "text": TextItems,
                           "text+id": TextItems}.get(cfg.item_source)
        self.side_items = self.side_items(cfg.irl) if self.side_items is not None else None
        self.id_embedding: Optional[nn.Embedding] = None
        if cfg.item_source in ID_TABLE_SOURCES:
            self.set_id_table(cfg.n_items)
        self.sasrec = SASRec(cfg.sasrec)

    # ------------------------------------------------------------------ items
    def set_id_table(self, n_items: int) -> None:
        """A fresh ID table for a catalog of n_items (a target domain has its own items)."""
        if n_items <= 0:
            raise ValueError("an ID table needs n_items > 0")
        device = next(self.parameters()).device if any(True for _ in self.parameters()) else None
        self.id_embedding = nn.Embedding(n_items, self.cfg.sasrec.hidden, device=device)
        nn.init.normal_(self.id_embedding.weight, std=0.02)

    def encode_items(self, rows: torch.Tensor, bank: Optional[FeatureBank]) -> ItemOutput:
        """Item embeddings (and per-modality parts) for catalog rows."""
        if self.irl is not None:
            if bank is None:
                raise ValueError("this model reads item features: pass a FeatureBank")
            out = self.irl(*bank.gather(rows))
            if self.id_embedding is not None:
                out.embedding = out.embedding + self.id_embedding(rows)
            return out
        e = self.id_embedding(rows) if self.id_embedding is not None else None
        side = None
        if self.side_items is not None:
            if bank is None:
                raise ValueError("this model reads item features: pass a FeatureBank")
            if self.cfg.item_source == "fused":
                e = self.side_items(e, *bank.gather(rows))
            elif self.cfg.item_source in ("text", "text+id"):
                text = self.side_items(bank.gather(rows)[0])
                e = text if e is None else text + e
            else:
                side = self.side_items(*bank.gather(rows))
        zero = torch.zeros_like(e)
        return ItemOutput(e, zero, zero, zero, side=side)

    # ------------------------------------------------------------------ users
    def user_states(self, item_emb: torch.Tensor, mask: torch.Tensor,
                    side: Optional[torch.Tensor] = None) -> torch.Tensor:
        """SASRec's states; `side` (B, L, hidden): NOVA's side information of the same positions."""
        return self.sasrec(item_emb, mask, side=side)

    def sequence_states(self, items: ItemOutput, index: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """User states over sequences of `items` rows: index (B, L) into them, mask (B, L)."""
        keep = mask.unsqueeze(-1)
        side = None if items.side is None else items.side[index] * keep
        return self.user_states(items.embedding[index] * keep, mask, side=side)

    # ------------------------------------------------------------------ groups
    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        groups: dict[str, list[nn.Parameter]] = {"irl": [], "position": [], "sasrec": [], "id": []}
        if self.irl is not None:
            groups["irl"] = list(self.irl.parameters())
        if self.side_items is not None:
            groups["irl"] = list(self.side_items.parameters())
        if self.id_embedding is not None:
            groups["id"] = list(self.id_embedding.parameters())
        groups["position"] = list(self.sasrec.position.parameters())
        pos_ids = {id(p) for p in groups["position"]}
        groups["sasrec"] = [p for p in self.sasrec.parameters() if id(p) not in pos_ids]
        return groups

    def reinit_for_relearning(self) -> None:
        """ANT's adaptation (eqs. 16-17): re-learn Φ_IRL and Θ_P from scratch, freeze Θ_SASRec-P.

        Whatever is re-initialised (item model, ID table, positions) is made trainable again,
        since an earlier `freeze_for_finetuning` may have frozen it.
        """
        for item_model in (self.irl, self.side_items):
            if item_model is not None:
                item_model.reset_parameters()
        if self.id_embedding is not None:
            nn.init.normal_(self.id_embedding.weight, std=0.02)
        self.sasrec.reset_positions()
        groups = self.param_groups()
        for p in groups["irl"] + groups["id"] + groups["position"]:
            p.requires_grad_(True)
        for p in groups["sasrec"]:
            p.requires_grad_(False)

    def freeze_for_finetuning(self) -> None:
        """The FT comparison (Table III): keep everything pre-trained, freeze the user model."""
        for p in self.sasrec.parameters():
            p.requires_grad_(False)
