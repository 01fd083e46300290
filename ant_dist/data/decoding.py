"""Decoding raw fields safely: text that is not UTF-8, and timestamps out of range.

Real catalogs mix encodings (one Latin-1 title in a UTF-8 file is common). Arrow infers a
binary column for a CSV field that is not valid UTF-8, and a binary value turned into text with
str() is the literal "b'...'": every item of the column would be stored and embedded that way.
So every text reader hands its table to `text_columns`, which decodes each field on its own, as
UTF-8 with U+FFFD for the bad bytes, and counts each field that needed it (`non_utf8_text`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ant_dist.data.bad_input import BadInputLog

# int64 seconds: a timestamp at or above 2**63 does not fit (as float64, 2**63 - 1 rounds up to it)
MAX_TIMESTAMP = float(2**63)


def text_columns(table: pa.Table, path: Path, log: BadInputLog, first_line: int) -> pa.Table:
    """Every binary column as UTF-8 strings, decoded per field with replacement (and counted).
    `first_line` is the file's line of row 0, for the examples."""
    for i, name in enumerate(table.column_names):
        col = table.column(i)
        if not (pa.types.is_binary(col.type) or pa.types.is_large_binary(col.type)):
            continue
        try:
            table = table.set_column(i, name, pc.cast(col, pa.string()))  # all valid: Arrow checks it
            continue
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            pass
        values = []
        for row, raw in enumerate(col.to_pylist()):
            if raw is None:
                values.append(None)
                continue
            try:
                values.append(raw.decode("utf-8"))
            except UnicodeDecodeError:
                text = raw.decode("utf-8", errors="replace")
                log.repair("non_utf8_text", f"{path.name}:{first_line + row}", f"{name}: {text[:80]}")
                values.append(text)
        table = table.set_column(i, name, pa.array(values, pa.string()))
    return table


def timestamp_ok(seconds: np.ndarray) -> np.ndarray:
    """Which float timestamps are usable: finite, not negative (before 1970: in rating data a
    sentinel or an error, not a time) and within int64."""
    with np.errstate(invalid="ignore"):
        return np.isfinite(seconds) & (seconds >= 0) & (seconds < MAX_TIMESTAMP)


def format_hint(path: Path, given: str = "table") -> str:
    """'; this looks like ...: did you mean format=...?' when the file's start gives its format
    away and it is not `given`; '' when it does not."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(4096)
    except OSError:
        return ""
    json_formats = ("amazon2018", "amazon2023")
    if head[:2] == b"\x1f\x8b":
        if given in json_formats:
            return ""  # a gzip stream: its lines are judged by the reader
        return "; this looks gzip-compressed, as Amazon JSON lines are: did you mean format=amazon2018 or amazon2023?"
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n")
    if text[:1] == b"{":
        if given in json_formats:
            return ""
        return "; this looks like JSON lines: did you mean format=amazon2018 (or amazon2023)?"
    first = text.split(b"\n", 1)[0]
    if (b":token" in first or b":float" in first) and given != "recbole":
        return "; this looks like a RecBole atomic file: did you mean format=recbole?"
    if text[:4] == b"PAR1":
        return "; this looks like Parquet: name it .parquet" if given == "table" else \
            "; this looks like Parquet: did you mean format=table (with a .parquet name)?"
    if given in json_formats and text:
        return "; this is not JSON lines: for a CSV, TSV or Parquet table use format=table"
    return ""
