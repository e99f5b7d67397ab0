"""Answer extraction and comparison for generated text. Pure string functions, no model, no I/O.

GSM8K answers are compared *exactly*: both numbers are read as fractions (``Fraction("1.50")`` is
3/2) after removing thousands commas, ``$``, a trailing ``.`` and a unicode minus, so
``1000001`` never equals ``1000000`` (a relative tolerance once made it so).

Which ``####``: the prediction is read after the *first* ``####`` of the completion (a model that
runs on into a new question writes a second one after its answer), and a reference must hold
exactly one ``####`` (every GSM8K record does), so both sides are read after the same marker.

lm-evaluation-harness's two GSM8K filters are offered by name (``answer_filter`` of a gsm8k task)
so its numbers can be reproduced: ``strict-match`` and ``flexible-extract``, scored as its
``exact_match`` does (string equality after its ``regexes_to_ignore``, case folded).
"""

from __future__ import annotations

import re
from fractions import Fraction
from typing import Literal

# A number as people write it in GSM8K-style answers: optional sign, optional currency sign,
# digits with optional thousands commas, an optional decimal part ("-1,234.50", "$3", ".5").
_NUMBER = re.compile(r"(?<![\w.])[-−]?\$?(?:\d{1,3}(?:,\d{3})+|\d+)?(?:\.\d+)?(?![\w])")
_PLAIN = re.compile(r"-?(?:\d+(?:\.\d*)?|\.\d+)")
_MARK = "####"

AnswerFilter = Literal["exme", "strict-match", "flexible-extract"]
ANSWER_FILTERS: tuple[str, ...] = ("exme", "strict-match", "flexible-extract")
# lm-evaluation-harness gsm8k.yaml, verbatim: the filters and the exact_match normalisation.
STRICT_MATCH = r"#### (\-?[0-9\.\,]+)"
FLEXIBLE_EXTRACT = r"(-?[$0-9.,]{2,})|(-?[0-9]+)"
LM_EVAL_IGNORE = (",", r"\$", r"(?s).*#### ", r"\.$")
LM_EVAL_FALLBACK = "[invalid]"


def parse_number(text: str) -> Fraction | None:
    """The exact value of one number written as text (commas, ``$``, unicode minus, a final ``.``), or None."""
    cleaned = text.strip().replace(",", "").replace("$", "").replace("−", "-").rstrip(".")
    if not _PLAIN.fullmatch(cleaned):
        return None
    return Fraction(cleaned)


def find_numbers(text: str) -> list[Fraction]:
    """Every number in ``text`` in order of appearance."""
    values = []
    for match in _NUMBER.finditer(text):
        token = match.group(0)
        if not any(ch.isdigit() for ch in token):
            continue
        value = parse_number(token)
        if value is not None:
            values.append(value)
    return values


def extract_final_number(completion: str) -> Fraction | None:
    """The model's final answer: the first number after the first ``####`` when present, else the last number.

    Why the last number: a chain-of-thought answer states intermediate results first and the
    answer at the end, which is the convention of GSM8K and of lm-eval's ``flexible-extract``.
    """
    if _MARK in completion:
        numbers = find_numbers(completion.split(_MARK, 1)[1])
        if numbers:
            return numbers[0]
    numbers = find_numbers(completion)
    return numbers[-1] if numbers else None


def gsm8k_target(answer: str) -> Fraction | None:
    """The reference number of a GSM8K ``answer`` field: the text after its one ``####`` (None if not exactly one)."""
    if answer.count(_MARK) != 1:
        return None
    return parse_number(answer.split(_MARK, 1)[1])


def numbers_equal(a: Fraction | int | float | None, b: Fraction | int | float | None) -> bool:
    """Exact numeric equality of two extracted answers (``None`` never matches)."""
    if a is None or b is None:
        return False
    return Fraction(a) == Fraction(b)


def lm_eval_extract(completion: str, answer_filter: str) -> str:
    """The answer text lm-eval's ``strict-match`` (first match) or ``flexible-extract`` (last match) reads."""
    if answer_filter == "strict-match":
        pattern, select = STRICT_MATCH, 0
    elif answer_filter == "flexible-extract":
        pattern, select = FLEXIBLE_EXTRACT, -1
    else:
        raise ValueError(f"answer_filter {answer_filter!r} is not one of {list(ANSWER_FILTERS[1:])}")
    matches = re.findall(pattern, completion)
    if not matches:
        return LM_EVAL_FALLBACK
    match = matches[select]
    if isinstance(match, tuple):  # several groups: the one that matched
        match = next((group for group in match if group), LM_EVAL_FALLBACK)
    return match.strip()


def lm_eval_normalize(text: str) -> str:
    """lm-eval's exact_match normalisation for GSM8K: drop its ``regexes_to_ignore``, fold case."""
    for pattern in LM_EVAL_IGNORE:
        text = re.sub(pattern, "", text)
    return text.lower()


def score_gsm8k(completion: str, answer: str, answer_filter: str = "exme") -> tuple[str | int | float | None, bool]:
    """(prediction as recorded, correct) for one completion against a GSM8K ``answer`` field.

    ``exme``: exact numeric comparison of :func:`extract_final_number` and :func:`gsm8k_target`.
    ``strict-match`` / ``flexible-extract``: lm-eval's filter and string comparison, reference
    ``answer.split('####')[-1].strip()`` as its gsm8k task writes it.
    """
    if answer_filter == "exme":
        pred = extract_final_number(completion)
        ok = numbers_equal(pred, gsm8k_target(answer))
        shown = None if pred is None else (pred.numerator if pred.denominator == 1 else float(pred))
        return shown, ok
    pred_text = lm_eval_extract(completion, answer_filter)
    reference = answer.split(_MARK)[-1].strip()
    return pred_text, lm_eval_normalize(pred_text) == lm_eval_normalize(reference)


def normalize_text(text: str) -> str:
    """Whitespace-collapsed, stripped text: what exact match compares for free-form answers."""
    return " ".join(text.split())


def truncate_at_stop(text: str, stops: list[str] | tuple[str, ...]) -> str:
    """``text`` cut before the earliest occurrence of any stop string."""
    cut = len(text)
    for stop in stops:
        if stop:
            pos = text.find(stop)
            if pos != -1:
                cut = min(cut, pos)
    return text[:cut]
