"""Leave-one-out evaluation over the full catalog, split across processes.

Always in float32 (autocast off), so a model ranks the same whatever precision trained it.
The item model runs once over the catalog (in chunks, evaluation mode) into a (N, d) table of
unit vectors; users' states come from the user model; ranks come from the chunked ranker,
which never materialises users x items. Each process ranks its share of the users and the
per-user ranks are gathered, so the figures do not depend on the number of processes.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from ant_dist.eval.metrics import DEFAULT_KS, chunked_target_ranks, metrics_from_ranks
from ant_dist.model.ant import ANT
from ant_dist.model.sasrec import SASRec
from ant_dist.model.scoring import score_vectors
from ant_dist.train.data import Corpus


@torch.no_grad()
def catalog_embeddings(model: ANT, features, n_items: int, chunk: int, device: torch.device) -> torch.Tensor:
    out = []
    for start in range(0, n_items, chunk):
        rows = torch.arange(start, min(start + chunk, n_items), device=device)
        out.append(score_vectors(model.encode_items(rows, features).embedding, model.cfg.score))
    return torch.cat(out)


@torch.no_grad()
def rank_users(model: ANT, features, item_table: torch.Tensor, corpus: Corpus, users: np.ndarray, split: str,
               max_len: int, exclude_history: bool, chunk: int, batch: int = 256) -> np.ndarray:
    """0-based ranks of each user's held-out item: split='valid' (second to last) or 'test' (last)."""
    cut = 2 if split == "valid" else 1
    device = item_table.device
    ranks = []
    for a in range(0, len(users), batch):
        seqs = [corpus.sequence(int(u)) for u in users[a:a + batch]]
        hist = [s[:-cut] for s in seqs]
        inputs = [h[-max_len:] for h in hist]
        targets = torch.tensor([int(s[-cut]) for s in seqs], device=device)
        length = max(len(x) for x in inputs)
        rows = torch.zeros(len(seqs), length, dtype=torch.long, device=device)
        mask = torch.zeros(len(seqs), length, dtype=torch.bool, device=device)
        for i, x in enumerate(inputs):
            rows[i, :len(x)] = torch.as_tensor(x, device=device)
            mask[i, :len(x)] = True
        # the table holds score vectors (unit vectors for cos); the user model reads raw item embeddings, so
        # recompute those for the inputs (cheap: only the batch's rows)
        emb = model.encode_items(rows[mask], features)
        index = torch.zeros(rows.shape, dtype=torch.long, device=device)  # position -> row of emb (0 at padding)
        index[mask] = torch.arange(int(mask.sum()), device=device)
        h = SASRec.last(model.sequence_states(emb, index, mask), mask)
        r = chunked_target_ranks(h, targets, lambda idx: item_table[idx], len(item_table),
                                 history=hist if exclude_history else None, chunk=chunk, score=model.cfg.score)
        ranks.append(r.cpu().numpy())
    return np.concatenate(ranks) if ranks else np.zeros(0, dtype=np.int64)


def evaluate(model: ANT, features, corpus: Corpus, users_per_domain: Sequence[np.ndarray], split: str,
             max_len: int, exclude_history: bool, chunk: int, device: torch.device, rank: int, world: int,
             gather_fn, ks: Sequence[int] = DEFAULT_KS) -> dict:
    """Per-domain metrics (means) and per-user arrays, identical on every process."""
    was_training = model.training
    model.eval()
    # evaluation runs in float32 whatever the training precision (docs/model.md): a bf16 and an
    # fp32 run of the same weights rank the same way
    with torch.autocast(device.type, enabled=False):
        return _evaluate(model, features, corpus, users_per_domain, split, max_len, exclude_history, chunk,
                         device, rank, world, gather_fn, ks, was_training)


def _evaluate(model, features, corpus, users_per_domain, split, max_len, exclude_history, chunk, device, rank,
              world, gather_fn, ks, was_training) -> dict:
    try:
        table = catalog_embeddings(model, features, corpus.n_items, chunk, device)
        out = {}
        for name, users in zip(corpus.names, users_per_domain):
            mine = users[rank::world]
            ranks = rank_users(model, features, table, corpus, mine, split, max_len, exclude_history, chunk)
            parts = gather_fn([(rank, ranks.tolist())])
            ordered = np.empty(len(users), dtype=np.int64)
            for r, got in parts:
                ordered[r::world] = got
            per_user = metrics_from_ranks(ordered, ks)
            out[name] = {"users": int(len(users)), "mean": {k: float(v.mean()) if len(v) else float("nan")
                                                             for k, v in per_user.items()},
                         "per_user": {k: v.tolist() for k, v in per_user.items()}}
        return out
    finally:
        model.train(was_training)
