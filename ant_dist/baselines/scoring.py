"""A trained RecBole model scored by our rules: every evaluated user against the whole catalog,
ranked by `eval.metrics.target_ranks` (pessimistic ties, history excluded unless told not to), so
a baseline's per-user values pair with any ANT run's on the same users."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from ant_dist.eval.metrics import DEFAULT_KS, metrics_from_ranks, target_ranks

# the held-out position counted from the end: valid is the second to last item, test the last
CUTS = {"valid": 2, "test": 1}


@dataclass
class Sequences:
    """A packed domain's users as our runs see them (rows are catalog rows)."""
    user_tokens: list        # per user, the original user id (RecBole's token)
    item_tokens: list        # per catalog row, the original item id
    sequences: list          # per user, the time-ordered catalog rows

    @classmethod
    def from_packed(cls, packed) -> "Sequences":
        ends = np.cumsum(packed.lengths)
        starts = ends - packed.lengths
        return cls(packed.user_ids.to_pylist(), packed.item_ids.to_pylist(),
                   [packed.item_rows[a:b] for a, b in zip(starts, ends)])

    def eval_users(self) -> np.ndarray:
        """The users a target run evaluates: those with at least 3 items (train/data.validation_users)."""
        return np.array([u for u, s in enumerate(self.sequences) if len(s) >= 3], dtype=np.int64)


class RecboleScorer:
    """Scores (users x catalog rows) through `model.full_sort_predict`, columns in catalog order."""

    def __init__(self, model, dataset, seqs: Sequences, device: torch.device):
        self.model, self.dataset, self.seqs, self.device = model, dataset, seqs, device
        cfg = dataset.config
        self.uid_field, self.item_seq_field = cfg["USER_ID_FIELD"], cfg["ITEM_ID_FIELD"] + cfg["LIST_SUFFIX"]
        self.len_field = cfg["ITEM_LIST_LENGTH_FIELD"]
        self.max_len = cfg["MAX_ITEM_LIST_LENGTH"]
        # RecBole's internal id of every catalog row (0 is its padding id) and of every user
        self.item_ids = torch.as_tensor(dataset.token2id(cfg["ITEM_ID_FIELD"], seqs.item_tokens), dtype=torch.long)
        self.user_ids = np.asarray(dataset.token2id(self.uid_field, seqs.user_tokens), dtype=np.int64)

    def interaction(self, users: Sequence[int], cut: int):
        """RecBole's input for predicting each user's item at -cut: its user id and the last
        `max_len` items before it, right-padded as RecBole's loaders pad."""
        from recbole.data.interaction import Interaction

        seq = torch.zeros(len(users), self.max_len, dtype=torch.long)
        lengths = torch.zeros(len(users), dtype=torch.long)
        for i, u in enumerate(users):
            hist = self.item_ids[torch.as_tensor(self.seqs.sequences[u][:-cut][-self.max_len:], dtype=torch.long)]
            seq[i, :len(hist)] = hist
            lengths[i] = len(hist)
        return Interaction({self.uid_field: torch.as_tensor(self.user_ids[list(users)]), self.item_seq_field: seq,
                            self.len_field: lengths}).to(self.device)

    @torch.no_grad()
    def scores(self, users: Sequence[int], cut: int) -> torch.Tensor:
        """(len(users), catalog rows) float32 scores, column r = catalog row r."""
        was_training = self.model.training
        self.model.eval()
        try:
            full = self.model.full_sort_predict(self.interaction(users, cut)).view(len(users), -1)
        finally:
            self.model.train(was_training)
        return full[:, self.item_ids.to(full.device)].float().cpu()

    def ranks(self, users: np.ndarray, split: str, exclude_history: bool, batch: int) -> np.ndarray:
        cut = CUTS[split]
        out = []
        for a in range(0, len(users), batch):
            part = [int(u) for u in users[a:a + batch]]
            targets = torch.tensor([int(self.seqs.sequences[u][-cut]) for u in part])
            history = [self.seqs.sequences[u][:-cut] for u in part] if exclude_history else None
            out.append(target_ranks(self.scores(part, cut), targets, history=history).numpy())
        return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)

    def evaluate(self, users: np.ndarray, split: str, exclude_history: bool, batch: int,
                 ks: Sequence[int] = DEFAULT_KS) -> dict:
        """One domain's block of metrics.json: users, mean, per_user, user_ids."""
        per_user = metrics_from_ranks(self.ranks(users, split, exclude_history, batch), ks)
        return {"users": int(len(users)), "mean": {k: float(v.mean()) for k, v in per_user.items()},
                "per_user": {k: v.tolist() for k, v in per_user.items()}, "user_ids": users.tolist()}
