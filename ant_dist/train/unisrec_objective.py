"""UniSRec's pre-training objective (model/unisrec.py) as ONE module forward, like TrainObjective:
every parameter is reached inside `forward`, so DDP and DeepSpeed synchronise all of them.

Instances: UniSRec trains on (prefix, next item) instances, every prefix of every sequence
(RecBole's augmentation), so an epoch here is an epoch there. One pass over a batch's sequences
gives every prefix's state at once (causal attention: the state at position t sees the prefix
ending at t), and one pass over the sequences' views gives every prefix's view (model/unisrec.py
`drop_items`). The drops come from the batch's `draws`, seeded by (seed, step, user) in the
loader, and the step's choice of view from `view_draw`, seeded by (seed, step): the same on any
number of processes, and replayed by a resumed run. A sequence's prefixes share its drops, so two
prefixes with a dropped item between them have the same item-drop view; the sequence-sequence
task never counts such a twin of a row's positive as a negative. The in-batch columns are every position of the global batch, so the logits are n x n for n
loss positions per process against all processes' (2,048 sequences of 9 items: 18k x 18k).

In-batch negatives are the GLOBAL batch's: each process gathers every process's item vectors
and augmented-view states, with the gradient flowing back to their owners (losses.py's gather),
and scales its loss sum by world / instances in the global batch, so 2 processes with B
sequences each step exactly like 1 process with 2B.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ant_dist.features.catalog import BatchFeatures, CatalogFeatures
from ant_dist.model.ant import ANT
from ant_dist.model.unisrec import drop_items, in_batch_contrastive
from ant_dist.train.losses import _gather_negatives
from ant_dist.train.objective import world_size


def _gather_columns(keys: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Every process's (keys, ids), padded to the largest count with id -1; and where this process's
    columns start. One process: the inputs as they are."""
    if world_size() == 1:
        return keys, ids, 0
    n = torch.tensor([len(ids)], device=ids.device)
    dist.all_reduce(n, op=dist.ReduceOp.MAX)
    pad = int(n) - len(ids)
    all_keys, all_ids = _gather_negatives(F.pad(keys, (0, 0, 0, pad)), F.pad(ids, (0, pad), value=-1),
                                          full_gradient=True)
    return all_keys, all_ids, dist.get_rank() * int(n)


class UniSRecObjective(nn.Module):
    def __init__(self, model: ANT, features: CatalogFeatures, word_drop: Optional[CatalogFeatures] = None,
                 tau: float = 0.07, seq_seq_weight: float = 1e-3, item_drop: float = 0.2,
                 item_drop_coefficient: float = 0.9):
        super().__init__()
        if model.cfg.item_source != "text":
            raise ValueError("the UniSRec objective trains a UniSRec model (item_source=text)")
        self.model = model
        self.features, self.word_drop = features, word_drop  # frozen data, never in the state dict
        self.tau, self.seq_seq_weight, self.item_drop = tau, seq_seq_weight, item_drop
        self.item_drop_coefficient = item_drop_coefficient
        self.fail_at_step = 0
        self.loss_path = "unisrec-in-batch" + ("+gathered" if world_size() > 1 else "")

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        device = next(self.model.parameters()).device
        rows = batch["rows"].to(device)
        feats = batch["feats"] if "feats" in batch else self.features.gather_all(rows)
        items = self.model.encode_items(rows, BatchFeatures(feats, rows, device))
        inputs, targets, mask = batch["inputs"].to(device), batch["targets"].to(device), batch["mask"].to(device)
        at = targets >= 0  # every prefix with a next item is an instance
        states = self.model.sequence_states(items, inputs, mask)[at]
        next_rows = targets[at]
        next_ids = rows[next_rows]

        # the step's view (one for the whole global batch: the draw is the step's, not a process's);
        # its items pass through the item model again, with their own dropout and gate noise
        plain = self.model.encode_items(rows, BatchFeatures(feats, rows, device))
        drop_index, drop_len, last = drop_items(inputs, mask.sum(dim=1), self.item_drop, batch["draws"])
        b, L = inputs.shape
        seq = torch.arange(b, device=device).unsqueeze(1)
        if batch["view_draw"] < self.item_drop_coefficient:  # item drop
            view_mask = torch.arange(L, device=device).unsqueeze(0) < drop_len.unsqueeze(1)
            view_pos = last
            view_all = self.model.sequence_states(plain, drop_index, view_mask)
        else:  # word drop: the items that drew a drop take their word-dropped text's vector
            word = (self.model.encode_items(rows, BatchFeatures(self.word_drop.gather_all(rows), rows, device))
                    if self.word_drop is not None else plain)
            dropped = batch["draws"][:, :L].to(device) < self.item_drop
            dropped[:, 0] = False  # as the item-drop view, the first item stays as it is
            emb = torch.where(dropped.unsqueeze(-1), word.embedding[inputs], plain.embedding[inputs])
            view_pos = torch.arange(L, device=device).expand(b, L)
            view_all = self.model.user_states(emb * mask.unsqueeze(-1), mask)
        view_states = view_all[seq, view_pos][at]
        # the id of the sequence each view state was computed from: prefixes whose views coincide (an
        # item dropped between them) share it, so a row never meets its own positive as a negative
        users = torch.zeros(b, dtype=torch.long, device=device)
        users[:len(batch["users"])] = batch["users"].to(device)
        view_ids = (users.unsqueeze(1) * (L + 1) + view_pos)[at]

        keys, key_ids, start = _gather_columns(items.embedding[next_rows], next_ids)
        positive = start + torch.arange(len(states), device=device)
        seq_item = in_batch_contrastive(states, keys, next_ids, key_ids, positive, self.tau).sum()
        views, key_view_ids, _ = _gather_columns(view_states, view_ids)
        seq_seq = in_batch_contrastive(states, views, next_ids, key_ids, positive, self.tau,
                                       view_ids, key_view_ids).sum()
        if self.fail_at_step and batch["step"] + 1 == self.fail_at_step:
            seq_item = seq_item * torch.tensor(float("nan"), device=device)
        world, n_global = world_size(), max(int(batch["n_global"]), 1)
        rec, ss = seq_item / n_global * world, seq_seq / n_global * world
        return {"loss": rec + self.seq_seq_weight * ss, "rec_sum": seq_item.detach(), "align": ss.detach(),
                "positions": torch.tensor(float(len(states)), device=device)}
