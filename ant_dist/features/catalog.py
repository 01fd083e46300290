"""The joint catalog's frozen features: text, image, price_norm and has_image per catalog row.

Two placements, chosen by size (`features_on=auto`) or forced:
- device: one concatenated tensor per table on the training device; the item model gathers
  rows with an index (paper scale: ~2.4 GB in float16, fits any current GPU);
- mmap: the domains' `.npy` tables stay memory-mapped; loader workers gather each batch's
  rows (sorted, so reads are local), and the exact loss / evaluation gather catalog chunks.
  Only touched pages are resident, and they are page cache, not process memory.

Tables are refused when incomplete, built from other shards than the ones being trained on,
or when their rows or encoders disagree across domains.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ant_dist.features.feature_table import FeatureTableError, load_features

_TABLES = ("text", "image", "price", "has_image")


def open_tables(features_root: str | Path, shards_root: str | Path, names: list[str],
                n_items: list[int]) -> list[dict]:
    """Each domain's complete, matching feature tables (read-only memory maps)."""
    tables = []
    for name, rows in zip(names, n_items):
        fdir = Path(features_root) / name
        try:
            t = load_features(fdir, expect_shards=Path(shards_root) / name)
        except FeatureTableError as exc:
            raise FeatureTableError(f"domain {name!r}: {exc}") from None
        if len(t["text"]) != rows:
            raise FeatureTableError(f"domain {name!r}: the feature table has {len(t['text'])} rows but the catalog has "
                             f"{rows}; re-embed the domain")
        tables.append(t)
    first = tables[0]["manifest"]
    for name, t in zip(names[1:], tables[1:]):
        for enc in ("text", "image"):
            a, b = first[enc], t["manifest"][enc]
            if (a["fingerprint"], a["dim"]) != (b["fingerprint"], b["dim"]):
                raise FeatureTableError(f"domains {names[0]!r} and {name!r} were embedded with different {enc} encoders "
                                 f"({a.get('path')} vs {b.get('path')}); embed all domains with one encoder")
    return tables


def table_bytes(tables: list[dict]) -> int:
    return sum(int(t[n].nbytes) for t in tables for n in _TABLES)


class CatalogFeatures:
    """Features of catalog rows 0..n_items-1 over several domains (see module doc)."""

    def __init__(self, tables: list[dict], placement: str, device: torch.device):
        if placement not in ("device", "mmap"):
            raise ValueError(f"placement must be device or mmap, got {placement!r}")
        self.placement, self.device = placement, device
        self.offsets = np.cumsum([0] + [len(t["text"]) for t in tables])
        self.text_dim, self.image_dim = tables[0]["text"].shape[1], tables[0]["image"].shape[1]
        if placement == "device":
            self._on_device = {n: torch.from_numpy(np.concatenate([np.asarray(t[n]) for t in tables])).to(device)
                               for n in _TABLES}
        else:
            self._tables = [{n: t[n] for n in _TABLES} for t in tables]

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def gather_numpy(self, rows: np.ndarray) -> tuple[np.ndarray, ...]:
        """(text, image, price, has_image) of sorted catalog rows, read from the memory maps."""
        out = [[] for _ in _TABLES]
        dom = np.searchsorted(self.offsets, rows, side="right") - 1
        for d in np.unique(dom):
            local = rows[dom == d] - self.offsets[d]
            for i, n in enumerate(_TABLES):
                out[i].append(self._tables[d][n][local])
        return tuple(np.concatenate(parts) for parts in out)

    def gather(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(text, image, price_norm) for catalog rows, on rows' device (the FeatureBank interface)."""
        return self.gather_all(rows)[:3]

    def gather_all(self, rows: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.placement == "device":
            r = rows.to(self.device)
            return tuple(self._on_device[n][r].to(rows.device, non_blocking=True) for n in _TABLES)
        r = rows.cpu().numpy()
        order = np.argsort(r, kind="stable")
        got = self.gather_numpy(r[order])
        inverse = np.empty_like(order)
        inverse[order] = np.arange(len(order))
        return tuple(torch.from_numpy(np.ascontiguousarray(a[inverse])).to(rows.device) for a in got)


def load_catalog_features(features_root: str | Path, shards_root: str | Path, names: list[str],
                          n_items: list[int], placement: str, max_device_gb: float,
                          device: torch.device) -> CatalogFeatures:
    tables = open_tables(features_root, shards_root, names, n_items)
    if placement == "auto":
        placement = "device" if table_bytes(tables) <= max_device_gb * 2**30 else "mmap"
    elif placement not in ("device", "mmap"):
        raise FeatureTableError(f"features_on must be auto, device or mmap, got {placement!r}")
    return CatalogFeatures(tables, placement, device)


class BatchFeatures:
    """A FeatureBank over one batch's gathered rows (text, image, price, has_image as arrays or
    tensors, one entry per row of the sorted catalog rows `rows`). `gather` takes catalog rows,
    like every FeatureBank, so the item model can read features and ID embeddings by the same
    rows (batch-local indices gave an ID table the wrong items)."""

    def __init__(self, feats: tuple, rows: torch.Tensor, device: torch.device):
        self.text, self.image, self.price, self.has_image = (torch.as_tensor(f).to(device) for f in feats)
        self.rows = torch.as_tensor(rows).to(device)

    def gather(self, rows: torch.Tensor):
        local = torch.searchsorted(self.rows, rows.to(self.rows.device))
        return self.text[local], self.image[local], self.price[local]
