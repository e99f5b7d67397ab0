"""Answer extraction: the number a GSM8K-style completion ends with, compared numerically."""

import re
from fractions import Fraction

import pytest

from exme.evaluate.extract import (
    extract_final_number,
    find_numbers,
    gsm8k_target,
    lm_eval_extract,
    numbers_equal,
    parse_number,
    score_gsm8k,
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


def test_gsm8k_target_reads_text_after_its_one_marker():
    assert gsm8k_target("Natalia sold 48/2 = 24 clips.\n#### 1,024") == 1024
    assert gsm8k_target("#### -12.5") == Fraction(-25, 2)
    assert gsm8k_target("no marker 12") is None
    assert gsm8k_target("#### 3\n#### 4") is None  # two markers: which one is meant is unknowable


def test_parse_number_rejects_non_numbers():
    assert parse_number("abc") is None
    assert parse_number("-") is None
    assert parse_number("inf") is None
    assert parse_number("$1,200") == 1200.0


def test_numbers_compare_numerically():
    assert numbers_equal(12.0, 12)
    assert numbers_equal(parse_number("1.50"), parse_number("1.5"))
    assert not numbers_equal(12.0, 12.5)
    assert not numbers_equal(None, 3.0)
    assert not numbers_equal(None, None)


def test_truncate_at_earliest_stop():
    assert truncate_at_stop("a b\n\nQuestion: c", ["Question:", "\n\n"]) == "a b"
    assert truncate_at_stop("abc", []) == "abc"
    assert truncate_at_stop("abc", ["", "z"]) == "abc"


@pytest.mark.parametrize(
    "pred, ref",
    [("1000001", "1000000"), ("12345679", "12345678"), ("2,000,001", "2,000,000"), ("0.1", "0.10000001")],
)
def test_large_and_close_numbers_are_not_equal(pred, ref):
    """A relative tolerance once scored these as equal; lm-evaluation-harness scores all of them wrong."""
    assert not numbers_equal(parse_number(pred), parse_number(ref))
    for answer_filter in ("exme", "strict-match", "flexible-extract"):
        assert score_gsm8k(f"So the total is {pred}.\n#### {pred}", f"Work.\n#### {ref}", answer_filter)[1] is False


@pytest.mark.parametrize(
    "written, same_as",
    [("$1,234", "1234"), ("1234.", "1234"), ("−7", "-7"), ("1.50", "1.5"), ("0.5", ".5"), ("-0", "0")],
)
def test_normalised_forms_compare_equal(written, same_as):
    assert numbers_equal(parse_number(written), parse_number(same_as))


# lm-evaluation-harness gsm8k.yaml, copied into the test on purpose: the implementation must agree
# with these literal regexes (strict-match takes the first match, flexible-extract the last).
LM_STRICT = r"#### (\-?[0-9\.\,]+)"
LM_FLEX = r"(-?[$0-9.,]{2,})|(-?[0-9]+)"
LM_IGNORE = [",", "\\$", "(?s).*#### ", "\\.$"]


def _lm_eval_reference_score(completion: str, answer: str, which: str) -> bool:
    """An independent re-implementation of lm-eval's filter + exact_match for one item."""
    if which == "strict-match":
        found = re.findall(LM_STRICT, completion)
        pred = found[0] if found else "[invalid]"
    else:
        found = re.findall(LM_FLEX, completion)
        pred = [g for g in found[-1] if g][0] if found else "[invalid]"
    ref = answer.split("####")[-1].strip()
    for pattern in LM_IGNORE:
        pred, ref = re.sub(pattern, "", pred), re.sub(pattern, "", ref)
    return pred.strip().lower() == ref.lower()


TRICKY = [
    # completion, reference, exme, strict-match, flexible-extract (hand-worked)
    ("The answer is 1000001.\n#### 1000001", "#### 1000000", False, False, False),
    ("#### 12345679", "#### 12345678", False, False, False),
    ("so 2,000,001 in all\n#### 2,000,001", "#### 2,000,000", False, False, False),
    ("#### 2,000,000", "#### 2000000", True, True, True),
    ("It costs $18.\n#### $18", "#### 18", True, False, True),  # strict-match wants a digit after '#### '
    ("#### 18.00", "#### 18", True, False, False),  # lm-eval compares strings: 18.00 is not 18
    ("5 apples and 7 pears: 12", "#### 12", True, False, True),  # no marker: strict-match is invalid
    ("#### 12\n\nQuestion: how many? #### 99", "#### 12", True, True, False),  # first marker; flexible reads the last number
    ("The change is −3.", "#### -3", True, False, False),  # unicode minus: only exme reads it as a sign
    ("####12", "#### 12", True, False, True),  # strict-match needs the space
    ("I think 7.", "#### 7", True, False, True),
    ("nothing to say", "#### 4", False, False, False),
]


@pytest.mark.parametrize("completion, answer, exme, strict, flexible", TRICKY)
def test_tricky_completions_against_lm_eval_regexes(completion, answer, exme, strict, flexible):
    assert score_gsm8k(completion, answer, "exme")[1] is exme
    assert score_gsm8k(completion, answer, "strict-match")[1] is strict
    assert score_gsm8k(completion, answer, "flexible-extract")[1] is flexible
    assert _lm_eval_reference_score(completion, answer, "strict-match") is strict
    assert _lm_eval_reference_score(completion, answer, "flexible-extract") is flexible


def test_lm_eval_filters_pick_first_and_last_match():
    assert lm_eval_extract("#### 3 then #### 4", "strict-match") == "3"
    assert lm_eval_extract("3 then 4,5", "flexible-extract") == "4,5"
    assert lm_eval_extract("no digits", "strict-match") == "[invalid]"
