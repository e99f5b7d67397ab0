"""Answer extraction: the number a GSM8K-style completion ends with, compared numerically."""

import pytest

from exme.evaluate.extract import (
    extract_final_number,
    find_numbers,
    gsm8k_target,
    numbers_equal,
    parse_number,
    truncate_at_stop,
)


@pytest.mark.parametrize(
    "completion, expected",
    [
        ("She pays 3 * 4 = 12 dollars. The answer is 1,234.", 1234.0),  # thousands comma, final dot
        ("The temperature drops to -7 degrees.", -7.0),  # negative
        ("Each costs $3.50, so 2 cost $7.00", 7.0),  # currency, decimals
        ("Half of it: 0.5", 0.5),
        ("Answer: .25", 0.25),
        ("It is 12.", 12.0),  # sentence dot is not a decimal point
        ("5 + 6 = 11\n#### 11", 11.0),
        ("#### 1,000,000 and later 3", 1_000_000.0),  # the #### answer wins over a later number
        ("from 3-4 people", 4.0),  # a hyphen after a digit is not a minus sign
        ("temperature of −3", -3.0),  # unicode minus
        ("no number here", None),
        ("", None),
        ("version v2 of x3", None),  # digits inside words are not numbers
    ],
)
def test_final_number_extraction(completion, expected):
    assert extract_final_number(completion) == expected


def test_find_numbers_in_order():
    assert find_numbers("1, 2,500 and -3.5 then 4") == [1.0, 2500.0, -3.5, 4.0]


def test_gsm8k_target_reads_text_after_last_marker():
    assert gsm8k_target("Natalia sold 48/2 = 24 clips.\n#### 1,024") == 1024.0
    assert gsm8k_target("#### -12.5") == -12.5
    assert gsm8k_target("no marker 12") is None


def test_parse_number_rejects_non_numbers():
    assert parse_number("abc") is None
    assert parse_number("-") is None
    assert parse_number("inf") is None
    assert parse_number("$1,200") == 1200.0


def test_numbers_compare_numerically():
    assert numbers_equal(12.0, 12)
    assert numbers_equal(0.1 + 0.2, 0.3)
    assert not numbers_equal(12.0, 12.5)
    assert not numbers_equal(None, 3.0)
    assert not numbers_equal(None, None)


def test_truncate_at_earliest_stop():
    assert truncate_at_stop("a b\n\nQuestion: c", ["Question:", "\n\n"]) == "a b"
    assert truncate_at_stop("abc", []) == "abc"
    assert truncate_at_stop("abc", ["", "z"]) == "abc"
