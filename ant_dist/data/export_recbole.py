"""Export a packed domain as RecBole atomic files, so RecBole's baselines run on exactly our data.

    python -m ant_dist.export_recbole shards/<domain> --out DIR [name=NAME]
    python -m ant_dist.export_recbole domain_dir=shards/<domain> out=DIR       (the same)

Writes DIR/<name>/ (<name> = the domain folder's name by default), which RecBole finds with
`data_path=DIR dataset=<name>`:
- <name>.inter: `user_id:token item_id:token timestamp:float`, one row per kept interaction,
  i.e. after the packer's filtering (unknown items and duplicates dropped, k-core, last N);
- <name>.item: `item_id:token text:token_seq` (the packed item text) and `price:float` when
  any item has a price (empty = unknown);
- recbole.yaml: RecBole options that keep that data as it is (no further filtering, time
  order, leave-one-out split);
- export_recbole.json: what was exported (domain, counts, filtering, the tie rule); written
  last and deleted first, so a folder without it is not a finished export.

Tie rule: rows are written user by user, each user's rows in the packed sequence order. Rows of
one user with the same timestamp are therefore in our order in the file, and RecBole sorts with
stable sorts (by time, then by user and time), so it reproduces our sequences exactly. The
packer's own reader (format=recbole, tie_break=input, min_core=1) reads them back the same way.

Exit codes: 0 exported, 2 bad input (a missing or incompletely packed domain folder, ids that
an atomic file cannot hold, the output folder in use by another export).
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from omegaconf import OmegaConf
from tqdm.auto import tqdm

from ant_dist.config import ExportRecboleConfig, flag_overrides, parse_cli
from ant_dist.data.layout import CATALOG, INTERACTIONS, PACK_REPORT
from ant_dist.data.shards import iter_shard_samples, shard_paths
from ant_dist.runtime import staging
from ant_dist.runtime.atomic import atomic_path, write_text_atomic
from ant_dist.runtime.exit_codes import EXIT_BAD_INPUT, EXIT_OK
from ant_dist.runtime.locking import LockedError, exclusive_dir_lock

RECORD = "export_recbole.json"
RECBOLE_YAML = "recbole.yaml"
# Strings read as a missing value by default: pandas' list (RecBole's reader), plus pyarrow's (ours).
NULL_MARKERS = frozenset(pacsv.ConvertOptions().null_values) | {
    "", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN", "<NA>",
    "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"}


class ExportError(ValueError):
    """The domain folder cannot be exported (missing, incomplete, or not representable)."""


@dataclass
class PackedDomain:
    report: dict
    item_ids: pa.Array        # catalog row -> original item id
    prices: list              # catalog row -> price or None
    texts: list[str]          # catalog row -> item text (from the shards)
    user_ids: pa.Array        # one per user, in interactions.parquet order
    lengths: np.ndarray       # items per user
    item_rows: np.ndarray     # all users' sequences, concatenated (catalog rows)
    timestamps: np.ndarray    # int64, aligned with item_rows


# ----------------------------------------------------------------------------- reading
def _snapshot(domain_dir: Path) -> list:
    """Identity of every packed file: a packer that rewrites the folder changes it."""
    names = [CATALOG, INTERACTIONS, PACK_REPORT, *(Path(p).name for p in shard_paths(domain_dir))]
    out = []
    for n in names:
        try:
            st = os.stat(domain_dir / n)
            out.append((n, st.st_ino, st.st_mtime_ns, st.st_size))
        except FileNotFoundError:
            out.append((n, None))
    return out


def _check_complete(domain_dir: Path) -> dict:
    if not domain_dir.is_dir():
        raise ExportError(f"{domain_dir}: no such folder (expected a packed domain, e.g. shards/<domain>)")
    if not (domain_dir / CATALOG).is_file():
        raise ExportError(f"{domain_dir} is not a completely packed domain: no {CATALOG} (the packer writes it "
                          f"last; it has not finished, failed, or is running now)")
    for name in (PACK_REPORT, INTERACTIONS):
        if not (domain_dir / name).is_file():
            raise ExportError(f"{domain_dir} is not a completely packed domain: no {name}")
    try:
        report = json.loads((domain_dir / PACK_REPORT).read_text())
    except (OSError, ValueError) as exc:
        raise ExportError(f"{domain_dir / PACK_REPORT}: unreadable ({exc})") from None
    if report.get("status") != "complete":
        raise ExportError(f"{domain_dir}: {PACK_REPORT} says status={report.get('status')!r}, not 'complete'")
    if not shard_paths(domain_dir):
        raise ExportError(f"{domain_dir} is not a completely packed domain: no items-*.tar shards")
    return report


def _read_texts(domain_dir: Path, n_items: int, progress: bool) -> list[str]:
    texts: list[Optional[str]] = [None] * n_items
    bar = tqdm(total=n_items, desc=f"texts {domain_dir.name}", unit=" items", disable=not progress)
    for sample in iter_shard_samples(shard_paths(domain_dir)):
        row = json.loads(sample["json"])["row"]
        if not 0 <= row < n_items:
            raise ExportError(f"{domain_dir}: a shard holds row {row}, outside the catalog's {n_items} rows")
        texts[row] = sample["txt"].decode("utf-8")
        bar.update(1)
    bar.close()
    missing = [r for r, t in enumerate(texts) if t is None]
    if missing:
        raise ExportError(f"{domain_dir}: {len(missing)} catalog rows have no shard sample (first: row "
                          f"{missing[0]}); repack the domain")
    return texts  # type: ignore[return-value]


def read_packed_domain(domain_dir: str | Path, progress: bool = False) -> PackedDomain:
    """Everything the export needs from shards/<domain>/, checked for completeness and consistency."""
    domain_dir = Path(domain_dir)
    report = _check_complete(domain_dir)
    before = _snapshot(domain_dir)
    catalog = pq.read_table(domain_dir / CATALOG)
    inter = pq.read_table(domain_dir / INTERACTIONS)
    item_lists = inter.column("items").combine_chunks()
    ts_lists = inter.column("timestamps").combine_chunks()
    lengths = pc.list_value_length(item_lists).to_numpy(zero_copy_only=False).astype(np.int64)
    if not np.array_equal(lengths, pc.list_value_length(ts_lists).to_numpy(zero_copy_only=False)):
        raise ExportError(f"{domain_dir / INTERACTIONS}: items and timestamps differ in length for some user")
    rows = item_lists.flatten().to_numpy(zero_copy_only=False).astype(np.int64)
    ts = ts_lists.flatten().to_numpy(zero_copy_only=False).astype(np.int64)
    n_items = catalog.num_rows
    if len(rows) and (rows.min() < 0 or rows.max() >= n_items):
        raise ExportError(f"{domain_dir / INTERACTIONS}: item rows outside the catalog's {n_items} rows")
    if (lengths < 1).any():
        raise ExportError(f"{domain_dir / INTERACTIONS}: a user has an empty sequence; repack the domain")
    # Our order must be a time order: only then does RecBole's stable sort by time keep it.
    if (within_user_steps(ts, lengths) < 0).any():
        raise ExportError(f"{domain_dir / INTERACTIONS}: a sequence is not in time order; repack the domain")
    texts = _read_texts(domain_dir, n_items, progress)
    if _snapshot(domain_dir) != before:
        raise ExportError(f"{domain_dir} changed while it was read (a packer ran); run the export again")
    return PackedDomain(report, catalog.column("item_id").combine_chunks(), catalog.column("price").to_pylist(),
                        texts, inter.column("user_id").combine_chunks(), lengths, rows, ts)


def within_user_steps(timestamps: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """timestamp[i+1] - timestamp[i] for consecutive rows of the same user (sequences concatenated)."""
    same_user = np.ones(max(len(timestamps) - 1, 0), dtype=bool)
    same_user[np.cumsum(lengths)[:-1] - 1] = False  # the step from a user's last row to the next user's first
    return np.diff(timestamps)[same_user]


# ----------------------------------------------------------------------------- atomic files
def _check_tokens(values: pa.Array, what: str) -> None:
    """Ids must survive a tab-separated file read by both pandas (quoting on) and pyarrow."""
    bad_chars = pc.match_substring_regex(values, r'[\t\r\n]|^"')
    null_like = pc.is_in(values, value_set=pa.array(sorted(NULL_MARKERS), pa.string()))
    bad = pc.or_(pc.fill_null(bad_chars, True), pc.fill_null(null_like, True))
    if pc.any(bad).as_py():
        first = values.filter(bad)[0].as_py()
        raise ExportError(f"{what} {first!r} cannot be written to a RecBole atomic file (a tab, a line break or "
                          f"a leading quote, or a string RecBole reads as missing)")


def token_seq_field(text: str) -> str:
    """An item text as a `:token_seq` field that RecBole and our reader both read back unchanged.

    RecBole splits it on spaces (dropping empty tokens); pandas would treat a field that starts
    with a quote as quoted, or one such as "None" as missing, so those get one leading space,
    which RecBole's split and our reader's strip both drop again.
    """
    text = " ".join(text.split())  # tabs and line breaks would end the field (packed texts have none)
    if text.startswith('"') or text in NULL_MARKERS:
        return " " + text
    return text


def price_field(price: Optional[float]) -> str:
    """Positional notation (no exponent), shortest round-trip digits; empty = unknown."""
    if price is None or not np.isfinite(price):
        return ""
    return np.format_float_positional(price, trim="-")


def write_inter(path: Path, d: PackedDomain) -> None:
    """The .inter file: user by user, each user's rows in the packed order (see the tie rule)."""
    users = d.user_ids.take(pa.array(np.repeat(np.arange(len(d.lengths)), d.lengths)))
    table = pa.table({"user_id": users, "item_id": d.item_ids.take(pa.array(d.item_rows)),
                      "timestamp": pa.array(d.timestamps, pa.int64())})
    with atomic_path(path, fsync=True) as tmp, open(tmp, "wb") as fh:
        fh.write(b"user_id:token\titem_id:token\ttimestamp:float\n")
        pacsv.write_csv(table, fh, pacsv.WriteOptions(include_header=False, delimiter="\t", quoting_style="none"))


def write_item(path: Path, d: PackedDomain, with_price: bool, extra: Optional[dict] = None) -> None:
    """The .item file; `extra` adds token_seq columns (name -> one string per catalog row)."""
    extra = extra or {}
    with atomic_path(path, fsync=True) as tmp, open(tmp, "w", encoding="utf-8", newline="\n") as fh:
        fh.write("\t".join(["item_id:token", "text:token_seq", *(["price:float"] if with_price else []),
                            *(f"{name}:token_seq" for name in extra)]) + "\n")
        for row, (item_id, text, price) in enumerate(zip(d.item_ids.to_pylist(), d.texts, d.prices)):
            fields = [item_id, token_seq_field(text)] + ([price_field(price)] if with_price else [])
            fields += [token_seq_field(values[row]) for values in extra.values()]
            fh.write("\t".join(fields) + "\n")


def recbole_options(max_seq_len: int, with_price: bool, extra_item_fields: Sequence[str] = ()) -> dict:
    """RecBole options under which it uses the exported data as it is (our filtering already ran)."""
    return {
        "USER_ID_FIELD": "user_id", "ITEM_ID_FIELD": "item_id", "TIME_FIELD": "timestamp",
        "load_col": {"inter": ["user_id", "item_id", "timestamp"],
                     "item": ["item_id", "text"] + (["price"] if with_price else []) + list(extra_item_fields)},
        # no second k-core: truncation to the last N came after ours, so a refilter would drop more
        "user_inter_num_interval": "[0,inf)", "item_inter_num_interval": "[0,inf)",
        "val_interval": None,
        "rm_dup_inter": None,  # its sort is not stable; our data has no duplicate (user, item, time)
        "MAX_ITEM_LIST_LENGTH": max_seq_len,
        "eval_args": {"order": "TO", "split": {"LS": "valid_and_test"}, "group_by": "user", "mode": "full"},
    }


# ----------------------------------------------------------------------------- the export
def export_domain(cfg: ExportRecboleConfig, extra_item_fields: Optional[dict] = None,
                  packed: Optional[PackedDomain] = None) -> dict:
    """Export one packed domain; returns the record (also written to export_recbole.json).

    `extra_item_fields` (name -> one token string per catalog row) adds token_seq item columns
    (the S3-Rec baseline's attributes); `packed` is the domain when the caller has read it already.
    """
    domain_dir = Path(cfg.domain_dir)
    name = cfg.name or domain_dir.resolve().name
    if not name or "/" in name or name in (".", "..") or any(c in name for c in "\t\r\n"):
        raise ExportError(f"name must be a plain folder name, got {name!r}")
    d = packed if packed is not None else read_packed_domain(domain_dir, cfg.progress)
    extra = dict(extra_item_fields or {})
    for field, values in extra.items():
        if not field.isidentifier() or field in ("item_id", "text", "price") or len(values) != len(d.texts):
            raise ExportError(f"extra item field {field!r}: a new identifier with one value per item expected")
    _check_tokens(d.user_ids, "user id")
    _check_tokens(d.item_ids, "item id")
    with_price = any(p is not None for p in d.prices)
    out = Path(cfg.out) / name
    with exclusive_dir_lock(out, "RecBole export"):
        # built beside the folder and swapped in whole: a failure leaves the previous export as it was
        work = staging.begin(out)
        try:
            record = _write_export(work, name, domain_dir, d, with_price, extra)
        except BaseException:
            staging.abort(work)
            raise
        staging.commit(out, work)
    record["out"] = str(out)
    return record


def _write_export(out: Path, name: str, domain_dir: Path, d, with_price: bool, extra: dict) -> dict:
    write_inter(out / f"{name}.inter", d)
    write_item(out / f"{name}.item", d, with_price, extra)
    pack_cfg = d.report.get("config", {})
    max_seq_len = int(pack_cfg.get("max_seq_len", d.report.get("filtering", {}).get("max_seq_len", 50)))
    options = recbole_options(max_seq_len, with_price, list(extra))
    write_text_atomic(out / RECBOLE_YAML, "# RecBole options for this export (python -m ant_dist.export_recbole)\n"
                      + OmegaConf.to_yaml(OmegaConf.create(options)), fsync=True)
    ties = int((within_user_steps(d.timestamps, d.lengths) == 0).sum())
    record = {
        "dataset": name, "domain": d.report.get("domain"), "source": str(domain_dir.resolve()),
        "files": {"inter": f"{name}.inter", "item": f"{name}.item", "recbole_config": RECBOLE_YAML},
        "counts": {"users": len(d.lengths), "items": len(d.texts), "interactions": int(len(d.item_rows)),
                   "items_with_price": sum(p is not None for p in d.prices)},
        "filtering": d.report.get("filtering", {}),
        "pack_config": pack_cfg,
        "order": {
            "pack_tie_break": pack_cfg.get("tie_break"),
            "same_timestamp_ties": ties,
            "rule": "rows are grouped by user (user-id order) and each user's rows are in the packed sequence "
                    "order, so rows of one user with the same timestamp appear in the file in our order; "
                    "RecBole's sorts are stable, so it reproduces our sequences exactly",
        },
        "text": "text:token_seq is the packed item text (title, categories, brand), split on spaces by "
                "RecBole; a text starting with a quote or equal to a missing-value marker gets one leading "
                "space. Images are not exported.",
    }
    write_text_atomic(out / RECORD, json.dumps(record, indent=2, sort_keys=True) + "\n", fsync=True)
    return record


# ----------------------------------------------------------------------------- command line
def cli_overrides(argv: Sequence[str]) -> list[str]:
    """`shards/Food --out DIR` -> `domain_dir=shards/Food out=DIR`; key=value and flags pass through."""
    return flag_overrides(argv, ("domain_dir", "out", "name"), positional="domain_dir")


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = cli_overrides(sys.argv[1:] if argv is None else argv)
    cfg = parse_cli(ExportRecboleConfig, args, "python -m ant_dist.export_recbole", __doc__)
    try:
        record = export_domain(cfg)
    except (ExportError, LockedError) as exc:
        print(f"export_recbole: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    c = record["counts"]
    print(f"exported {record['domain']}: {c['users']} users, {c['items']} items, {c['interactions']} interactions "
          f"({record['order']['same_timestamp_ties']} same-timestamp ties kept in our order) to {record['out']}/")
    print(f"  RecBole: data_path={cfg.out} dataset={record['dataset']} "
          f"config_file_list=[{record['out']}/{RECBOLE_YAML}]")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
