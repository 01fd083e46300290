import math

import pytest

from ant_dist.data.cleaning import (cap_text, clean_text, item_text, normalise_price, parse_price,
                                    safe_key, unsafe_key, validate_price)


BAD = "bad"  # a price that is there but not unambiguous: null, counted as bad_price

# One row per row of the table "Prices" in docs/data.md, in its order.
PRICE_RULES = [
    (12, 12.0), (3.5, 3.5), (float("inf"), BAD), (float("nan"), BAD), (None, None), (True, None),
    ("", None), ("N/A", None), ("null", None),
    ("12", 12.0), ("12.99", 12.99), ("12,99", 12.99), (".99", 0.99),
    ("$12.99", 12.99), ("€12,99", 12.99), ("12,99 €", 12.99), ("USD 7", 7.0), ("5 EUR", 5.0), ("US$3", 3.0),
    ("$1,299.99", 1299.99), ("EUR 1.299,50", 1299.5), ("1 299,00 €", 1299.0), ("1'299.00", 1299.0),
    ("1,299,000", 1299000.0), ("1.299.000", 1299000.0),
    ("1,299", BAD), ("1.299", 1.299),
    ("1.5e3", 1500.0), ("1e400", BAD),
    ("$10.99 - $24.99", 17.99), ("10 to 20", 15.0),
    ("-5", -5.0), ("$-5.00", -5.0),
    ("12.5.3", BAD), ("nan", BAD), ("from 3.00", 3.0), ("Call for price", BAD), (".a-box-inner{background-color:#fff}", BAD),
]


@pytest.mark.parametrize("raw,expected", PRICE_RULES)
def test_parse_price(raw, expected):
    got = parse_price(raw)
    if expected is None:
        assert got is None
    elif expected == BAD:
        assert got is not None and math.isnan(got)
        assert validate_price(got, 1e6) == (None, "bad_price")
    else:
        assert got == pytest.approx(expected)


def test_price_table_in_the_docs_is_the_tested_one():
    """docs/data.md's price table lists exactly these inputs and results."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "data.md").read_text()
    table = text[text.index("| price field |"):].split("\n\n", 1)[0].splitlines()[2:]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in table]
    documented = [(raw.strip("`"), stored) for raw, stored, _rule in cells]
    assert documented == [(_doc_input(raw), _doc_result(want)) for raw, want in PRICE_RULES]


def _doc_input(raw):
    return f'"{raw}"' if isinstance(raw, str) else repr(raw)


def _doc_result(want):
    return {None: "null", BAD: "null, counted `bad_price`"}.get(want, None) if want in (None, BAD) else repr(want)


def test_validate_price():
    assert validate_price(12.0, 1e6) == (12.0, None)
    assert validate_price(-1.0, 1e6) == (None, "negative_price")
    assert validate_price(2e6, 1e6) == (None, "absurd_price")
    assert validate_price(None, 1e6) == (None, None)


def test_normalise_price_log_scale():
    assert normalise_price(0.0, 1000) == 0.0
    assert normalise_price(1000.0, 1000) == pytest.approx(100.0)
    assert normalise_price(5000.0, 1000) == pytest.approx(100.0)  # capped
    assert normalise_price(math.e - 1, math.e ** 2 - 1) == pytest.approx(50.0)
    assert normalise_price(None, 1000) is None


def test_clean_text_and_item_text():
    assert clean_text("  Good &amp;amp; <b>Nice</b>\n\tthing ") == "Good & Nice thing"
    text = item_text("Title &amp; co", ["Domain", "Sub", "Sub", "Leaf"], "Brand", 1000)
    assert text == "Title & co Sub Leaf Brand"
    assert cap_text("alpha beta gamma", 12) == "alpha beta"


def test_safe_key_roundtrip_and_no_dots_or_slashes():
    for raw in ["B00.1/x", "plain_ID-1", "ü é", "a%2Eb"]:
        key = safe_key(raw)
        assert "." not in key and "/" not in key
        assert unsafe_key(key) == raw
    assert safe_key("a.b") != safe_key("a_b")
