"""Interaction filtering and sequence building, vectorised with numpy (21M rows at paper scale)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ant_dist.config import TIE_BREAKS


def sorted_codes(values: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(sorted distinct values, code of each value) like np.unique(return_inverse=True), via Arrow.

    Arrow's dictionary encoding avoids building millions of Python strings; its dictionary is
    in first-seen order, so it is re-ranked to sorted order (UTF-8 byte order = code point order).
    """
    enc = pc.dictionary_encode(values)
    order = np.asarray(pc.sort_indices(enc.dictionary))
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order))
    codes = rank[enc.indices.to_numpy(zero_copy_only=False)]
    return enc.dictionary.take(pa.array(order)).to_numpy(zero_copy_only=False), codes


def k_core_filter(users: np.ndarray, items: np.ndarray, k: int) -> np.ndarray:
    """Boolean mask of the interactions that survive iterative k-core filtering.

    Repeatedly drops users and items with fewer than `k` interactions until none is left;
    the fixed point is unique, so the order of removal does not matter. `users` and `items`
    are integer codes (0..n-1).
    """
    keep = np.ones(len(users), dtype=bool)
    if k <= 1 or len(users) == 0:
        return keep
    n_users = int(users.max()) + 1
    n_items = int(items.max()) + 1
    while True:
        u_count = np.bincount(users[keep], minlength=n_users)
        i_count = np.bincount(items[keep], minlength=n_items)
        new_keep = keep & (u_count[users] >= k) & (i_count[items] >= k)
        if new_keep.sum() == keep.sum():
            return new_keep
        keep = new_keep


def sort_interactions(users: np.ndarray, timestamps: np.ndarray, item_keys: np.ndarray,
                      tie_break: str = "input") -> np.ndarray:
    """Order that sorts by user, then time; same-timestamp ties by `tie_break`.

    "input": ties keep their order in the input file (a stable sort, as RecBole and pandas do),
    so the sequences, and so the held-out validation/test items, match other tools on data
    with same-second ties. "item": ties by item key (the order is then independent of the
    order of lines in the file).
    """
    if tie_break == "input":
        return np.lexsort((np.arange(len(users)), timestamps, users))
    if tie_break == "item":
        return np.lexsort((item_keys, timestamps, users))
    raise ValueError(f"tie_break must be one of {TIE_BREAKS}, got {tie_break!r}")


def duplicate_mask(users: np.ndarray, items: np.ndarray, timestamps: np.ndarray) -> np.ndarray:
    """True at every repeat of an earlier (user, item, timestamp) row; the first one is kept."""
    order = np.lexsort((np.arange(len(users)), timestamps, items, users))
    u, i, t = users[order], items[order], timestamps[order]
    repeat = np.zeros(len(order), dtype=bool)
    repeat[1:] = (u[1:] == u[:-1]) & (i[1:] == i[:-1]) & (t[1:] == t[:-1])
    out = np.zeros(len(order), dtype=bool)
    out[order] = repeat
    return out


def most_recent(users_sorted: np.ndarray, max_len: int) -> np.ndarray:
    """Mask keeping each user's last `max_len` rows; `users_sorted` must be grouped by user."""
    n = len(users_sorted)
    if n == 0:
        return np.ones(0, dtype=bool)
    starts = np.flatnonzero(np.r_[True, users_sorted[1:] != users_sorted[:-1]])
    ends = np.r_[starts[1:], n]
    lengths = ends - starts
    end_of_row = np.repeat(ends, lengths)
    return (end_of_row - np.arange(n)) <= max_len


def group_offsets(users_sorted: np.ndarray) -> np.ndarray:
    """CSR offsets (len = n_groups + 1) of the runs of equal values in `users_sorted`."""
    n = len(users_sorted)
    if n == 0:
        return np.zeros(1, dtype=np.int64)
    starts = np.flatnonzero(np.r_[True, users_sorted[1:] != users_sorted[:-1]])
    return np.r_[starts, n].astype(np.int64)
