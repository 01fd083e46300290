"""Sequences of the joint catalog, the epoch plan, and batch building.

Each domain's `interactions.parquet` (one row per user, item rows in time order) is read
through `datasets` into a memory-mapped Arrow table; the flat item column and the list
offsets are numpy views of it, so 21M interactions cost no copy. Domains are joined in the
configured order: domain d's item r is catalog row `item_offset[d] + r`.

Split per user (leave-one-out): the last item is test, the second to last validation, the
rest training. Training uses every position of the training part (SASRec style): inputs
T[:-1] predict T[1:].

The epoch plan depends only on (seed, epoch) and the global batch size, never on the number
of processes: a global batch is a contiguous slice of the epoch's permutation, and process r
of `world` takes the r-th of `world` near-equal parts of it. A checkpoint records how many
sequences of the epoch were consumed, so a resume on any number of processes trains each
remaining sequence exactly once.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from ant_dist.data.layout import CATALOG, INTERACTIONS
from ant_dist.train import TrainError


@dataclass
class DomainSequences:
    name: str
    item_offset: int
    n_items: int
    offsets: np.ndarray  # (users + 1,) into `items`
    items: np.ndarray  # flat local item rows, time-ordered per user


def read_domain(shards_root: str | Path, name: str, item_offset: int,
                cache_dir: Optional[str] = None) -> DomainSequences:
    """One packed domain's sequences, validated; raises TrainError naming the problem."""
    import datasets

    d = Path(shards_root) / name
    if not d.is_dir():
        raise TrainError(f"domain {name!r}: {d} does not exist (pack it with tools/pack.py)")
    if not (d / CATALOG).is_file() or not (d / INTERACTIONS).is_file():
        raise TrainError(f"domain {name!r}: {d} is not a completely packed domain (no {CATALOG})")
    def rows(path: Path) -> int:
        try:
            return pq.read_metadata(path).num_rows
        except (OSError, pa.ArrowInvalid) as exc:  # a damaged file: a crash mid-copy, a full disk
            raise TrainError(f"domain {name!r}: {path} is not readable Parquet ({exc}); repack the domain") from None

    n_items = rows(d / CATALOG)
    if rows(d / INTERACTIONS) == 0:
        raise TrainError(f"domain {name!r}: {d / INTERACTIONS} holds no user sequences")
    datasets.disable_progress_bars()
    try:
        ds = datasets.Dataset.from_parquet(str(d / INTERACTIONS), cache_dir=cache_dir)
    except Exception as exc:  # datasets wraps Arrow errors in its own types
        raise TrainError(f"domain {name!r}: cannot read {d / INTERACTIONS}: {exc}") from None
    if "items" not in ds.column_names:
        raise TrainError(f"domain {name!r}: {d / INTERACTIONS} has no 'items' column; repack the domain")
    col = ds.data.column("items")  # the Arrow column: no Python objects on this path
    arr = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
    offsets = arr.offsets.to_numpy().astype(np.int64)  # of this (possibly sliced) array
    items = arr.values.to_numpy(zero_copy_only=False)[offsets[0]:offsets[-1]]  # `values` ignores slicing
    offsets = offsets - offsets[0]
    if len(items) and (int(items.min()) < 0 or int(items.max()) >= n_items):
        raise TrainError(f"domain {name!r}: interactions name item rows outside the catalog's {n_items} rows; "
                         f"the shards are inconsistent, repack the domain")
    return DomainSequences(name, item_offset, n_items, offsets, items)


class Corpus:
    """All domains' users as one index 0..n_users-1; catalog rows are global (offset) rows."""

    def __init__(self, domains: list[DomainSequences]):
        self.domains = domains
        self.names = [d.name for d in domains]
        self.item_offsets = np.array([d.item_offset for d in domains] + [sum(d.n_items for d in domains)])
        self.n_items = int(self.item_offsets[-1])
        self.user_offsets = np.cumsum([0] + [len(d.offsets) - 1 for d in domains])
        self.n_users = int(self.user_offsets[-1])
        self.lengths = np.concatenate([np.diff(d.offsets) for d in domains])
        # a user trains only if the training part (all but the last two) has a next-item pair
        self.train_users = np.flatnonzero(self.lengths >= 4)
        if len(self.train_users) == 0:
            raise TrainError("no user has the 4 interactions needed to train (2 are held out)")

    def subsample_train_users(self, fraction: float, seed: int) -> None:
        """Train on a random `fraction` of each domain's training users (validation and test still see
        everyone: their histories are inputs, not training data). A function of (seed, fraction) only,
        and nested: a smaller fraction's users are a subset of a larger one's."""
        keep = []
        for d in range(len(self.domains)):
            users = self.train_users[(self.train_users >= self.user_offsets[d]) &
                                     (self.train_users < self.user_offsets[d + 1])]
            if len(users) == 0:
                continue
            order = np.random.default_rng([seed, d, 0xF4AC]).permutation(len(users))
            keep.append(users[order[:max(1, round(fraction * len(users)))]])
        self.train_users = np.sort(np.concatenate(keep))

    def domain_of(self, user: int) -> int:
        return int(np.searchsorted(self.user_offsets, user, side="right") - 1)

    def sequence(self, user: int) -> np.ndarray:
        """The user's whole time-ordered sequence as global catalog rows."""
        d = self.domain_of(user)
        dom = self.domains[d]
        u = user - self.user_offsets[d]
        return dom.items[dom.offsets[u]:dom.offsets[u + 1]].astype(np.int64) + dom.item_offset

    def train_positions(self, max_len: int) -> np.ndarray:
        """Loss positions of each training user: len(T) - 1, capped by the input length."""
        return np.minimum(self.lengths[self.train_users] - 3, max_len)

    def popularity(self) -> np.ndarray:
        """Per catalog row: interactions in the training parts (validation/test items excluded)."""
        counts = np.zeros(self.n_items, dtype=np.int64)
        for dom in self.domains:
            n = np.diff(dom.offsets)
            held_out = np.zeros(len(dom.items), dtype=bool)
            ends = dom.offsets[1:]
            held_out[ends[n >= 1] - 1] = True
            held_out[ends[n >= 2] - 2] = True
            counts += np.bincount(dom.items[~held_out].astype(np.int64) + dom.item_offset, minlength=self.n_items)
        return counts


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The epoch's permutation of 0..n-1: a function of (seed, epoch) only."""
    return np.random.default_rng([seed, epoch, 0xA17]).permutation(n)


def epoch_batches(n: int, batch_size: int, consumed: int = 0) -> list[tuple[int, int]]:
    """Global batch bounds [lo, hi) over the permutation, starting after `consumed` sequences."""
    return [(lo, min(lo + batch_size, n)) for lo in range(consumed, n, batch_size)]


def local_part(lo: int, hi: int, rank: int, world: int) -> tuple[int, int]:
    """This process's near-equal share of a global batch (may be empty on a short last batch)."""
    n = hi - lo
    base, extra = divmod(n, world)
    start = lo + rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def step_seed(seed: int, step: int, rank: int) -> int:
    """Seed of one process's randomness at one step (dropout, gate noise, negatives).

    Every random draw is a function of (seed, step, rank), so a resumed run replays exactly
    the draws of an uninterrupted one without restoring generator states.
    """
    return int(np.random.default_rng([seed, step, rank + 1, 0x5EED]).integers(2**62))


class EpochBatches(torch.utils.data.Dataset):
    """Batch j of this process for one epoch (j counts from the resume point); built in loader workers.

    A batch: `inputs`/`targets` (b, L) as indices into `rows` (the batch's distinct catalog
    rows, sorted; targets -1 where there is no loss), `mask` (b, L) real input items,
    `negatives` (K,) catalog rows, `n_global` loss positions in the whole global batch (for the
    loss scale), `users` (b,) global user ids, `step`; and, with memory-mapped features, the
    rows' features (`feats`); with `draws`, (b, L) uniforms per sequence and `view_draw`, one per
    step (UniSRec's augmentations).
    """

    def __init__(self, corpus: Corpus, order: np.ndarray, bounds: list[tuple[int, int]], first_step: int,
                 rank: int, world: int, max_len: int, seed: int, n_negatives: int = 0,
                 neg_probs: Optional[torch.Tensor] = None, shared_negatives: bool = False, features=None,
                 draws: bool = False):
        self.corpus, self.order, self.bounds, self.first_step = corpus, order, bounds, first_step
        self.rank, self.world, self.max_len, self.seed = rank, world, max_len, seed
        self.n_negatives, self.neg_probs, self.shared_negatives = n_negatives, neg_probs, shared_negatives
        self.features = features  # CatalogFeatures in mmap mode, else None
        self.draws = draws  # per-sequence uniforms (UniSRec's item drops)
        self.positions = np.zeros(corpus.n_users, dtype=np.int64)
        self.positions[corpus.train_users] = corpus.train_positions(max_len)

    def __len__(self) -> int:
        return len(self.bounds)

    def __getitem__(self, j: int) -> dict:
        lo, hi = self.bounds[j]
        step = self.first_step + j
        users_global = self.corpus.train_users[self.order[lo:hi]]
        a, b = local_part(lo, hi, self.rank, self.world)
        users = self.corpus.train_users[self.order[a:b]]
        real = len(users)
        if real == 0:
            # a short last batch left nothing here: run one sequence with no loss positions, so
            # this process still takes part in the forward/backward collectives
            users = users_global[:1]
        seqs = [self.corpus.sequence(int(u))[:-2] for u in users]  # training parts
        inputs = [s[:-1][-self.max_len:] for s in seqs]
        targets = [s[1:][-self.max_len:] for s in seqs]
        negatives = np.zeros(0, dtype=np.int64)
        if self.n_negatives:
            gen = torch.Generator().manual_seed(step_seed(self.seed, step, -1 if self.shared_negatives else self.rank))
            negatives = torch.multinomial(self.neg_probs, self.n_negatives, replacement=True, generator=gen).numpy()
        rows = np.unique(np.concatenate(inputs + targets + [negatives]))
        length = max(len(x) for x in inputs)
        inp = np.zeros((len(seqs), length), dtype=np.int64)
        tgt = np.full((len(seqs), length), -1, dtype=np.int64)
        mask = np.zeros((len(seqs), length), dtype=bool)
        for i, (x, y) in enumerate(zip(inputs, targets)):
            inp[i, :len(x)] = np.searchsorted(rows, x)
            mask[i, :len(x)] = True
            if i < real:
                tgt[i, :len(y)] = np.searchsorted(rows, y)
        batch = {"inputs": torch.from_numpy(inp), "targets": torch.from_numpy(tgt), "mask": torch.from_numpy(mask),
                 "rows": torch.from_numpy(rows), "negatives": torch.from_numpy(negatives),
                 "n_global": int(self.positions[users_global].sum()),
                 "users": torch.from_numpy(users[:real].astype(np.int64)), "step": step}
        if self.features is not None:
            batch["feats"] = self.features.gather_numpy(rows)
        if self.draws:  # seeded by the user, not the process: any process count draws the same
            batch["draws"] = torch.from_numpy(np.stack([
                np.random.default_rng([self.seed, step, int(u), 0xD4A3]).random(length) for u in users]))
            batch["view_draw"] = float(np.random.default_rng([self.seed, step, 0xA06]).random())
        return batch


def validation_users(corpus: Corpus, per_domain: int, seed: int) -> list[np.ndarray]:
    """A fixed random subset (all when per_domain is 0) of each domain's users with >= 3 items."""
    out = []
    for d in range(len(corpus.domains)):
        users = np.arange(corpus.user_offsets[d], corpus.user_offsets[d + 1])
        users = users[corpus.lengths[users] >= 3]
        if per_domain and len(users) > per_domain:
            users = np.sort(np.random.default_rng([seed, d, 0xE7A1]).choice(users, per_domain, replace=False))
        out.append(users)
    return out
