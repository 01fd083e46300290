import math

import pytest

from ant_dist.data.cleaning import (cap_text, clean_text, item_text, normalise_price, parse_price,
                                    safe_key, unsafe_key, validate_price)


@pytest.mark.parametrize("raw,expected", [
    ("$1,299.99", 1299.99), ("$10.99 - $24.99", 17.99), ("12", 12.0), (7, 7.0), (3.5, 3.5),
    ("", None), ("N/A", None), (None, None), (".a-box-inner{background-color:#fff}", None),
    ("-5", -5.0), ("$-5.00", -5.0), (float("nan"), None), (True, None),
])
def test_parse_price(raw, expected):
    got = parse_price(raw)
    assert (got is None and expected is None) or math.isclose(got, expected)


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
