"""Readers for raw catalogs: Amazon 2018, Amazon 2023, a generic table format, RecBole atomic files.

Each reader streams its input, never trusts a field, and reports every dropped or repaired
record to a `BadInputLog`. Items come out as `RawItem`s keyed by id; interactions come out
as three parallel arrays (user id, item id, timestamp) for vectorised filtering.
"""

from __future__ import annotations

import gzip
import json
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from ant_dist.config import PACK_FORMATS
from ant_dist.data.bad_input import BadInputLog
from ant_dist.data.cleaning import item_text, parse_price, validate_price
from ant_dist.data.decoding import MAX_TIMESTAMP, format_hint, text_columns, timestamp_ok
from ant_dist.data.layout import IMAGE_EXTENSIONS

# accepted column names of format=table, by our name (the `columns` option maps any others)
ALIASES = {"id": ("id", "item_id"), "text": ("text", "title"), "price": ("price",), "image": ("image",),
           "user": ("user", "user_id"), "item": ("item", "item_id"), "timestamp": ("timestamp", "time")}


class InputError(ValueError):
    """Raw input that cannot be read at all (missing file, unknown format, missing columns)."""


@dataclass
class RawItem:
    text: str
    price: Optional[float]
    image_path: Optional[str] = None


@dataclass
class RawInteractions:
    users: pa.Array         # user id strings (Arrow: 10M ids cost ~10x less than Python strings)
    items: pa.Array         # item id strings
    timestamps: np.ndarray  # int64
    total_rows: int         # rows read, including the malformed ones


def _open_binary(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def _lines_until_corrupt(fh, path: Path, log: BadInputLog) -> Iterator[bytes]:
    """Lines of a (possibly gzipped) file; a truncated or corrupt gzip stream ends the file
    early and is counted (`corrupt_file`) instead of aborting the whole pack."""
    lineno = 0
    try:
        for lineno, raw in enumerate(fh, start=1):
            yield raw
    except (EOFError, OSError, zlib.error) as exc:
        log.skip("corrupt_file", f"{path.name}:{lineno + 1}", f"{type(exc).__name__}: {exc}")


def iter_json_lines(path: Path, log: BadInputLog, progress: bool = True) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each line that is a JSON object; the rest are counted.

    Non-UTF-8 bytes are replaced (U+FFFD) and counted as a repair, since the rest of the
    record is usually fine.
    """
    with _open_binary(path) as fh:
        bar = tqdm(_lines_until_corrupt(fh, path, log), desc=f"read {path.name}", unit=" lines",
                   disable=not progress, mininterval=1)
        for lineno, raw in enumerate(bar, start=1):
            if not raw.strip():
                continue
            where = f"{path.name}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                line = raw.decode("utf-8", errors="replace")
                log.repair("non_utf8_text", where, line[:80])
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                log.skip("malformed_json", where, exc.msg)
                continue
            if not isinstance(obj, dict):
                log.skip("malformed_json", where, "not a JSON object")
                continue
            yield lineno, obj


def _first_str(value) -> Optional[str]:
    if isinstance(value, str) and value.strip():
        return value.strip()
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return None


def meta_fields_2018(obj: dict):
    return (_first_str(obj.get("asin")), obj.get("title"), obj.get("category") or obj.get("categories"),
            obj.get("brand"), obj.get("price"))


def meta_fields_2023(obj: dict):
    return (_first_str(obj.get("parent_asin")), obj.get("title"), obj.get("categories"),
            obj.get("store"), obj.get("price"))


def read_items(fmt: str, meta: str | Path, log: BadInputLog, *, max_text_chars: int,
               max_price: float, progress: bool = True,
               columns: Optional[dict] = None) -> tuple[dict[str, RawItem], int]:
    """Item id -> RawItem from a metadata file, and the number of records read."""
    path = Path(meta)
    if not path.is_file():
        raise InputError(f"metadata file not found: {path}")
    if fmt == "table":
        return _read_items_table(path, log, max_text_chars=max_text_chars, max_price=max_price,
                                 columns=columns or {})
    if fmt == "recbole":
        return _read_items_recbole(path, log, max_text_chars=max_text_chars, max_price=max_price)
    if fmt not in PACK_FORMATS:
        raise InputError(f"unknown format {fmt!r}; expected one of {PACK_FORMATS}")
    fields = meta_fields_2018 if fmt == "amazon2018" else meta_fields_2023
    items: dict[str, RawItem] = {}
    records = 0
    for lineno, obj in iter_json_lines(path, log, progress):
        records += 1
        item_id, title, cats, brand, price_raw = fields(obj)
        _add_item(items, log, f"{path.name}:{lineno}", item_id, title, cats, brand, price_raw,
                  max_text_chars, max_price)
    # lines that were not even JSON are records too
    records += log.skipped["malformed_json"]
    return items, records


def _add_item(items: dict[str, RawItem], log: BadInputLog, where: str, item_id, title, cats, brand,
              price_raw, max_text_chars: int, max_price: float, drop_first_category: bool = True) -> None:
    if item_id is None:
        log.skip("missing_item_id", where)
        return
    if item_id in items:
        log.skip("duplicate_item", where, item_id)  # first occurrence wins
        return
    text = item_text(title, cats, brand, max_text_chars, drop_first_category)
    if not text:
        log.skip("empty_text", where, item_id)
        return
    price, reason = validate_price(parse_price(price_raw), max_price)
    if reason:
        log.repair(reason, where, f"{item_id}: {price_raw!r} -> null")
    items[item_id] = RawItem(text=text, price=price)


def _read_table(path: Path, log: BadInputLog) -> pa.Table:
    """A CSV/TSV/Parquet table; CSV fields stay text as written (ids such as 007, prices such as
    "12,99"), each decoded on its own (decoding.py)."""
    try:
        if path.suffix == ".parquet":
            return text_columns(pq.read_table(path), path, log, first_line=1)
        if path.suffix in (".csv", ".gz", ".tsv"):
            opts = pacsv.ParseOptions(delimiter="\t" if ".tsv" in path.suffixes else ",")
            names = pacsv.open_csv(path, parse_options=opts).schema.names
            convert = pacsv.ConvertOptions(column_types={n: pa.binary() for n in names}, strings_can_be_null=True)
            return text_columns(pacsv.read_csv(path, parse_options=opts, convert_options=convert), path, log,
                                first_line=2)
    except (pa.ArrowInvalid, OSError, EOFError) as exc:
        problem = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(f"{path}: cannot read as a table ({problem}){format_hint(path)}") from None
    raise InputError(f"{path}: expected .csv, .tsv or .parquet")


def canonical_columns(table: pa.Table, path: Path, required: tuple[str, ...], optional: tuple[str, ...],
                      columns: dict) -> pa.Table:
    """A table with our column names: from `columns` (ours -> theirs), else the first accepted alias."""
    names = table.column_names
    unknown = sorted(set(columns) - set(ALIASES))
    if unknown:
        raise InputError(f"columns: unknown name(s) {unknown}; ours are {sorted(ALIASES)}")
    picked = {}
    for ours in required + optional:
        if ours in columns:
            if columns[ours] not in names:
                raise InputError(f"{path}: columns.{ours}={columns[ours]!r} is not a column of the file; "
                                 f"it has {names}")
            picked[ours] = columns[ours]
        else:
            found = next((a for a in ALIASES[ours] if a in names), None)
            if found is not None:
                picked[ours] = found
    missing = [c for c in required if c not in picked]
    if missing:
        accepted = "; ".join(f"{c}: {' or '.join(ALIASES[c])}" for c in missing)
        hint = format_hint(path)
        if hint:  # the columns of a file in another format are noise: the hint is the message
            raise InputError(f"{path}: no column for {missing}{hint}")
        raise InputError(f"{path}: no column for {missing} (accepted names: {accepted}; or map yours with "
                         f"columns.<ours>=<yours>); the file has {names}")
    return pa.table({ours: table.column(theirs) for ours, theirs in picked.items()})


def _read_items_table(path: Path, log: BadInputLog, *, max_text_chars: int, max_price: float, columns: dict):
    table = canonical_columns(_read_table(path, log), path, ("id", "text"), ("price", "image"), columns)
    records = table.to_pylist()  # not pandas: it turns a missing string into NaN, a "bad" price
    items: dict[str, RawItem] = {}
    for i, rec in enumerate(records):
        item_id = _first_str(rec.get("id"))
        _add_item(items, log, f"{path.name}:row {i + 2}", item_id, rec.get("text"), [], None,
                  rec.get("price"), max_text_chars, max_price, drop_first_category=False)
        image = rec.get("image")
        if item_id in items and isinstance(image, str) and image.strip():
            img = Path(image.strip())
            items[item_id].image_path = str(img if img.is_absolute() else path.parent / img)
    return items, len(records)


def recbole_header(path: Path) -> tuple[list[str], dict[str, str]]:
    """Column names and RecBole types of an atomic file (`name:type` tab-separated header)."""
    with open(path, encoding="utf-8", errors="replace") as f:
        header = f.readline().rstrip("\r\n").split("\t")
    names, types = [], {}
    for field in header:
        name, _, kind = field.partition(":")
        if not name or kind not in ("token", "token_seq", "float", "float_seq"):
            raise InputError(f"{path}: not a RecBole atomic file (header field {field!r} is not name:type with "
                             f"type token, token_seq, float or float_seq)")
        names.append(name)
        types[name] = kind
    return names, types


def _read_recbole_table(path: Path, log: BadInputLog) -> tuple[pa.Table, dict[str, str], list[int]]:
    names, types = recbole_header(path)
    bad_lines: list[int] = []

    def on_invalid(row) -> str:
        bad_lines.append(row.number or 0)
        log.skip("malformed_row", f"{path.name}:{row.number}", row.text)
        return "skip"

    read = pacsv.ReadOptions(column_names=names, skip_rows=1, use_threads=False, block_size=64 << 20)
    parse = pacsv.ParseOptions(delimiter="\t", quote_char=False, invalid_row_handler=on_invalid,
                               ignore_empty_lines=True)
    convert = pacsv.ConvertOptions(column_types={n: pa.binary() for n in names}, strings_can_be_null=True)
    try:
        table = pacsv.read_csv(path, read_options=read, parse_options=parse, convert_options=convert)
    except (pa.ArrowInvalid, OSError, EOFError) as exc:
        raise InputError(f"{path}: cannot parse as a RecBole atomic file: {exc}") from None
    return text_columns(table, path, log, first_line=2), types, bad_lines


def _read_items_recbole(path: Path, log: BadInputLog, *, max_text_chars: int, max_price: float):
    """`.item`: item_id:token; every token_seq field (title, genres, ...) joins the item text."""
    table, types, bad_lines = _read_recbole_table(path, log)
    if "item_id" not in types:
        raise InputError(f"{path}: a RecBole .item file needs an item_id:token column, has {list(types)}")
    text_fields = [n for n, t in types.items() if t == "token_seq"]
    if not text_fields:
        raise InputError(f"{path}: no token_seq field to make item texts from (has {list(types)})")
    ids = table.column("item_id").to_pylist()
    texts = [table.column(n).to_pylist() for n in text_fields]
    prices = table.column("price").to_pylist() if types.get("price") == "float" else [None] * len(ids)
    items: dict[str, RawItem] = {}
    for i, item_id in enumerate(ids):
        text = ". ".join(t[i].strip() for t in texts if t[i] and t[i].strip())
        _add_item(items, log, f"{path.name}:{i + 2}", _first_str(item_id), text, [], None, prices[i],
                  max_text_chars, max_price, drop_first_category=False)
    return items, len(ids) + len(bad_lines)


def index_images(folder: Optional[str | Path]) -> dict[str, str]:
    """Item id -> image path for files named <item_id>.<jpg|jpeg|png|webp> in one folder."""
    if not folder:
        return {}
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"image folder not found: {folder}")
    found: dict[str, str] = {}
    rank = {ext: i for i, ext in enumerate(IMAGE_EXTENSIONS)}
    with os.scandir(folder) as it:
        entries = sorted((e.name for e in it if e.is_file()))
    for name in entries:
        stem, _, ext = name.rpartition(".")
        ext = ext.lower()
        if not stem or ext not in rank:
            continue
        prev = found.get(stem)
        if prev is None or rank[ext] < rank[prev.rpartition(".")[2].lower()]:
            found[stem] = str(folder / name)
    return found


# ----------------------------------------------------------------------------- interactions
def read_interactions(fmt: str, path: str | Path, log: BadInputLog, progress: bool = True,
                      columns: Optional[dict] = None) -> RawInteractions:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"interactions file not found: {path}")
    name = path.name.lower()
    if fmt == "amazon2018" and (name.endswith(".csv") or name.endswith(".csv.gz")):
        return _interactions_from_csv(path, log, ["item", "user", "rating", "timestamp"], header=False)
    if fmt == "table":
        if path.suffix == ".parquet":
            table = canonical_columns(_read_table(path, log), path, ("user", "item", "timestamp"), (), columns or {})
            return _interactions_from_table(table, path, log, lineno_offset=1, total=table.num_rows)
        return _interactions_from_csv(path, log, None, header=True, columns=columns or {})
    if fmt == "recbole":
        table, types, bad_lines = _read_recbole_table(path, log)
        table = canonical_columns(table, path, ("user", "item", "timestamp"), (), {})
        return _interactions_from_table(table, path, log, lineno_offset=2, total=table.num_rows + len(bad_lines),
                                        bad_lines=bad_lines)
    keys = {"amazon2018": ("reviewerID", "asin", "unixReviewTime"),
            "amazon2023": ("user_id", "parent_asin", "timestamp")}
    if fmt not in keys:
        raise InputError(f"unknown format {fmt!r}; expected one of {PACK_FORMATS}")
    return _interactions_from_json(path, log, *keys[fmt], progress=progress)


def _interactions_from_json(path: Path, log: BadInputLog, user_key: str, item_key: str, time_key: str,
                            progress: bool) -> RawInteractions:
    users: list[str] = []
    items: list[str] = []
    times: list[int] = []
    before = log.skipped["malformed_json"]
    records = 0
    for lineno, obj in iter_json_lines(path, log, progress):
        records += 1
        user, item, ts = _first_str(obj.get(user_key)), _first_str(obj.get(item_key)), obj.get(time_key)
        if user is None or item is None:
            log.skip("missing_field", f"{path.name}:{lineno}", f"no {user_key} or {item_key}")
            continue
        try:
            ts_int = int(ts) if not isinstance(ts, bool) else None
        except (TypeError, ValueError, OverflowError):
            ts_int = None
        if ts_int is None or not 0 <= ts_int < MAX_TIMESTAMP:
            log.skip("bad_timestamp", f"{path.name}:{lineno}", repr(ts))
            continue
        users.append(user)
        items.append(item)
        times.append(ts_int)
    total = records + log.skipped["malformed_json"] - before
    return RawInteractions(pa.array(users, pa.string()), pa.array(items, pa.string()),
                           np.array(times, dtype=np.int64), total)


def _interactions_from_csv(path: Path, log: BadInputLog, names: Optional[list[str]],
                           header: bool, columns: Optional[dict] = None) -> RawInteractions:
    bad_lines: list[int] = []

    def on_invalid(row) -> str:
        bad_lines.append(row.number or 0)
        log.skip("malformed_row", f"{path.name}:{row.number}", row.text)
        return "skip"

    # Single-threaded parsing keeps the line numbers of bad rows exact.
    read = pacsv.ReadOptions(column_names=names, use_threads=False, block_size=64 << 20)
    parse = pacsv.ParseOptions(invalid_row_handler=on_invalid, ignore_empty_lines=True)
    want = ("user", "item", "timestamp")
    # ids stay strings whatever they look like ("007" is not 7); absent names are ignored
    as_text = set(names or []) | {a for c in want for a in ALIASES[c]} | set((columns or {}).values())
    convert = pacsv.ConvertOptions(column_types={c: pa.binary() for c in as_text}, strings_can_be_null=True)
    try:
        table = pacsv.read_csv(path, read_options=read, parse_options=parse, convert_options=convert)
    except (pa.ArrowInvalid, OSError, EOFError) as exc:
        problem = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(f"{path}: cannot parse as CSV ({problem}){format_hint(path)}") from None
    table = canonical_columns(text_columns(table, path, log, first_line=2 if header else 1), path, want, (),
                              columns or {})
    # Line number of parsed row i: i + 1 (+1 for a header) + bad rows before it.
    return _interactions_from_table(table, path, log, lineno_offset=2 if header else 1,
                                    total=table.num_rows + len(bad_lines), bad_lines=bad_lines)


def _trimmed_strings(col) -> pa.Array:
    arr = pc.utf8_trim_whitespace(col.cast(pa.string()))
    return arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else arr


def _timestamps(col) -> np.ndarray:
    """float64 timestamps, NaN where a value is not a number (fast path: Arrow's cast)."""
    try:
        return pc.cast(col, pa.float64()).to_numpy(zero_copy_only=False).astype(np.float64)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        values = pd.to_numeric(pd.Series(col.to_numpy(zero_copy_only=False)), errors="coerce")
        return values.to_numpy(dtype=np.float64, na_value=np.nan)


def _interactions_from_table(table: pa.Table, path: Path, log: BadInputLog, lineno_offset: int,
                             total: int, bad_lines: Optional[list[int]] = None) -> RawInteractions:
    users = _trimmed_strings(table.column("user"))
    items = _trimmed_strings(table.column("item"))
    ts_col = table.column("timestamp")
    ts_values = _timestamps(ts_col)

    def non_empty(arr: pa.Array) -> np.ndarray:
        return pc.fill_null(pc.greater(pc.utf8_length(arr), 0), False).to_numpy(zero_copy_only=False)

    fields_ok = non_empty(users) & non_empty(items)
    ts_ok = timestamp_ok(ts_values)
    bad_sorted = np.sort(np.asarray(bad_lines or [], dtype=np.int64))

    def line_of(i: int) -> int:
        line = i + lineno_offset
        # shift past malformed rows that the parser dropped before this one
        while True:
            shift = int(np.searchsorted(bad_sorted, line, side="right"))
            if i + lineno_offset + shift == line:
                return line
            line = i + lineno_offset + shift

    for i in np.flatnonzero(~fields_ok)[: log.examples_per_reason]:
        log.example("missing_field", f"{path.name}:{line_of(int(i))}", "empty user or item")
    log.skipped["missing_field"] += int((~fields_ok).sum())
    bad_ts = fields_ok & ~ts_ok
    for i in np.flatnonzero(bad_ts)[: log.examples_per_reason]:
        log.example("bad_timestamp", f"{path.name}:{line_of(int(i))}", repr(ts_col[int(i)].as_py()))
    log.skipped["bad_timestamp"] += int(bad_ts.sum())
    keep = fields_ok & ts_ok
    mask = pa.array(keep)
    return RawInteractions(users.filter(mask), items.filter(mask), ts_values[keep].astype(np.int64), total)
