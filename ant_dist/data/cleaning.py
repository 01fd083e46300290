"""Pure functions that turn raw catalog fields into clean ones (text, price, keys).

Every rule here is documented in docs/data.md; the tests check them on hand-written cases.
"""

from __future__ import annotations

import html
import math
import re
from typing import Any, Iterable, Optional

_TAG = re.compile(r"<[^>]{0,200}>")
_SPACE = re.compile(r"\s+")
_NUMBER = re.compile(r"\d[\d,]*(?:\.\d+)?|\.\d+")
_SAFE_KEY_CHAR = re.compile(r"[A-Za-z0-9_-]")


def clean_text(value: Any) -> str:
    """HTML-unescape, drop tags, collapse whitespace. Non-strings become ''."""
    if value is None:
        return ""
    if not isinstance(value, str):
        value = str(value)
    # Twice: Amazon dumps are often double-escaped ("&amp;amp;").
    value = html.unescape(html.unescape(value))
    value = _TAG.sub(" ", value)
    return _SPACE.sub(" ", value).strip()


def cap_text(text: str, max_chars: int) -> str:
    """Cut to at most `max_chars`, at the last word boundary when there is one."""
    if len(text) <= max_chars:
        return text
    cut = text[:max_chars]
    space = cut.rfind(" ")
    return (cut[:space] if space > max_chars // 2 else cut).rstrip()


def _as_list(value: Any) -> list:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        out = []
        for v in value:  # Amazon 2014 nests category lists: [["A", "B"]]
            out.extend(_as_list(v) if isinstance(v, (list, tuple)) else [v])
        return out
    return [value]


def item_text(title: Any, categories: Iterable[Any] | Any, brand: Any, max_chars: int,
              drop_first_category: bool = True) -> str:
    """Title + sub-categories + brand, as UniSRec and ANT build item text.

    The first category of an Amazon item is the domain itself ("Grocery & Gourmet Food"),
    identical for every item, so it is dropped by default. Duplicated categories are kept once.
    """
    cats = [clean_text(c) for c in _as_list(categories)]
    if drop_first_category:
        cats = cats[1:]
    seen: set[str] = set()
    parts = [clean_text(title)]
    for c in cats:
        if c and c not in seen:
            seen.add(c)
            parts.append(c)
    parts.append(clean_text(brand))
    return cap_text(" ".join(p for p in parts if p), max_chars)


def parse_price(value: Any) -> Optional[float]:
    """A price in currency units from a number or a string, or None when there is none.

    Rules: "$1,299.99" -> 1299.99 (thousands separators dropped); a range
    "$10.99 - $24.99" -> the midpoint 17.99; anything without a number ("", "N/A",
    ".a-box-inner{...}" CSS junk seen in Amazon 2018) -> None. A leading minus sign is
    kept so that negative prices can be detected (and rejected) by `validate_price`.
    """
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value) if math.isfinite(value) else None
    if not isinstance(value, str):
        return None
    text = value.strip()
    if not text or "{" in text:  # CSS fragments in the 2018 dump
        return None
    numbers = [float(n.replace(",", "")) for n in _NUMBER.findall(text)]
    if not numbers or len(numbers) > 2:
        return None
    price = sum(numbers) / len(numbers)
    if text.lstrip("$€£ ").startswith("-") and len(numbers) == 1:
        price = -price
    return price


def validate_price(price: Optional[float], max_price: float) -> tuple[Optional[float], Optional[str]]:
    """(price, None) when plausible, (None, reason) when negative, zero-or-absurd or not finite."""
    if price is None:
        return None, None
    if not math.isfinite(price):
        return None, "bad_price"
    if price < 0:
        return None, "negative_price"
    if price > max_price:
        return None, "absurd_price"
    return price, None


def normalise_price(price: Optional[float], cap: float) -> Optional[float]:
    """Map a price to [0, 100] (the range the paper encodes): 100 * log1p(min(p, cap)) / log1p(cap).

    A log scale, with one cap for all domains, keeps cheap items distinguishable and makes a
    price mean the same in every domain (per-domain min-max scaling would not transfer).
    """
    if price is None:
        return None
    return 100.0 * math.log1p(min(max(price, 0.0), cap)) / math.log1p(cap)


def safe_key(item_id: str) -> str:
    """A WebDataset-safe, reversible sample key: every byte outside [A-Za-z0-9_-] becomes %XX.

    WebDataset splits a member name at its first '.', and '/' would create folders, so both
    must go; percent-encoding keeps distinct ids distinct.
    """
    out = []
    for ch in item_id:
        if _SAFE_KEY_CHAR.fullmatch(ch):
            out.append(ch)
        else:
            out.extend(f"%{b:02X}" for b in ch.encode("utf-8"))
    return "".join(out)


def unsafe_key(key: str) -> str:
    """Inverse of `safe_key`."""
    from urllib.parse import unquote

    return unquote(key)
