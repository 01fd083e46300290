"""Our text embeddings for the text-based baselines, so they see the same item texts as ANT
(the paper: "the same text, image and price embeddings in ANT and all the baseline methods if
applicable"), read from the domain's feature table and never recomputed:

- FDSA: its feature stream reads the frozen text vector of each item through one trained linear
  projection to the hidden size, in place of RecBole's token-embedding layer over attribute ids.
- S3-Rec: its self-supervised tasks predict discrete item attributes; an item's attributes are its
  3 nearest of K k-means clusters of the text vectors (K = sqrt(items) clamped to 8..256 unless
  set), so items with similar texts share attributes.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

TEXT_CLUSTER_FIELD = "text_cluster"
ATTRIBUTES_PER_ITEM = 3


class TextFeatureLayer(nn.Module):
    """Drop-in for FDSA's `feature_embed_layer`: (sparse, dense) dicts, the dense part one feature
    per item position, the projected text vector ([batch, len, 1, hidden])."""

    def __init__(self, table: np.ndarray, hidden: int):
        super().__init__()
        # data, not weights: rebuilt from the feature table, so not saved with the model
        self.register_buffer("table", torch.as_tensor(np.asarray(table, dtype=np.float32)), persistent=False)
        self.proj = nn.Linear(self.table.shape[1], hidden)

    def forward(self, user_idx, item_idx):
        del user_idx  # FDSA asks for item features only
        return {"item": None}, {"item": self.proj(self.table[item_idx]).unsqueeze(-2)}


def table_in_recbole_order(text: np.ndarray, recbole_ids: np.ndarray, n_recbole: int) -> np.ndarray:
    """Row i = the text vector of RecBole item id i (row 0, its padding id, stays zero)."""
    out = np.zeros((n_recbole, text.shape[1]), dtype=np.float32)
    out[np.asarray(recbole_ids)] = text
    return out


def use_text_features(model, text: np.ndarray, recbole_ids: np.ndarray, n_recbole: int) -> None:
    """FDSA: replace its attribute-embedding layer by our text vectors (on the model's device)."""
    device = next(model.parameters()).device
    layer = TextFeatureLayer(table_in_recbole_order(text, recbole_ids, n_recbole), model.hidden_size)
    model.feature_embed_layer = layer.to(device)


def attribute_count(n_items: int, requested: int) -> int:
    return requested if requested > 0 else int(np.clip(round(np.sqrt(n_items)), 8, 256))


def text_cluster_tokens(text: np.ndarray, k: int, seed: int) -> list[str]:
    """Per item, its ATTRIBUTES_PER_ITEM nearest k-means clusters as a token_seq field ("c3 c17 c5")."""
    from sklearn.cluster import KMeans

    k = min(k, len(text))
    x = np.asarray(text, dtype=np.float64)
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    km = KMeans(n_clusters=k, n_init=3, random_state=seed).fit(x)
    nearest = np.argsort(km.transform(x), axis=1, kind="stable")[:, :min(ATTRIBUTES_PER_ITEM, k)]
    return [" ".join(f"c{c}" for c in row) for row in nearest]
