"""The embedding pass: shards -> memory-mapped feature tables, on one or many processes.

    python -m ant_dist.embed --config configs/embed.yaml [key=value ...]
    accelerate launch --num_processes N -m ant_dist.embed --config configs/embed.yaml
    python -m ant_dist.embed verify features/<domain> [shards/<domain>]

How the work is split: the shards of all domains form one list of units; process r takes
units r, r + world, ... and its DataLoader workers split those again, so every item is read
exactly once overall. Workers decode images and tokenise texts; the main thread of each
process runs the frozen encoders and writes rows straight into the pre-allocated tables.

Resume: rows are marked in done.npy after their features are written; a rerun of the same
command skips done rows (and whole shards whose rows are all done). A table built with other
encoders or from other shards is refused with the difference spelled out (`overwrite=true`
starts over).

One pass per output folder: the main process holds `<out>/.lock` for the whole run; a second
pass on the same `out` is refused (LockedError, exit 2) before it touches anything.

Stop signals (SIGTERM, SIGUSR1: Slurm's time-limit warning): each process finishes the batch in
hand, marks its rows done and exits 75; a rerun continues with the rows left.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch.utils.data import DataLoader

from ant_dist.config import EmbedConfig, parse_cli, save_config
from ant_dist.data.layout import CATALOG, SHARD_PATTERN
from ant_dist.data.shards import shard_paths, shard_problem
from ant_dist.features.encoders import (EncoderError, ImageEncoder, TextEncoder, encoder_fingerprint, encoder_summary,
                                        require_local_model)
from ant_dist.features.feature_table import (FeatureTableError, FeatureTables, catalog_array, create_tables,
                                             describe_mismatch, identity, read_catalog, read_manifest,
                                             shards_fingerprint, verify, write_manifest)
from ant_dist.features.shard_dataset import ShardItems
from ant_dist.runtime.exit_codes import EXIT_BAD_INPUT, EXIT_OK, EXIT_STOPPED
from ant_dist.runtime.locking import DirectoryLock, LockedError, acquire_dir_lock
from ant_dist.runtime.processes import die_with_launcher, loader_worker_init
from ant_dist.runtime.signals import flag_stop_signals
from ant_dist.runtime.teardown import close_process_group

VERIFY_HELP = """usage: python -m ant_dist.embed verify FEATURES/<domain> [SHARDS/<domain>]

Checks one domain's feature tables: manifest, every table's header, shape, dtype and size, every
row done, no NaN or Inf, zero image features where there is no image, and the tables against the
shards they were embedded from (the manifest's shards_dir unless SHARDS/<domain> is given).
Prints OK or one FAIL line per problem. Exit codes: 0 fine, 1 problems found, 2 bad usage."""


class Stopped(Exception):
    """A stop signal arrived; this process's finished rows are marked done."""


def _domains(cfg: EmbedConfig) -> list[str]:
    root = Path(cfg.shards)
    if cfg.domains:
        names = list(cfg.domains)
    elif root.is_dir():
        # hidden folders are a packer's work in progress (.<domain>.staging), never a domain
        names = sorted(p.name for p in root.iterdir() if not p.name.startswith(".") and (p / CATALOG).is_file())
    else:
        names = []
    if not names:
        raise FeatureTableError(f"no packed domains under {root} (a domain needs {CATALOG})")
    for n in names:
        if not (root / n / CATALOG).is_file():
            raise FeatureTableError(f"{root / n} is not a completely packed domain (no {CATALOG})")
    return names


def _check_inputs(cfg: EmbedConfig, domains: list[str]) -> None:
    """Every input, before anything is loaded or written: encoder folders, then each shard (a
    tar that ends early or lost items would otherwise leave rows silently missing)."""
    if not 0 <= cfg.text_word_drop < 1:
        raise FeatureTableError(f"text_word_drop must be in [0, 1), got {cfg.text_word_drop}")
    require_local_model(cfg.text_encoder, "text_encoder")
    require_local_model(cfg.image_encoder, "image_encoder")
    for domain in domains:
        shard_of = read_catalog(Path(cfg.shards) / domain).column("shard").to_numpy()
        for s, count in zip(*np.unique(shard_of, return_counts=True)):
            path = Path(cfg.shards) / domain / SHARD_PATTERN.format(int(s))
            problem = shard_problem(path, int(count)) if path.is_file() else "missing"
            if problem:
                raise FeatureTableError(f"{path}: corrupt shard: {problem}; repack the domain (tools/pack.py)")


def _wanted_manifest(cfg: EmbedConfig, domain: str, rows: int, text: TextEncoder, image: ImageEncoder,
                     fingerprints: dict) -> dict:
    return {"domain": domain, "rows": rows, "dtype": "float16", "complete": False,
            "shards_dir": str(Path(cfg.shards) / domain),
            "shards_fingerprint": shards_fingerprint(Path(cfg.shards) / domain),
            "text": {**encoder_summary(cfg.text_encoder), "fingerprint": fingerprints["text"], "dim": text.dim,
                     "pooling": cfg.text_pooling, "max_tokens": cfg.max_text_tokens,
                     # only a word-drop table records it: tables embedded before the option still match
                     **({"word_drop": cfg.text_word_drop} if cfg.text_word_drop > 0 else {})},
            "image": {**encoder_summary(cfg.image_encoder), "fingerprint": fingerprints["image"],
                      "dim": image.dim, "pooling": "pooler_output", "max_images": cfg.max_images},
            "runs": []}


def prepare_tables(cfg: EmbedConfig, domains: list[str], text: TextEncoder, image: ImageEncoder) -> list[dict]:
    """Main process: create, resume or refuse each domain's table. Returns the manifests."""
    fingerprints = {"text": encoder_fingerprint(cfg.text_encoder), "image": encoder_fingerprint(cfg.image_encoder)}
    manifests = []
    for domain in domains:
        catalog = read_catalog(Path(cfg.shards) / domain)
        want = _wanted_manifest(cfg, domain, catalog.num_rows, text, image, fingerprints)
        fdir = Path(cfg.out) / domain
        have = None if cfg.overwrite else read_manifest(fdir)  # overwrite=true also replaces a broken one
        if have is not None:
            if identity(have) != identity(want):
                raise FeatureTableError(f"{fdir} was embedded differently and will not be mixed: "
                                        f"{describe_mismatch(have, want)}. Use overwrite=true to start over.")
            manifests.append(have)
            continue
        price = catalog_array(catalog, "price_norm", np.float32)
        create_tables(fdir, catalog.num_rows, text.dim, image.dim, price)
        write_manifest(fdir, want)
        manifests.append(want)
    return manifests


def _work_units(cfg: EmbedConfig, domains: list[str]) -> list[tuple[int, str]]:
    """(domain index, shard) for every shard that still has rows to do, in a fixed order."""
    units = []
    for d, domain in enumerate(domains):
        done = np.load(Path(cfg.out) / domain / "done.npy", mmap_mode="r")
        shard_of = read_catalog(Path(cfg.shards) / domain).column("shard").to_numpy()
        todo_shards = set(np.unique(shard_of[~np.asarray(done)]).tolist())
        for url in shard_paths(Path(cfg.shards) / domain):
            if int(Path(url).stem.split("-")[1]) in todo_shards:
                units.append((d, url))
    return units


def _lock_output(cfg: EmbedConfig, accelerator) -> Optional[DirectoryLock]:
    """The main process locks `cfg.out` for the run; every rank raises if it could not.

    Only the main process takes the lock: flock is per open file description, so ranks opening
    the lock file each on their own would refuse one another. Its outcome is broadcast (a
    collective every rank joins) so that on refusal all ranks raise the same LockedError at
    once, instead of the others waiting for a main process that has given up.
    """
    from accelerate.utils import broadcast_object_list

    lock, refusal = None, None
    if accelerator.is_main_process:
        try:
            lock = acquire_dir_lock(cfg.out, "embedding pass")
        except LockedError as exc:
            refusal = exc
    message = broadcast_object_list([None if refusal is None else str(refusal)])[0]
    if refusal is not None:
        raise refusal
    if message is not None:
        raise LockedError(message)
    return lock


def run(cfg: EmbedConfig) -> dict:
    from accelerate import Accelerator

    accelerator = Accelerator()
    lock = _lock_output(cfg, accelerator)  # before anything is read or written
    try:
        return _run_locked(cfg, accelerator)
    finally:
        if lock is not None:
            lock.release()


def _run_locked(cfg: EmbedConfig, accelerator) -> dict:
    from accelerate.utils import gather_object
    from tqdm.auto import tqdm

    rank, world = accelerator.process_index, accelerator.num_processes
    device = accelerator.device
    domains = _domains(cfg)
    problem = [None]
    if accelerator.is_main_process:  # one reader of every shard; the verdict goes to every process
        try:
            _check_inputs(cfg, domains)
        except (FeatureTableError, EncoderError) as exc:
            problem = [str(exc)]
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(problem)
    if problem[0]:
        raise FeatureTableError(problem[0])
    try:
        text = TextEncoder(cfg.text_encoder, cfg.text_pooling, cfg.max_text_tokens)
        image = ImageEncoder(cfg.image_encoder)
    except (OSError, ValueError) as exc:  # a folder with a config.json that still does not load
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise EncoderError(f"cannot load the encoders from {cfg.text_encoder} and {cfg.image_encoder}: {first}") \
            from None
    text.model.to(device)
    image.model.to(device)
    if accelerator.is_main_process:
        prepare_tables(cfg, domains, text, image)
        save_config(cfg, Path(cfg.out) / "embed_config.yaml")
    accelerator.wait_for_everyone()

    feature_dirs = [str(Path(cfg.out) / d) for d in domains]
    tables = [FeatureTables.open(f) for f in feature_dirs]
    todo_at_start = [t.rows_left() for t in tables]
    units = _work_units(cfg, domains)[rank::world]
    # Every process must derive its share from the same done masks: nobody writes before all
    # have planned, or a fast process could shrink a slow one's view of the work.
    accelerator.wait_for_everyone()
    dataset = ShardItems(units, feature_dirs, cfg.image_encoder, cfg.text_encoder, cfg.max_text_tokens,
                         cfg.max_images, cfg.text_word_drop)
    workers = min(cfg.num_workers, len(units))
    # forked loader workers share the lock descriptor: they must not outlive this process
    loader = DataLoader(dataset, batch_size=cfg.batch_size, num_workers=workers, collate_fn=dataset.collate,
                        prefetch_factor=4 if workers else None, pin_memory=device.type == "cuda",
                        worker_init_fn=loader_worker_init())
    bar = tqdm(total=sum(todo_at_start), desc="embed", unit=" items", disable=not (cfg.progress and
                                                                                    accelerator.is_main_process))
    t0 = time.time()
    # a stop signal is acted on between batches; no collective is involved (each process owns
    # its rows), so every process stops on its own signal
    with flag_stop_signals() as stop:
        computed, failed, t_encode, t_text = _encode_all(loader, text, image, device, tables, bar, todo_at_start,
                                                         cfg.flush_every, stop)
    if stop["signal"]:
        bar.close()
        raise Stopped(f"stopped by signal {stop['signal']} after {computed} item(s) of this process; its "
                      f"finished rows are marked done: rerun the same command to continue")
    seconds = time.time() - t0
    stats = gather_object([{"rank": rank, "rows": computed, "seconds": round(seconds, 3),
                            "items_per_s": round(computed / max(seconds, 1e-9), 1),
                            "encoder_share": round(t_encode / max(seconds, 1e-9), 3),
                            "text_encoder_share": round(t_text / max(seconds, 1e-9), 3), "failed_images": failed}])
    accelerator.wait_for_everyone()
    bar.n = sum(todo_at_start) - sum(t.rows_left() for t in tables)
    bar.close()
    summary = {"processes": world, "per_process": stats, "rows_computed": sum(s["rows"] for s in stats),
               "seconds": round(seconds, 3)}
    if accelerator.is_main_process:
        summary["domains"] = _finish(cfg, domains, tables, todo_at_start, summary)
        _print_summary(summary)
    accelerator.wait_for_everyone()
    return summary


def _encode_all(loader, text: TextEncoder, image: ImageEncoder, device, tables: list[FeatureTables], bar,
                todo_at_start: list[int], flush_every: int, stop: dict) -> tuple[int, int, float, float]:
    """Encode every batch of this process into the tables (rows marked done every `flush_every`
    batches and at the end); returns (rows, failed images, encoder seconds, text seconds)."""
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast(
        "cpu", enabled=False)
    computed, failed, t_encode, t_text, pending = 0, 0, 0.0, 0.0, []
    last_bar = time.time()
    for i, batch in enumerate(loader):
        t1 = time.time()
        with autocast:
            tf = text.forward_tokens({k: v.to(device) for k, v in batch["tokens"].items()})
            if device.type == "cuda":
                torch.cuda.synchronize()  # GPU work is asynchronous: time it when it is done
            t_text += time.time() - t1
            imf = torch.zeros(len(batch["row"]), image.dim, device=device)
            has = torch.zeros(len(batch["row"]), dtype=torch.bool)
            if batch["pixels"] is not None:
                feats = image.forward_pixels(batch["pixels"])
                owner = batch["owner"].to(device)
                imf.index_add_(0, owner, feats.float())
                counts = torch.bincount(owner, minlength=len(batch["row"])).clamp(min=1)
                imf = imf / counts[:, None]  # mean over an item's images
                has[batch["owner"].unique()] = True
        tf, imf = tf.float().cpu().numpy().astype(np.float16), imf.cpu().numpy().astype(np.float16)
        t_encode += time.time() - t1
        dom, rows = batch["domain"].numpy(), batch["row"].numpy()
        for d in np.unique(dom):
            sel = dom == d
            tables[d].write(rows[sel], tf[sel], imf[sel], has.numpy()[sel])
            pending.append((d, rows[sel]))
        computed += len(rows)
        failed += batch["failed_images"]
        if (i + 1) % flush_every == 0:
            _flush(tables, pending)
            pending = []
        if bar.disable is False and time.time() - last_bar > 0.5:
            # every process writes the shared done masks: the bar shows all processes' progress
            bar.n = sum(todo_at_start) - sum(t.rows_left() for t in tables)
            bar.refresh()
            last_bar = time.time()
        if stop["signal"]:
            break
    _flush(tables, pending)
    return computed, failed, t_encode, t_text


def _flush(tables: list[FeatureTables], pending: list) -> None:
    """Mark the pending rows done: one flush of each touched table, not one per batch."""
    by_domain: dict[int, list[np.ndarray]] = {}
    for d, rows in pending:
        by_domain.setdefault(int(d), []).append(rows)
    for d, parts in by_domain.items():
        tables[d].mark_done(np.concatenate(parts))


def _finish(cfg: EmbedConfig, domains: list[str], tables: list[FeatureTables], todo_at_start: list[int],
            summary: dict) -> dict:
    out = {}
    for d, domain in enumerate(domains):
        fdir = Path(cfg.out) / domain
        manifest = read_manifest(fdir)
        left = tables[d].rows_left()
        catalog_img = catalog_array(read_catalog(Path(cfg.shards) / domain), "has_image", bool)
        has = np.asarray(tables[d].has_image)
        manifest["complete"] = left == 0
        manifest["items_with_image"] = int(has.sum())
        manifest["image_decode_failures"] = int((catalog_img & ~has).sum())
        manifest["runs"].append({"finished": time.strftime("%Y-%m-%dT%H:%M:%S"), "processes": summary["processes"],
                                 "rows_computed": todo_at_start[d] - left, "seconds": summary["seconds"]})
        write_manifest(fdir, manifest)
        if left:
            raise FeatureTableError(f"{fdir}: {left} rows still missing after the pass")
        out[domain] = {"rows": manifest["rows"], "rows_computed": todo_at_start[d],
                       "image_decode_failures": manifest["image_decode_failures"]}
    return out


def _print_summary(summary: dict) -> None:
    print(f"embedded {summary['rows_computed']} items in {summary['seconds']:.1f}s "
          f"with {summary['processes']} process(es)")
    for s in summary["per_process"]:
        print(f"  process {s['rank']}: {s['rows']} items, {s['items_per_s']:.1f} items/s, "
              f"{s['encoder_share']:.0%} of the time in the encoders ({s['text_encoder_share']:.0%} text)")
    for domain, d in summary.get("domains", {}).items():
        print(f"  {domain}: {d['rows']} rows complete ({d['rows_computed']} computed now, "
              f"{d['image_decode_failures']} undecodable images -> zero image vector)")


def main(argv: Optional[list[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args[:1] == ["verify"]:
        if any(a in ("-h", "--help") for a in args[1:]):
            print(VERIFY_HELP)
            return EXIT_OK
        if len(args) not in (2, 3):
            print("usage: python -m ant_dist.embed verify FEATURES/<domain> [SHARDS/<domain>]", file=sys.stderr)
            return EXIT_BAD_INPUT
        problems = verify(args[1], args[2] if len(args) == 3 else None)
        for p in problems:
            print(f"FAIL {args[1]}: {p}")
        if not problems:
            print(f"OK {args[1]}")
        return 1 if problems else 0
    cfg = parse_cli(EmbedConfig, args, "python -m ant_dist.embed", __doc__)
    die_with_launcher()  # a killed `accelerate launch` stops this process like SIGTERM: rows marked, exit 75
    try:
        run(cfg)
    except (FeatureTableError, LockedError, EncoderError) as exc:
        print(f"embed: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Stopped as exc:
        print(f"embed: {exc}", file=sys.stderr)
        return EXIT_STOPPED
    finally:
        close_process_group()
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
