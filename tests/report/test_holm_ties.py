"""Holm-adjusted p-values across ExMe's comparisons, and what the report says when nothing can be told apart.

Every expected number is computed here, independently of ``exme.report.stats``: Holm by hand on a
worked example and by its step-down rejection rule, McNemar's exact test from integer binomial
coefficients; the tie and zero-disagreement cases from hand-made per-item score arrays.
"""

from __future__ import annotations

import math
import re

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from exme.report.schema import FinalRow, RunResults, SplitScores
from exme.report.stats import holm, min_detectable, paired_comparison
from exme.report.verdict import compare, recommend, summary_lines


# --------------------------------------------------------------------------- Holm


def test_holm_hand_worked_example():
    # m = 4; sorted: 0.005 (×4 = 0.02), 0.01 (×3 = 0.03), 0.03 (×2 = 0.06), 0.04 (×1 = 0.04 → kept at 0.06,
    # the running maximum, so an adjusted p never falls below that of a smaller raw p).
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02], abs=1e-15)
    assert holm([0.5, 0.6]) == [1.0, 1.0]  # 2 × 0.5 = 1, capped at 1
    assert holm([0.02, 0.02]) == pytest.approx([0.04, 0.04], abs=1e-15)
    assert holm([0.013]) == [0.013]  # one comparison: nothing to adjust
    assert holm([]) == []


def _step_down_rejects(p: list[float], level: float) -> set[int]:
    """Holm's procedure as published: reject in ascending order while p_(k) ≤ level / (m − k + 1)."""
    m, rejected = len(p), set()
    for k, i in enumerate(sorted(range(m), key=lambda j: p[j]), start=1):
        if p[i] > level / (m - k + 1):
            break
        rejected.add(i)
    return rejected


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(0.0, 1.0), min_size=1, max_size=10), st.sampled_from([0.01, 0.05, 0.1, 0.2]))
def test_holm_adjusted_p_rejects_what_the_step_down_procedure_rejects(p, level):
    adjusted = holm(p)
    # The adjusted p is the smallest level at which the hypothesis is rejected; keep away from the
    # boundary, where the two sides compare the same product in a different floating-point order.
    assume(all(abs(a - level) > 1e-9 for a in adjusted))
    assert {i for i, a in enumerate(adjusted) if a <= level} == _step_down_rejects(p, level)
    assert all(a >= x for a, x in zip(adjusted, p))


def test_holm_agrees_with_statsmodels():
    multitest = pytest.importorskip("statsmodels.stats.multitest")
    p = [0.001, 0.2, 0.013, 0.04, 0.04, 0.5, 0.0001, 0.9, 0.03, 0.07]
    _, expected, _, _ = multitest.multipletests(p, method="holm")
    assert holm(p) == pytest.approx(list(expected), abs=1e-12)


def _split(per: list[float]) -> SplitScores:
    s = sum(per) / len(per)
    return SplitScores(overall=s, tasks={"t": s}, n_items={"t": len(per)},
                       per_item={"t": {str(i): float(x) for i, x in enumerate(per)}})


def _exact_mcnemar(n10: int, n01: int) -> float:
    n, k = n10 + n01, min(n10, n01)
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n)


def _family(exme_test: list[float], refs: dict[str, list[float]]) -> list[FinalRow]:
    dev = _split([1.0] * 5 + [0.0] * 5)
    rows = [FinalRow(name=name, kind="sft" if name.startswith("SFT") else "baseline", dev=dev, test=_split(per))
            for name, per in refs.items()]
    return rows + [FinalRow(name="ExMe", kind="exme", dev=dev, test=_split(exme_test))]


def test_the_verdict_reads_the_holm_adjusted_p():
    # ExMe right on 12 items SFT-1 gets wrong, wrong on 3 it gets right, 25 the same: raw McNemar p = 0.035
    # (the CI excludes 0: "better" alone); three baselines identical to ExMe (p = 1). Holm over the four:
    # 4 × 0.035 = 0.14, so the verdict must be "no detectable difference".
    exme = [1.0] * 12 + [0.0] * 3 + [1.0] * 10 + [0.0] * 15
    sft = [0.0] * 12 + [1.0] * 3 + [1.0] * 10 + [0.0] * 15
    rows = _family(exme, {"SFT-1": sft, "linear": exme, "ties": exme, "dare_ties": exme})
    comps = {c.b: c for c in compare(rows, {"t": 1.0}, split="test", n_resamples=2000, seed=0) if c.task == "overall"}
    raw = _exact_mcnemar(12, 3)
    head = comps["SFT-1"]
    assert head.p_value == pytest.approx(raw, rel=1e-12) and head.ci_low > 0
    assert head.family == 4 and head.p_holm == pytest.approx(min(1.0, 4 * raw), rel=1e-12)
    assert head.verdict == "no detectable difference"
    assert all(comps[b].p_holm == 1.0 and comps[b].n_disagree == 0 for b in ("linear", "ties", "dare_ties"))
    line = next(x for x in summary_lines(_results(rows, list(comps.values()))) if "SFT-1" in x)
    assert f"Holm-adjusted p = {4 * raw:.3g} over 4 comparisons" in line and line.endswith("no detectable difference")

    # Alone (a family of one) the same comparison keeps its raw p and says "better".
    alone = [c for c in compare(_family(exme, {"SFT-1": sft}), {"t": 1.0}, split="test", n_resamples=2000, seed=0)
             if c.task == "overall"][0]
    assert alone.p_holm == pytest.approx(raw, rel=1e-12) and alone.verdict == "better"


def _results(rows: list[FinalRow], comps, recommended=None) -> RunResults:
    return RunResults(exme_version="test", created="now", config={"stats": {"bootstrap": 500}},
                      suite={"name": "s", "weights": {"t": 1.0}}, ranking=[], final=rows, comparisons=comps,
                      recommended=recommended)


# --------------------------------------------------------------------------- zero disagreement


def test_no_disagreement_makes_the_detectable_difference_undefined(tmp_path):
    from exme.report.render import render

    zeros = [0.0] * 10  # every model scores 0 on every item, as a real 135M model did on GSM8K
    assert min_detectable([[0.0] * 10], [1.0]) is None  # type: ignore[list-item]
    p = paired_comparison(_split(zeros), _split(zeros), {"t": 1.0}, n_resamples=200)
    assert p is not None and p.mdd is None and p.n_disagree == 0 and p.diff == 0.0 and p.p_value == 1.0

    rows = _family(zeros, {"SFT-1": zeros, "linear": zeros})
    comps = compare(rows, {"t": 1.0}, split="test", n_resamples=200, seed=0)
    text = render(_results(rows, comps), tmp_path).read_text()
    outcome = re.search(r"## Outcome\n(.*?)\n## ", text, re.S).group(1)
    assert "about 0.0000" not in text
    assert "nothing could be told apart" in outcome and "undefined" in outcome
    assert "undefined (no item differs)" in outcome  # the table's "Detectable (80%)" cell
    line = next(x for x in summary_lines(_results(rows, comps)) if "SFT-1" in x)
    assert "same score on every one of the 10 items" in line and "nothing could tell them apart" in line


def test_one_disagreeing_item_still_gives_a_detectable_difference():
    a, b = [1.0] + [0.0] * 9, [0.0] * 10
    p = paired_comparison(_split(a), _split(b), {"t": 1.0}, n_resamples=200)
    # mean(d²) = 1/10 over 10 items: (z₀.₉₇₅ + z₀.₈) · √(0.1 / 10)
    assert p.n_disagree == 1 and p.mdd == pytest.approx((1.959963984540054 + 0.8416212335729143) * math.sqrt(0.01))


# --------------------------------------------------------------------------- ties in the recommendation


def _tie_rows(confirm: dict[str, list[float]]) -> list[FinalRow]:
    test = _split([0.0] * 10)
    dev = {"base": [0.0] * 10, "SFT-1": [1.0] * 3 + [0.0] * 7, "SFT-2": [1.0] * 2 + [0.0] * 8,
           "EXPO-1": [1.0] * 3 + [0.0] * 7, "ExMe": [1.0] * 4 + [0.0] * 6}
    kinds = {"base": "base", "SFT-1": "sft", "SFT-2": "sft", "EXPO-1": "expo", "ExMe": "exme"}
    return [FinalRow(name=n, kind=kinds[n], dev=_split(dev[n]), test=test, confirm=_split(confirm[n])) for n in dev]


PATHS = {"base": "/base", "SFT-1": "/sft/checkpoint-1", "SFT-2": "/sft/checkpoint-2", "ExMe": "/run/model"}


def test_a_full_tie_goes_to_the_sft_checkpoint_and_says_nothing_could_be_told_apart(tmp_path):
    from exme.report.render import render

    rows = _tie_rows({n: [0.0] * 12 for n in ("base", "SFT-1", "SFT-2", "EXPO-1", "ExMe")})
    comps = compare(rows, {"t": 1.0}, split="confirm", n_resamples=200, seed=0)
    rec = recommend(rows, comps, PATHS)
    assert rec.name == "SFT-1" and rec.path == "/sft/checkpoint-1"  # the best SFT on dev, not the base (first row)
    assert "nothing could be told apart" in rec.reason and "0.0000" in rec.reason
    text = render(_results(rows, compare(rows, {"t": 1.0}, split="test", n_resamples=200, seed=0) + comps, rec),
                  tmp_path).read_text()
    assert "**Recommended: SFT-1**" in text and "nothing could be told apart" in text


def test_a_tie_at_the_top_goes_to_the_sft_checkpoint_and_names_the_tie():
    # base and SFT-1 both 0.5 on confirm (different items), the rest lower: the base is first in the
    # table but the tie goes to the SFT checkpoint.
    half = [1.0] * 6 + [0.0] * 6
    rows = _tie_rows({"base": half[::-1], "SFT-1": half, "SFT-2": [0.0] * 12, "EXPO-1": [1.0] * 2 + [0.0] * 10,
                      "ExMe": [1.0] * 3 + [0.0] * 9})
    rec = recommend(rows, compare(rows, {"t": 1.0}, split="confirm", n_resamples=200, seed=0), PATHS)
    assert rec.name == "SFT-1" and "tied with base (ties go to the SFT checkpoint)" in rec.reason
    assert "nothing could be told apart" not in rec.reason


def test_a_tie_without_an_sft_checkpoint_goes_to_the_earlier_row_and_the_base_last():
    top = [1.0] * 5 + [0.0] * 7
    rows = _tie_rows({"base": top, "SFT-1": [1.0] * 2 + [0.0] * 10, "SFT-2": [0.0] * 12, "EXPO-1": top[::-1],
                      "ExMe": [0.0] * 12})
    rec = recommend(rows, compare(rows, {"t": 1.0}, split="confirm", n_resamples=200, seed=0), PATHS)
    assert rec.name == "EXPO-1" and "tied with base (ties go to the SFT checkpoint, else to the earlier row" in rec.reason


def test_without_a_tie_the_best_confirm_score_wins_even_if_it_is_the_base():
    rows = _tie_rows({"base": [1.0] * 7 + [0.0] * 5, "SFT-1": [1.0] * 6 + [0.0] * 6, "SFT-2": [0.0] * 12,
                      "EXPO-1": [0.0] * 12, "ExMe": [0.0] * 12})
    rec = recommend(rows, compare(rows, {"t": 1.0}, split="confirm", n_resamples=200, seed=0), PATHS)
    assert rec.name == "base" and "tied" not in rec.reason


def test_a_per_module_exme_row_without_a_positive_confirm_gain_is_not_recommended():
    """The per-module row (kind exme_module) obeys ExMe's rule: best confirm score, but not above the best SFT's
    confirm score by a positive margin, so the SFT checkpoint is recommended instead."""
    from exme.report.schema import FinalRow, SplitScores
    from exme.report.verdict import recommend

    def row(name, kind, dev, confirm):
        s = lambda v: SplitScores(overall=v, tasks={"t": v}, n_items={"t": 10})  # noqa: E731
        return FinalRow(name=name, kind=kind, params={}, dev=s(dev), confirm=s(confirm), test=s(confirm))

    rows = [row("base", "base", 0.30, 0.30), row("SFT-1", "sft", 0.50, 0.50), row("ExMe-module", "exme_module", 0.60, 0.50)]
    rec = recommend(rows, [], {"SFT-1": "/m/sft1", "ExMe-module": "/m/module"})
    assert rec.name == "SFT-1" and rec.path == "/m/sft1"
    assert "tied with ExMe-module" in rec.reason
    rows = [row("SFT-1", "sft", 0.50, 0.50), row("ExMe-module", "exme_module", 0.60, 0.55)]
    assert recommend(rows, [], {}).name == "ExMe-module"
