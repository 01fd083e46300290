"""Memory-mapped feature tables: features/<domain>/{text,image,price,has_image,done}.npy + manifest.json.

Tables are plain `.npy` files (so `np.load(path, mmap_mode="r")` works anywhere), pre-allocated
once and filled by many processes in disjoint rows. `done.npy` marks finished rows; a row's
features are written (and flushed) before its done flag, so a killed pass never marks a row
it did not finish. The manifest says `complete: true` only when every row is done.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow.parquet as pq

from ant_dist.data.layout import CATALOG
from ant_dist.data.shards import shard_paths
from ant_dist.runtime.atomic import write_json_atomic
from ant_dist.runtime.exit_codes import BadInput

TABLES = ("text", "image", "price", "has_image", "done")
MANIFEST = "manifest.json"


class FeatureTableError(BadInput):
    """A feature table is missing, incomplete, or does not match what the caller expects."""


def shards_fingerprint(domain_dir: str | Path) -> str:
    """sha256 over catalog.parquet's bytes and each shard's name and size.

    The catalog fixes rows, ids and prices; names and sizes catch a repack with other items
    or images without reading gigabytes of shards.
    """
    d = Path(domain_dir)
    catalog = d / CATALOG
    if not catalog.is_file():
        raise FeatureTableError(f"{d} has no {CATALOG}: not a (completely) packed domain")
    h = hashlib.sha256(catalog.read_bytes())
    for p in shard_paths(d):
        h.update(f"{Path(p).name}:{os.path.getsize(p)}".encode())
    return h.hexdigest()


def read_catalog(domain_dir: str | Path):
    return pq.read_table(Path(domain_dir) / CATALOG)


def catalog_array(catalog, column: str, dtype) -> np.ndarray:
    """One catalog column as a numpy array (nulls become NaN for floats)."""
    return np.asarray(catalog.column(column).to_numpy(zero_copy_only=False), dtype=dtype)


DTYPES = {"text": np.float16, "image": np.float16, "price": np.float32, "has_image": np.bool_, "done": np.bool_}


def read_manifest(feature_dir: str | Path) -> Optional[dict]:
    """The manifest, or None when there is none; FeatureTableError when it is not a JSON object."""
    p = Path(feature_dir) / MANIFEST
    if not p.is_file():
        return None
    try:
        manifest = json.loads(p.read_text(encoding="utf-8"))
    except (ValueError, OSError) as exc:
        raise FeatureTableError(f"{p}: unreadable ({exc}); re-embed the domain (overwrite=true)") from None
    if not isinstance(manifest, dict):
        raise FeatureTableError(f"{p}: not a JSON object; re-embed the domain (overwrite=true)")
    return manifest


def write_manifest(feature_dir: str | Path, manifest: dict) -> None:
    write_json_atomic(Path(feature_dir) / MANIFEST, manifest)


def identity(manifest: dict) -> dict:
    """The part of a manifest that must match for two passes to share a table."""
    return {k: manifest[k] for k in ("domain", "rows", "dtype", "text", "image", "shards_fingerprint")}


def describe_mismatch(old: dict, new: dict) -> str:
    """'text.pooling: table has "cls", this run wants "mean"; ...' for every differing leaf."""
    diffs: list[str] = []

    def walk(a, b, path: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(set(a) | set(b)):
                walk(a.get(key), b.get(key), f"{path}.{key}" if path else key)
        elif a != b:
            diffs.append(f"{path}: table has {json.dumps(a)}, this run wants {json.dumps(b)}")

    walk(identity(old), identity(new), "")
    return "; ".join(diffs)


def create_tables(feature_dir: str | Path, rows: int, text_dim: int, image_dim: int,
                  price_norm: np.ndarray) -> None:
    d = Path(feature_dir)
    d.mkdir(parents=True, exist_ok=True)
    for name, shape, dtype in (("text", (rows, text_dim), np.float16), ("image", (rows, image_dim), np.float16),
                               ("has_image", (rows,), np.bool_), ("done", (rows,), np.bool_)):
        arr = np.lib.format.open_memmap(d / f"{name}.npy", mode="w+", dtype=dtype, shape=shape)
        arr.flush()
        del arr
    np.save(d / "price.npy", np.asarray(price_norm, dtype=np.float32))


@dataclass
class FeatureTables:
    """Open (r+) memory maps of one domain's tables, for writers."""

    text: np.memmap
    image: np.memmap
    has_image: np.memmap
    done: np.memmap

    @classmethod
    def open(cls, feature_dir: str | Path, mode: str = "r+") -> "FeatureTables":
        d = Path(feature_dir)
        return cls(*(np.load(d / f"{n}.npy", mmap_mode=mode) for n in ("text", "image", "has_image", "done")))

    def write(self, rows: np.ndarray, text: np.ndarray, image: np.ndarray, has_image: np.ndarray) -> None:
        self.text[rows] = text
        self.image[rows] = image
        self.has_image[rows] = has_image

    def rows_left(self) -> int:
        """Rows not yet done (read from the shared mask, so it counts every process's work)."""
        return int((~np.asarray(self.done)).sum())

    def mark_done(self, rows: np.ndarray) -> None:
        # features reach the file before the flags that vouch for them
        self.text.flush()
        self.image.flush()
        self.has_image.flush()
        self.done[rows] = True
        self.done.flush()


def load_features(feature_dir: str | Path, expect_shards: Optional[str | Path] = None) -> dict:
    """Read-only memory maps of a COMPLETE table; refuses incomplete or mismatched ones."""
    d = Path(feature_dir)
    manifest = read_manifest(d)
    if manifest is None:
        raise FeatureTableError(f"{d}: no {MANIFEST}; run `python -m ant_dist.embed` first")
    if not manifest.get("complete"):
        raise FeatureTableError(f"{d}: the table is incomplete (an embedding pass did not finish); rerun it")
    if expect_shards is not None and shards_fingerprint(expect_shards) != manifest.get("shards_fingerprint"):
        raise FeatureTableError(f"{d}: built from other shards than {expect_shards}; re-embed with overwrite=true")
    out = open_checked(d, manifest)
    if not np.asarray(out.pop("done")).all():
        raise FeatureTableError(f"{d / 'done.npy'}: rows are missing although the manifest says complete; "
                                f"run `python -m ant_dist.embed verify {d}` and re-embed the domain")
    out["manifest"] = manifest
    return out


def open_checked(d: Path, manifest: dict) -> dict:
    """Read-only memory maps of every table, each checked against the manifest the cheap way
    (what `verify` checks without reading the values): present, a readable .npy header, the
    dtype and shape, and a file as long as its header says."""
    fix = f"run `python -m ant_dist.embed verify {d}` for every check, and re-embed the domain (overwrite=true)"
    try:
        rows = int(manifest["rows"])
        shapes = {"text": (rows, int(manifest["text"]["dim"])), "image": (rows, int(manifest["image"]["dim"])),
                  "price": (rows,), "has_image": (rows,), "done": (rows,)}
    except (KeyError, TypeError, ValueError) as exc:
        raise FeatureTableError(f"{d / MANIFEST}: incomplete (no valid {exc}); {fix}") from None
    out = {}
    for name in TABLES:
        path = d / f"{name}.npy"
        if not path.is_file():
            raise FeatureTableError(f"{path}: missing; {fix}")
        try:  # no pickle is ever loaded (allow_pickle stays False); a short file fails the mmap
            arr = np.load(path, mmap_mode="r")
        except (OSError, ValueError) as exc:
            problem = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            if "pickle" in problem:  # numpy's text suggests allow_pickle: never, on data from disk
                problem = "its header declares Python objects, not a numeric table; it is not loaded"
            raise FeatureTableError(f"{path}: unreadable ({problem}); {fix}") from None
        if arr.dtype != DTYPES[name] or arr.shape != shapes[name]:
            raise FeatureTableError(f"{path}: {arr.dtype} of shape {arr.shape}, the manifest implies "
                                    f"{np.dtype(DTYPES[name])} of shape {shapes[name]} ({rows} rows); {fix}")
        out[name] = arr
    return out


def verify(feature_dir: str | Path, shards_dir: Optional[str | Path] = None, block: int = 65536) -> list[str]:
    """Problems found in a feature table (empty list = fine)."""
    d = Path(feature_dir)
    problems: list[str] = []
    try:
        manifest = read_manifest(d)
    except FeatureTableError as exc:
        return [str(exc)]
    if manifest is None:
        return [f"no {MANIFEST} in {d}"]
    if not manifest.get("complete"):
        problems.append("manifest says complete: false")
    rows = manifest["rows"]
    arrays = {}
    for name in TABLES:
        try:
            arrays[name] = np.load(d / f"{name}.npy", mmap_mode="r")
        except (OSError, ValueError) as exc:
            problems.append(f"{name}.npy unreadable: {exc}")
    if problems and len(arrays) < len(TABLES):
        return problems
    expect = {"text": (rows, manifest["text"]["dim"]), "image": (rows, manifest["image"]["dim"]),
              "price": (rows,), "has_image": (rows,), "done": (rows,)}
    for name, shape in expect.items():
        if arrays[name].shape != shape:
            problems.append(f"{name}.npy has shape {arrays[name].shape}, manifest implies {shape}")
    if problems:
        return problems
    missing = int((~arrays["done"]).sum())
    if missing:
        problems.append(f"{missing} of {rows} rows are not done")
    for name in ("text", "image"):
        bad = 0
        for a in range(0, rows, block):
            bad += int((~np.isfinite(arrays[name][a:a + block])).any(axis=1).sum())
        if bad:
            problems.append(f"{name}: {bad} rows contain NaN or Inf")
    if (~np.isfinite(arrays["price"]) & ~np.isnan(arrays["price"])).any():
        problems.append("price: infinite values")
    no_image = ~arrays["has_image"]
    for a in range(0, rows, block):
        sl = slice(a, a + block)
        if np.abs(arrays["image"][sl][no_image[sl]]).max(initial=0) != 0:
            problems.append("image: rows without an image have non-zero features")
            break
    shards_dir = Path(shards_dir) if shards_dir else Path(manifest["shards_dir"])
    if not (shards_dir / CATALOG).is_file():
        problems.append(f"cannot check against shards: {shards_dir / CATALOG} not found")
    else:
        catalog = read_catalog(shards_dir)
        if catalog.num_rows != rows:
            problems.append(f"catalog has {catalog.num_rows} rows, table has {rows}")
        elif shards_fingerprint(shards_dir) != manifest["shards_fingerprint"]:
            problems.append(f"the shards in {shards_dir} changed since this table was embedded")
        else:
            price = catalog_array(catalog, "price_norm", np.float32)
            if not np.array_equal(np.isnan(price), np.isnan(arrays["price"])) or \
                    not np.allclose(price[~np.isnan(price)], arrays["price"][~np.isnan(price)]):
                problems.append("price.npy disagrees with the catalog")
            cat_img = catalog_array(catalog, "has_image", bool)
            if (arrays["has_image"] & ~cat_img).any():
                problems.append("has_image is true for items the catalog lists without an image")
    return problems
