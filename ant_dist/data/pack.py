"""Raw catalog -> shards/<domain>/: the packing pipeline behind tools/pack.py.

Order of work, and why:
1. read items (metadata) and interactions, counting every bad record by reason;
2. fail early, before writing anything, if too much of the input is broken;
3. drop interactions with unknown items, k-core filter, order by time, keep the last N;
4. write shards in parallel, interactions.parquet, pack_report.json and catalog.parquet into
   a staging sibling (`<out>/.<domain>.staging`);
5. swap the staging folder in with one atomic rename (staging.py).

Until that rename the domain folder is exactly what it was, whatever happens (a typo in an
input, a table without a column, a crash, SIGKILL), so a good earlier pack is never lost, and a
folder with catalog.parquet is always a complete pack. Everything is a pure function of the
input and the config, so a rerun is byte-identical.

One packer per domain folder: it holds `<out>/<domain>/.lock` from start to end (a second one
is refused with LockedError), and its shard workers die with it, so a killed packer leaves no
worker writing shards behind while its rerun writes the same paths.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from ant_dist.config import ConfigError, PackConfig, check_choices, save_config
from ant_dist.data.bad_input import BadInputLog
from ant_dist.data.cleaning import normalise_price
from ant_dist.data.decoding import format_hint
from ant_dist.data.filtering import (duplicate_mask, group_offsets, k_core_filter, most_recent, sort_interactions,
                                     sorted_codes)
from ant_dist.data.layout import CATALOG, INTERACTIONS, PACK_REPORT, SHARD_PATTERN
from ant_dist.data.raw_readers import InputError, index_images, read_interactions, read_items
from ant_dist.data.shards import ShardItem, plan_shards, write_shard
from ant_dist.runtime import staging
from ant_dist.runtime.atomic import atomic_path, write_json_atomic
from ant_dist.runtime.locking import exclusive_dir_lock
from ant_dist.runtime.processes import die_with_parent


class PackError(RuntimeError):
    """The input is too broken to pack (see pack_report.json for the counts)."""


def _write_parquet(table: pa.Table, path: Path) -> None:
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")


def failed_report_path(out: Path) -> Path:
    """Where a failed pack's report goes: in the domain folder when it holds no complete pack,
    else beside it (a good earlier pack is never touched)."""
    if (out / CATALOG).exists():
        return out.parent / f"{out.name}.failed_pack_report.json"
    return out / PACK_REPORT


def _fail(report: dict, log: BadInputLog, out: Path, error: str) -> None:
    """Record a failed pack (no catalog is written) and stop."""
    report.update(log.as_dict(), status="failed", error=error)
    path = failed_report_path(out)
    write_json_atomic(path, report)
    raise PackError(f"{report['domain']}: {error}; see {path}")


def _write_shard_job(args):
    return write_shard(*args)


def pack_domain(cfg: PackConfig) -> dict:
    """Pack one domain; returns the report (also written to pack_report.json)."""
    try:  # a PackConfig built in code has not been through load_config
        check_choices(cfg)
    except ConfigError as exc:
        raise InputError(str(exc)) from None
    if cfg.min_core < 1 or cfg.max_seq_len < 2 or cfg.workers < 1:
        raise InputError("min_core must be >= 1, max_seq_len >= 2 and workers >= 1")
    t0 = time.time()
    out = Path(cfg.out) / cfg.domain
    # Held until the new pack is swapped in (or the pack fails); the lock file follows the swap.
    with exclusive_dir_lock(out, "packer"):
        work = staging.begin(out)
        try:
            report = _pack_into(cfg, out, work, t0)
        except BaseException:
            staging.abort(work)
            raise
        staging.commit(out, work)
        (out.parent / f"{out.name}.failed_pack_report.json").unlink(missing_ok=True)
        return report


def _pack_into(cfg: PackConfig, final: Path, out: Path, t0: float) -> dict:
    """Pack into `out` (the staging folder); `final` is where it will be swapped in."""
    log = BadInputLog(cfg.examples_per_reason)

    items, meta_records = read_items(cfg.format, cfg.meta, log, max_text_chars=cfg.max_text_chars,
                                     max_price=cfg.max_price, progress=cfg.progress, columns=cfg.columns)
    meta_bad = sum(log.skipped.values())
    images = index_images(cfg.images)
    for item_id, path in images.items():
        if item_id in items and items[item_id].image_path is None:
            items[item_id].image_path = path
    inter = read_interactions(cfg.format, cfg.interactions, log, progress=cfg.progress, columns=cfg.columns)
    inter_bad = sum(log.skipped.values()) - meta_bad

    report: dict = {"domain": cfg.domain, "format": cfg.format,
                    "inputs": {"meta": str(cfg.meta), "interactions": str(cfg.interactions),
                               "images": cfg.images},
                    "meta": {"records": meta_records, "bad": meta_bad, "items_with_text": len(items)},
                    "interactions_in": {"rows": inter.total_rows, "bad": inter_bad}}
    bad_fracs = {"meta": meta_bad / max(meta_records, 1), "interactions": inter_bad / max(inter.total_rows, 1)}
    worst = max(bad_fracs, key=bad_fracs.get)
    if bad_fracs[worst] > cfg.max_bad_fraction:
        path = Path(cfg.meta if worst == "meta" else cfg.interactions)
        _fail(report, log, final, f"{bad_fracs[worst]:.1%} of {worst} records are malformed "
                                f"(max_bad_fraction={cfg.max_bad_fraction}){format_hint(path, cfg.format)}")

    # --- interactions: known items only, exact duplicates once, k-core, time order, last N
    known = pc.is_in(inter.items, value_set=pa.array(list(items), pa.string())).to_numpy(zero_copy_only=False)
    for i in np.flatnonzero(~known)[: cfg.examples_per_reason]:
        log.example("unknown_item", cfg.interactions, inter.items[int(i)].as_py())
    log.skipped["unknown_item"] += int((~known).sum())
    mask = pa.array(known)
    user_ids, user_codes = sorted_codes(inter.users.filter(mask))
    item_ids, item_codes = sorted_codes(inter.items.filter(mask))
    ts = inter.timestamps[known]
    order = sort_interactions(user_codes, ts, item_codes, cfg.tie_break)
    user_codes, item_codes, ts = user_codes[order], item_codes[order], ts[order]
    dup = duplicate_mask(user_codes, item_codes, ts)
    log.skipped["duplicate_interaction"] += int(dup.sum())
    user_codes, item_codes, ts = user_codes[~dup], item_codes[~dup], ts[~dup]
    n_before = len(ts)
    keep = k_core_filter(user_codes, item_codes, cfg.min_core)
    user_codes, item_codes, ts = user_codes[keep], item_codes[keep], ts[keep]
    recent = most_recent(user_codes, cfg.max_seq_len)
    truncated = int((~recent).sum())
    user_codes, item_codes, ts = user_codes[recent], item_codes[recent], ts[recent]

    if len(ts) == 0:
        _fail(report, log, final, f"no interactions survive {cfg.min_core}-core filtering "
                                f"({n_before} known interactions before it)")

    # --- rows: kept items in item-id order
    kept_items = np.unique(item_codes)
    row_of = np.full(len(item_ids), -1, dtype=np.int64)
    row_of[kept_items] = np.arange(len(kept_items))
    kept_ids = [str(x) for x in item_ids[kept_items]]
    report["filtering"] = {
        "interactions_known": int(known.sum()), "after_dedup": n_before,
        "after_k_core": int(keep.sum()), "dropped_by_k_core": int(n_before - keep.sum()),
        "dropped_by_max_seq_len": truncated, "interactions": int(len(ts)),
        "users": int(len(np.unique(user_codes))), "items": len(kept_ids),
        "min_core": cfg.min_core, "max_seq_len": cfg.max_seq_len}

    # --- shards, in parallel; each worker validates its items' images
    sizes = [len(items[i].text) + 600 + (_file_size(items[i].image_path)) for i in kept_ids]
    ranges = plan_shards(sizes, cfg.shard_max_items, cfg.shard_max_bytes)
    jobs = []
    for s, (a, b) in enumerate(ranges):
        shard_items = []
        for row in range(a, b):
            it = items[kept_ids[row]]
            shard_items.append(ShardItem(row, kept_ids[row], it.text, it.price,
                                         normalise_price(it.price, cfg.price_cap), it.image_path))
        jobs.append((str(out / SHARD_PATTERN.format(s)), cfg.domain, shard_items, s))
    image_ext: list = [None] * len(kept_ids)
    shard_of = np.zeros(len(kept_ids), dtype=np.int32)
    bytes_total = 0
    bar = tqdm(total=len(kept_ids), desc=f"shards {cfg.domain}", unit=" items", disable=not cfg.progress)
    # Spawned, not forked: a fork copies whatever locks the caller's other threads hold at that
    # instant (a notebook's, a test runner's, tqdm's monitor), and a worker forked then can wait on
    # one forever (seen: a pack called inside pytest hung in futex_wait). Workers die with the
    # packer: an orphan would go on writing shards while a rerun writes the same paths.
    ctx = mp.get_context("spawn")
    with ctx.Pool(min(cfg.workers, max(len(jobs), 1)), initializer=die_with_parent,
                  initargs=(os.getpid(),)) as pool:
        for res in pool.imap(_write_shard_job, jobs):
            for row, ext in zip(res.rows, res.image_ext):
                image_ext[row] = ext
                shard_of[row] = res.index
            for reason, path, detail in res.image_problems:
                log.repair(reason, path, detail)
            bytes_total += res.bytes_written
            bar.update(len(res.rows))
    bar.close()
    # --- interactions.parquet: one row per user (user-id order), item rows in time order
    offsets = group_offsets(user_codes)
    seq_user = user_ids[user_codes[offsets[:-1]]] if len(offsets) > 1 else np.array([], dtype=str)
    inter_table = pa.table({
        "user_id": pa.array(seq_user.astype(str), pa.string()),
        "items": pa.ListArray.from_arrays(pa.array(offsets, pa.int32()),
                                          pa.array(row_of[item_codes], pa.int32())),
        "timestamps": pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(ts, pa.int64())),
    })
    _write_parquet(inter_table, out / INTERACTIONS)

    prices = [items[i].price for i in kept_ids]
    has_image = [e is not None for e in image_ext]
    report.update(log.as_dict(), status="complete",
                  output={"items": len(kept_ids), "users": inter_table.num_rows,
                          "interactions": int(len(ts)), "shards": len(ranges), "shard_bytes": bytes_total,
                          "items_with_image": int(sum(has_image)),
                          "items_with_price": int(sum(p is not None for p in prices))},
                  config={k: getattr(cfg, k) for k in ("min_core", "max_seq_len", "max_text_chars",
                                                       "price_cap", "max_price", "tie_break")})
    write_json_atomic(out / PACK_REPORT, report)
    save_config(cfg, out / "pack_config.yaml")
    catalog = pa.table({
        "row": pa.array(np.arange(len(kept_ids)), pa.int64()),
        "item_id": pa.array(kept_ids, pa.string()),
        "price": pa.array(prices, pa.float64()),
        "price_norm": pa.array([normalise_price(p, cfg.price_cap) for p in prices], pa.float64()),
        "has_image": pa.array(has_image, pa.bool_()),
        "image_ext": pa.array(image_ext, pa.string()),
        "shard": pa.array(shard_of, pa.int32()),
    })
    _write_parquet(catalog, out / CATALOG)
    report["seconds"] = round(time.time() - t0, 3)  # returned only: the files stay byte-identical
    return report


def _file_size(path) -> int:
    if not path:
        return 0
    try:
        return os.stat(path).st_size
    except OSError:
        return 0
