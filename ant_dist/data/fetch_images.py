"""Download the item images named in Amazon metadata into <images>/<item_id>.<ext> (tools/fetch_images.py).

One file per item, named by the raw item id and the decoded format (jpg, png or webp, whatever the
URL says): exactly what tools/pack.py reads from `images=`. Threads + urllib (the work is waiting
on the network; proxies from the environment, bypassed for loopback). Bounded: a token bucket per
host, a socket timeout and a whole-download deadline, a byte cap checked while the body streams,
at most 2 x parallel items in flight (the metadata is streamed). Retries with exponential backoff
and full jitter on 5xx/408/429 (Retry-After honoured), timeouts, truncated bodies and connection
errors; never on 404 or another 4xx. Each body is fully decoded by the packer's own check, then
written to <name>.part, fsynced and renamed; a rerun removes stale .part files and skips items
that have a file. One fetcher per folder (.lock). Details, the report: docs/data.md.
Exit codes: 0 finished (failures are counted in <images>/fetch_report.json), 2 bad input or folder
in use, 75 stopped by SIGTERM/SIGINT (downloads abandoned, nothing partial left, report written).
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import threading
import time
from collections import Counter, defaultdict
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Iterator, Optional, Sequence

from tqdm.auto import tqdm

from ant_dist.config import ConfigError, FetchConfig, check_choices, parse_cli
from ant_dist.data.bad_input import BadInputLog
from ant_dist.data.image_download import PART, Downloader, FetchResult, is_http_url
from ant_dist.data.raw_readers import index_images, iter_json_lines, meta_fields_2018, meta_fields_2023
from ant_dist.runtime.atomic import write_json_atomic
from ant_dist.runtime.exit_codes import EXIT_BAD_INPUT, EXIT_OK, EXIT_STOPPED
from ant_dist.runtime.locking import LockedError, exclusive_dir_lock
from ant_dist.runtime.signals import flag_stop_signals

REPORT = "fetch_report.json"
# outcome of each item with an image URL; all but the first two are failures
OUTCOMES = ("ok", "already_present", "not_found", "timeout", "truncated", "connection_error", "http_error",
            "not_image", "too_big", "bad_url")
ID_FIELDS = {"amazon2018": meta_fields_2018, "amazon2023": meta_fields_2023}  # the packer's item-id rules


class FetchInputError(ValueError):
    """Bad options or an unreadable metadata file (exit code 2)."""


# ----------------------------------------------------------------------------- pure helpers
def _first_url(value) -> Optional[str]:
    if isinstance(value, str) and value.strip():
        return value.strip()
    if isinstance(value, list):
        return next((v.strip() for v in value if isinstance(v, str) and v.strip()), None)
    return None


def image_url(fmt: str, obj: dict) -> Optional[str]:
    """The one image URL of an item's metadata record (the packer uses one image per item)."""
    if fmt == "amazon2018":
        return _first_url(obj.get("imageURLHighRes")) or _first_url(obj.get("imageURL"))
    listed = obj.get("images")
    entries = [e for e in listed if isinstance(e, dict)] if isinstance(listed, list) else []
    entries.sort(key=lambda e: e.get("variant") != "MAIN")  # stable: MAIN first, the rest in order
    for entry in entries:
        url = _first_url(entry.get("hi_res")) or _first_url(entry.get("large"))
        if url:
            return url
    return None


def rewrite_url(url: str, prefix_from: str, prefix_to: str) -> str:
    return prefix_to + url[len(prefix_from):] if prefix_from and url.startswith(prefix_from) else url


def usable_as_file_stem(item_id: str) -> bool:
    """Whether <item_id>.<ext>.part is a plain file name in one folder on any Unix filesystem."""
    return (item_id not in (".", "..") and not any(c in item_id for c in "/\\\0")
            and len(item_id.encode("utf-8")) <= 255 - len(".webp.part"))


# ----------------------------------------------------------------------------- the run
def _check(cfg: FetchConfig) -> None:
    problems = []
    try:  # a FetchConfig built in code has not been through load_config
        check_choices(cfg)
    except ConfigError as exc:
        problems.append(str(exc))
    if not Path(cfg.meta).is_file():
        problems.append(f"metadata file not found: {cfg.meta}")
    for name in ("parallel", "burst_per_host", "max_bytes"):
        if getattr(cfg, name) < 1:
            problems.append(f"{name} must be >= 1")
    for name in ("max_items", "retries", "rate_per_host", "backoff", "max_backoff"):
        if getattr(cfg, name) < 0:
            problems.append(f"{name} must be >= 0")
    if cfg.timeout <= 0 or cfg.total_timeout <= 0:
        problems.append("timeout and total_timeout must be > 0")
    if bool(cfg.url_prefix_from) != bool(cfg.url_prefix_to):
        problems.append("url_prefix_from and url_prefix_to go together")
    if Path(cfg.images).exists() and not Path(cfg.images).is_dir():
        problems.append(f"images is not a folder: {cfg.images}")
    if problems:
        raise FetchInputError("; ".join(problems))


def iter_items(cfg: FetchConfig, log: BadInputLog, stats: Counter) -> Iterator[tuple[str, str]]:
    """(item id, image URL) in file order: first record of an id wins, as in the packer."""
    seen: set[str] = set()
    id_of = ID_FIELDS[cfg.format]
    for lineno, obj in iter_json_lines(Path(cfg.meta), log, progress=False):
        item_id = id_of(obj)[0]
        where = f"{Path(cfg.meta).name}:{lineno}"
        if item_id is None:
            log.skip("missing_item_id", where)
        elif item_id in seen:
            log.skip("duplicate_item", where, item_id)
        elif not usable_as_file_stem(item_id):
            seen.add(item_id)
            log.skip("unusable_item_id", where, item_id)
        else:
            seen.add(item_id)
            stats["items"] += 1
            url = image_url(cfg.format, obj)
            if url is None:
                stats["no_url"] += 1
                continue
            yield item_id, url


def remove_stale_parts(folder: Path) -> int:
    """Delete *.part files: downloads cut short by a killed run (the lock says none is running)."""
    stale = [p for p in folder.iterdir() if p.name.endswith(PART) and p.is_file()]
    for path in stale:
        path.unlink(missing_ok=True)
    return len(stale)


def fetch_images(cfg: FetchConfig, stop: Optional[threading.Event] = None) -> dict:
    """Download every item's image into cfg.images; returns (and writes) the report."""
    _check(cfg)
    stop = stop or threading.Event()
    folder = Path(cfg.images)
    start = time.time()
    counts: Counter = Counter({k: 0 for k in OUTCOMES})
    examples: dict[str, list[str]] = defaultdict(list)
    stats: Counter = Counter()
    log = BadInputLog(cfg.examples_per_reason)

    def record(res: FetchResult) -> None:
        if res.outcome == "interrupted":
            stats["unfinished"] += 1
            return
        counts[res.outcome] += 1
        stats["requests"] += res.requests
        stats["bytes"] += res.nbytes
        if res.outcome not in ("ok", "already_present") and len(examples[res.outcome]) < cfg.examples_per_reason:
            examples[res.outcome].append(f"{res.item_id}: {res.url[:200]}: {res.detail}")
        bar.update(1)
        bar.set_postfix(ok=counts["ok"] + counts["already_present"],
                        failed=sum(counts.values()) - counts["ok"] - counts["already_present"], refresh=False)

    with exclusive_dir_lock(folder, "image fetcher"):
        stale = remove_stale_parts(folder)
        present = set(index_images(folder))
        downloader = Downloader(cfg, folder, stop)
        bar = tqdm(desc="fetch images", unit=" img", total=cfg.max_items or None, disable=not cfg.progress,
                   mininterval=1)
        pool = ThreadPoolExecutor(cfg.parallel, thread_name_prefix="fetch")
        try:
            in_flight: set = set()
            taken = 0
            for item_id, url in iter_items(cfg, log, stats):
                if cfg.max_items and taken >= cfg.max_items:
                    break
                if stop.is_set():
                    stats["unread"] = 1  # items after this one were never looked at
                    break
                taken += 1
                url = rewrite_url(url, cfg.url_prefix_from, cfg.url_prefix_to)
                if item_id in present:
                    record(FetchResult(item_id, url, "already_present"))
                elif not is_http_url(url):
                    record(FetchResult(item_id, url, "bad_url", "only http(s) URLs are fetched"))
                else:
                    in_flight.add(pool.submit(downloader.fetch, item_id, url))
                while len(in_flight) >= 2 * cfg.parallel:
                    done, in_flight = wait(in_flight, timeout=1.0, return_when=FIRST_COMPLETED)
                    for future in done:
                        record(future.result())
            if stop.is_set():
                for future in in_flight:
                    future.cancel()  # queued ones never start; running ones see `stop` and return
            for future in in_flight:
                if future.cancelled():
                    stats["unfinished"] += 1
                else:
                    record(future.result())
        except BaseException:
            stop.set()  # a write error or a bug: the other downloads stop at their next chunk
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            bar.close()
        fd = os.open(folder, os.O_RDONLY)  # make the renames durable, once for the whole run
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        seconds = time.time() - start
        report = {
            "status": "interrupted" if stats["unfinished"] or stats["unread"] else "complete",
            "counts": dict(counts),
            "failed": sum(counts[k] for k in OUTCOMES[2:]),
            "examples": dict(examples),
            # considered = items with a URL looked at (max_items caps it); unfinished: stopped by a signal
            "items": {"in_meta": stats["items"], "no_url": stats["no_url"], "considered": taken,
                      "unfinished": stats["unfinished"]},
            "meta_problems": log.as_dict(),
            "requests": stats["requests"],
            "bytes_downloaded": stats["bytes"],
            "stale_parts_removed": stale,
            "seconds": round(seconds, 3),
            "images_per_s": round(counts["ok"] / seconds, 1) if seconds > 0 else None,
            "config": dataclasses.asdict(cfg),
        }
        write_json_atomic(folder / REPORT, report)
    return report


def main(argv: Optional[Sequence[str]] = None) -> int:
    cfg = parse_cli(FetchConfig, argv, "tools/fetch_images.py", __doc__ or "")
    stop = threading.Event()  # the download threads wait on it
    try:
        with flag_stop_signals((signal.SIGTERM, signal.SIGINT), event=stop):
            report = fetch_images(cfg, stop)
    except (FetchInputError, LockedError) as exc:
        print(f"fetch_images: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    counts = {k: v for k, v in report["counts"].items() if v}
    print(f"fetch_images: {report['status']} in {report['seconds']:.1f}s: {json.dumps(counts, sort_keys=True)} "
          f"-> {Path(cfg.images) / REPORT}")
    return EXIT_STOPPED if report["status"] == "interrupted" else EXIT_OK
