"""Answer extraction and comparison for generated text. Pure string functions, no model, no I/O."""

from __future__ import annotations

import math
import re

# A number as people write it in GSM8K-style answers: optional sign, optional currency sign,
# digits with optional thousands commas, an optional decimal part ("-1,234.50", "$3", ".5").
_NUMBER = re.compile(r"(?<![\w.])[-−]?\$?(?:\d{1,3}(?:,\d{3})+|\d+)?(?:\.\d+)?(?![\w])")
_GSM8K_FINAL = re.compile(r"####\s*(.+?)\s*$", re.DOTALL)


def parse_number(text: str) -> float | None:
    """The value of one number written as text (commas, ``$``, unicode minus allowed), or None."""
    cleaned = text.strip().replace(",", "").replace("$", "").replace("−", "-").rstrip(".")
    if not cleaned or cleaned in {"-", "."}:
        return None
    try:
        value = float(cleaned)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def find_numbers(text: str) -> list[float]:
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


def extract_final_number(completion: str) -> float | None:
    """The model's final answer: the number after ``####`` when present, else the last number.

    Why the last number: a chain-of-thought answer states intermediate results first and the
    answer at the end, which is the convention of GSM8K and of lm-eval's ``flexible-extract``.
    """
    marked = _GSM8K_FINAL.search(completion)
    if marked:
        numbers = find_numbers(marked.group(1))
        if numbers:
            return numbers[0]
    numbers = find_numbers(completion)
    return numbers[-1] if numbers else None


def gsm8k_target(answer: str) -> float | None:
    """The reference number of a GSM8K ``answer`` field (the text after its last ``####``)."""
    if "####" not in answer:
        return None
    return parse_number(answer.rsplit("####", 1)[1])


def numbers_equal(a: float | None, b: float | None, *, rel_tol: float = 1e-6) -> bool:
    """Numeric equality of two extracted answers (``None`` never matches)."""
    if a is None or b is None:
        return False
    return math.isclose(a, b, rel_tol=rel_tol, abs_tol=1e-9)


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
