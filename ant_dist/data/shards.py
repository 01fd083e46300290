"""WebDataset item shards: writing them atomically, validating images, reading them back.

A shard sample is one item: `__key__` = safe item id, `txt` = item text (UTF-8),
`json` = {item_id, domain, row, price, price_norm, has_image}, and the image bytes, if any,
under `jpg`, `png` or `webp`. Only those extensions are ever decoded: never pickle.
"""

from __future__ import annotations

import io
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

from PIL import Image

from ant_dist.data.cleaning import safe_key
from ant_dist.data.layout import IMAGE_FORMATS, SHARD_GLOB

# Decompression-bomb guard: catalogue images are small; refuse anything absurd.
MAX_IMAGE_PIXELS = 50_000_000


@dataclass
class ShardItem:
    row: int
    item_id: str
    text: str
    price: Optional[float]
    price_norm: Optional[float]
    image_path: Optional[str]


@dataclass
class ShardResult:
    index: int
    rows: list[int]
    image_ext: list[Optional[str]]      # None = no usable image
    image_problems: list[tuple[str, str, str]]  # (reason, path, detail)
    bytes_written: int


def check_image(data: bytes) -> tuple[Optional[str], Optional[str]]:
    """(extension, None) for a fully decodable JPEG/PNG/WebP, else (None, reason)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                fmt = img.format
                if img.width * img.height > MAX_IMAGE_PIXELS:
                    return None, "image_too_large"
                img.load()  # full decode: catches truncated files, which verify() misses
    except Exception as exc:  # PIL raises many types for bad bytes
        return None, f"undecodable_image:{type(exc).__name__}"
    ext = IMAGE_FORMATS.get(fmt or "")
    if ext is None:
        return None, f"unsupported_image_format:{fmt}"
    return ext, None


def write_shard(path: str, domain: str, items: list[ShardItem], index: int) -> ShardResult:
    """Write one shard to `<path>.tmp`, then rename: a shard that exists is complete."""
    final = Path(path)
    tmp = final.with_name(final.name + ".tmp")
    exts: list[Optional[str]] = []
    problems: list[tuple[str, str, str]] = []
    with open(tmp, "wb") as fh:
        # Fixed mtime/owner make shards byte-identical across runs.
        import webdataset as wds  # not at the top: it imports torch (1.5 s), needed nowhere else in the packer

        sink = wds.TarWriter(fh, encoder=False, mtime=0.0, user="ant", group="ant", mode=0o444)
        for it in items:
            image_bytes, ext = None, None
            if it.image_path:
                try:
                    image_bytes = Path(it.image_path).read_bytes()
                except OSError as exc:
                    problems.append(("unreadable_image", it.image_path, type(exc).__name__))
                else:
                    ext, reason = check_image(image_bytes)
                    if reason:
                        problems.append((reason.split(":")[0], it.image_path, reason))
            meta = {"item_id": it.item_id, "domain": domain, "row": it.row, "price": it.price,
                    "price_norm": it.price_norm, "has_image": ext is not None}
            sample = {"__key__": safe_key(it.item_id), "txt": it.text.encode("utf-8"),
                      "json": json.dumps(meta, sort_keys=True).encode("utf-8")}
            if ext is not None:
                sample[ext] = image_bytes
            sink.write(sample)
            exts.append(ext)
        sink.close()
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, final)
    return ShardResult(index, [it.row for it in items], exts, problems, final.stat().st_size)


def plan_shards(sizes: list[int], max_items: int, max_bytes: int) -> list[tuple[int, int]]:
    """Split rows 0..n-1 into contiguous [start, end) ranges bounded in count and bytes."""
    ranges: list[tuple[int, int]] = []
    start, acc = 0, 0
    for row, size in enumerate(sizes):
        if row > start and (row - start >= max_items or acc + size > max_bytes):
            ranges.append((start, row))
            start, acc = row, 0
        acc += size
    if start < len(sizes):
        ranges.append((start, len(sizes)))
    return ranges


def shard_paths(domain_dir: str | Path) -> list[str]:
    return sorted(str(p) for p in Path(domain_dir).glob(SHARD_GLOB))


def shard_problem(path: str | Path, expected_items: int) -> Optional[str]:
    """What is wrong with a shard file, or None: it must read as a tar to its end and hold
    `expected_items` samples (a sample per item, each with its json). Headers only: cheap."""
    import tarfile

    keys, with_json = set(), set()
    try:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                key, _, ext = member.name.partition(".")
                keys.add(key)
                if ext == "json":
                    with_json.add(key)
    except (tarfile.TarError, OSError, EOFError) as exc:
        return f"not a readable tar file ({type(exc).__name__}: {exc})"
    if len(keys) != expected_items or len(with_json) != expected_items:
        return f"holds {len(with_json)} complete item(s), the catalog lists {expected_items} in it"
    return None


def _all_shards(urls):
    return urls


def iter_shard_samples(urls: list[str] | str) -> Iterator[dict]:
    """Raw samples (bytes values) from shards, in order, through webdataset's own tar reader.

    The caller decides which process and worker reads which shard, so webdataset's own
    node and worker splitting is turned off (inside a DataLoader worker it would otherwise
    hand this worker only every n-th of the urls given).
    """
    import webdataset as wds

    dataset = wds.WebDataset(urls, shardshuffle=False, empty_check=False, nodesplitter=_all_shards,
                             workersplitter=_all_shards)
    yield from dataset
