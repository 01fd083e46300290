"""The training objective as ONE module forward: L_r (+ lambda R_c) for a batch.

Why a module: DDP and DeepSpeed all-reduce exactly the gradients produced by the wrapped
module's forward. UniSRec's DDP pre-training called `model.module` outside that forward and
its gradients were never synchronised. Here every parameter, including those the exact loss's
custom autograd function recomputes in its backward, is reached inside `forward`, through this
module's own parameters.

Loss scale: each process holds a share of the global batch's loss positions. The local loss
is `sum of its positions' losses / positions in the GLOBAL batch * world`, so the average that
data parallelism takes over processes is the global batch's mean: 2 processes with B
sequences each step exactly like 1 process with the same 2B.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from ant_dist.features.catalog import BatchFeatures, CatalogFeatures
from ant_dist.model.ant import ANT
from ant_dist.train.losses import NegativeSampler, alignment_loss, full_softmax, sampled_softmax


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class TrainObjective(nn.Module):
    def __init__(self, model: ANT, features: CatalogFeatures, loss: str = "sampled", tau: float = 0.07,
                 align_weight: float = 1e-3, sampler: Optional[NegativeSampler] = None,
                 popularity: Optional[torch.Tensor] = None, in_batch_negatives: bool = False,
                 gather_negatives: bool = True, exact_chunk: int = 8192):
        super().__init__()
        if loss not in ("sampled", "exact"):
            raise ValueError(f"loss must be sampled or exact, got {loss!r}")
        self.model = model
        self.features = features  # not a module: frozen data, never in the state dict
        self.loss, self.tau, self.align_weight = loss, tau, align_weight
        self.sampler, self.popularity = sampler, popularity
        self.in_batch_negatives, self.gather_negatives = in_batch_negatives, gather_negatives
        self.exact_chunk = exact_chunk
        self.fail_at_step = 0  # testing aid: make the loss non-finite at this step
        self.loss_path = ""  # the loss path the last step took (logged: tests check the path they mean)

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        device = next(self.model.parameters()).device
        rows = batch["rows"].to(device)
        # one gather and one item-model pass over the batch's distinct rows (inputs, targets,
        # negatives); with memory-mapped features the loader worker already gathered them
        feats = batch["feats"] if "feats" in batch else self.features.gather_all(rows)
        bank = BatchFeatures(feats, rows, device)
        items = self.model.encode_items(rows, bank)
        mask = batch["mask"].to(device)
        inputs, targets = batch["inputs"].to(device), batch["targets"].to(device)
        states = self.model.sequence_states(items, inputs, mask)
        at = targets >= 0
        h, target_rows = states[at], rows[targets[at]]

        if self.loss == "exact":
            groups = self.model.param_groups()
            params = groups["irl"] + groups["id"]
            path: list[str] = []
            per_position = full_softmax(h, target_rows, lambda r: self.model.encode_items(r, self.features).embedding,
                                        len(self.features), params, tau=self.tau, chunk=self.exact_chunk,
                                        reduction="none", shard_across_ranks=True, path_log=path,
                                        score=self.model.cfg.score)
            self.loss_path = f"exact-{path[0]}"
        else:
            emb = items.embedding

            def batch_item_fn(r: torch.Tensor) -> torch.Tensor:  # catalog rows -> this batch's embeddings
                return emb[torch.searchsorted(rows, r)]

            per_position = sampled_softmax(
                h, target_rows, batch_item_fn, self.sampler, 0, tau=self.tau, logq=True,
                in_batch_negatives=self.in_batch_negatives, popularity=self.popularity,
                gather_across_ranks=self.gather_negatives, gather_full_gradient=True,
                negatives=batch["negatives"].to(device), reduction="none", gather_in_batch=True,
                score=self.model.cfg.score)
            several = world_size() > 1  # in-batch candidates are then the global batch's
            self.loss_path = "sampled" + ("+global-in-batch" if several else "+in-batch") * self.in_batch_negatives \
                + ("+gathered" if self.gather_negatives and several else "")
        rec_sum = per_position.sum()
        if self.fail_at_step and batch["step"] + 1 == self.fail_at_step:
            rec_sum = rec_sum * torch.tensor(float("nan"), device=device)
        world = world_size()
        rec = rec_sum / max(batch["n_global"], 1) * world
        if self.model.irl is not None:
            align = alignment_loss(items.z_image, items.z_text, bank.has_image, tau=self.tau)
        else:  # an ID-only model has no text or image parts to align
            align = torch.zeros((), device=device)
        total = rec + self.align_weight * align if self.align_weight else rec
        return {"loss": total, "rec_sum": rec_sum.detach(), "align": align.detach(),
                "positions": torch.tensor(float(len(h)), device=device)}
