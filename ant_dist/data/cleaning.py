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


# A price field: currency marks around a number, or a range of two. See docs/data.md ("Prices")
# for the rules as a table; tests/test_cleaning.py checks each row.
_CURRENCY = re.compile(r"^(?:[A-Z]{3}|US\$|[$€£¥₹])\s*|\s*(?:[A-Z]{3}|[$€£¥₹])$", re.IGNORECASE)
_UNKNOWN_PRICE = {"", "n/a", "na", "none", "null", "-", "unknown"}
_RANGE = re.compile(r"^(.+?)\s+(?:-|–|to)\s+(.+)$")
_SCIENTIFIC = re.compile(r"^\d+(?:\.\d+)?[eE][+-]?\d+$")
_GROUPED = re.compile(r"^\d{1,3}(?:([,. '\u00a0\u202f])\d{3})+$")  # thousands groups only
BAD_PRICE = float("nan")


def _amount(text: str) -> float:
    """One amount without currency marks, or BAD_PRICE when it is ambiguous or not a number."""
    if _SCIENTIFIC.fullmatch(text):
        value = float(text)
        return value if math.isfinite(value) else BAD_PRICE
    if text.isdigit():
        return float(text)
    grouped = _GROUPED.fullmatch(text)
    if grouped:  # digits in groups of three and nothing else
        mark = grouped.group(1)
        if text.count(mark) > 1 or mark not in ",.":  # "1,299,000", "1.299.000", "1 299"
            return float(re.sub(r"\D", "", text))
        if mark == ",":
            return BAD_PRICE  # "1,299": 1299 with a thousands comma, or 1.299 with a decimal comma
        # "1.299": a point is a decimal point when it stands alone (the common reading)
    last = max(text.rfind("."), text.rfind(","))
    head, sep, tail = text[:last], text[last:last + 1], text[last + 1:]
    if not tail.isdigit():
        return BAD_PRICE
    if not head:
        head = "0"  # ".99"
    elif not head.isdigit():
        groups = _GROUPED.fullmatch(head)
        if not groups or groups.group(1) == sep:  # "12.5.3", "1,2,3": groups must use another mark
            return BAD_PRICE
        head = re.sub(r"\D", "", head)
    return float(f"{head}.{tail}")


def parse_price(value: Any) -> Optional[float]:
    """A price in currency units; None when the field holds none; BAD_PRICE (NaN) when it holds
    something that is not an unambiguous price (`validate_price` then counts it as bad_price).

    Numbers: finite ones as they are. Strings: currency marks before or after ($, €, £, ¥, ₹,
    US$, or a 3-letter code such as USD or EUR) are dropped; a decimal comma or point; thousands
    groups of the other mark, or of spaces or apostrophes ("1.299,50", "1,299.99", "1 299,00");
    scientific notation ("1.5e3"); a range "A - B" is its midpoint; a leading minus is kept for
    `validate_price` to reject; a leading "from" is dropped. "1,299" (one comma, three digits) is
    ambiguous and bad.
    """
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value) if math.isfinite(value) else BAD_PRICE
    if not isinstance(value, str):
        return BAD_PRICE
    text = value.strip()
    if text.lower() in _UNKNOWN_PRICE:
        return None
    both = _RANGE.fullmatch(text)
    if both:
        low, high = parse_price(both.group(1)), parse_price(both.group(2))
        if low is None or high is None or math.isnan(low) or math.isnan(high) or low < 0 or high < 0:
            return BAD_PRICE
        return (low + high) / 2
    if text[:5].lower() == "from ":  # a lower bound ("from 3.00", seen in Amazon 2023): taken as the price
        text = text[5:].strip()
    sign = 1.0
    for _ in range(3):  # marks and a sign in any order: "-$5", "$-5.00", "5 EUR"
        if text.startswith("-"):
            sign, text = -sign, text[1:].strip()
        text = _CURRENCY.sub("", text).strip()
    if not text or not (text[0].isdigit() or text[0] == "."):
        return BAD_PRICE
    amount = _amount(text.replace("\u00a0", " ").replace("\u202f", " "))
    return sign * amount if not math.isnan(amount) else BAD_PRICE


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
