"""Standard errors of score differences, checked against numpy and hand-worked cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from exme.report.schema import SplitScores
from exme.report.stats import (
    BINOMIAL,
    PAIRED,
    binomial_se,
    binomial_se_of_difference,
    difference,
    paired_se_of_difference,
    task_weights,
)


def test_task_weights_read_every_documented_suite_shape_and_normalise():
    names = ["a", "b", "c"]
    expected = {"a": 0.25, "b": 0.25, "c": 0.5}
    assert task_weights({"weights": {"a": 1, "b": 1, "c": 2}}, names) == expected
    assert task_weights({"tasks": {"a": {"weight": 1}, "b": {"weight": 1}, "c": {"weight": 2}}}, names) == expected
    assert task_weights({"tasks": [{"name": "a", "weight": 2}, {"name": "b", "weight": 2}, {"name": "c", "weight": 4}]}, names) == expected
    assert task_weights({"tasks": ["a", "b", "c"]}, names) == pytest.approx({n: 1 / 3 for n in names})


def test_binomial_se_of_one_score_is_the_weighted_binomial_formula():
    s = SplitScores(overall=0.0, tasks={"a": 0.5, "b": 0.9}, n_items={"a": 100, "b": 400})
    w = {"a": 0.25, "b": 0.75}
    by_hand = math.sqrt(0.25**2 * 0.25 / 100 + 0.75**2 * 0.09 / 400)
    assert binomial_se(s, w) == pytest.approx(by_hand, rel=1e-12)


def test_binomial_se_of_difference_single_task_matches_textbook_case():
    # Two accuracies 0.6 and 0.5 on 100 items: sqrt((0.24 + 0.25) / 100) = 0.07.
    a = SplitScores(overall=0.6, tasks={"t": 0.6}, n_items={"t": 100})
    b = SplitScores(overall=0.5, tasks={"t": 0.5}, n_items={"t": 100})
    assert binomial_se_of_difference(a, b, {"t": 1.0}) == pytest.approx(0.07, rel=1e-12)


def test_no_binomial_estimate_without_item_counts_or_for_scores_outside_unit_interval():
    a = SplitScores(overall=0.6, tasks={"t": 0.6})
    b = SplitScores(overall=0.5, tasks={"t": 0.5})
    assert binomial_se_of_difference(a, b, {"t": 1.0}) is None
    loss = SplitScores(overall=-3.2, tasks={"t": -3.2}, n_items={"t": 100})
    assert binomial_se_of_difference(loss, b, {"t": 1.0}) is None
    assert difference(loss, b, {"t": 1.0}).method is None


def test_paired_se_equals_numpy_weighted_per_item_difference():
    rng = np.random.default_rng(0)
    per_a = {"x": rng.integers(0, 2, 50).astype(float), "y": rng.integers(0, 2, 80).astype(float)}
    per_b = {"x": rng.integers(0, 2, 50).astype(float), "y": rng.integers(0, 2, 80).astype(float)}
    w = {"x": 0.4, "y": 0.6}

    def split(per):
        tasks = {t: float(v.mean()) for t, v in per.items()}
        return SplitScores(overall=sum(w[t] * tasks[t] for t in tasks), tasks=tasks,
                           n_items={t: len(v) for t, v in per.items()},
                           per_item={t: v.tolist() for t, v in per.items()})

    a, b = split(per_a), split(per_b)
    by_numpy = math.sqrt(sum(w[t] ** 2 * np.var(per_a[t] - per_b[t], ddof=1) / len(per_a[t]) for t in w))
    assert paired_se_of_difference(a, b, w) == pytest.approx(by_numpy, rel=1e-12)
    d = difference(a, b, w)
    assert d.method == PAIRED and d.se == pytest.approx(by_numpy, rel=1e-12)
    assert d.diff == pytest.approx(a.overall - b.overall, abs=1e-15)


def test_difference_falls_back_to_binomial_when_only_one_side_has_per_item_scores():
    a = SplitScores(overall=0.6, tasks={"t": 0.6}, n_items={"t": 100}, per_item={"t": [1.0] * 60 + [0.0] * 40})
    b = SplitScores(overall=0.5, tasks={"t": 0.5}, n_items={"t": 100})
    d = difference(a, b, {"t": 1.0})
    assert d.method == BINOMIAL and d.se == pytest.approx(0.07, rel=1e-12)
    assert d.z == pytest.approx(0.1 / 0.07, rel=1e-12) and d.within_noise is True


# --------------------------------------------------------------------------- paired statistics


from exme.report.stats import (  # noqa: E402
    Z_80,
    Z_975,
    bootstrap_distribution,
    mcnemar_p,
    min_detectable,
    paired_comparison,
    paired_se,
    sign_flip_p,
    verdict,
)


def _scores(per: dict[str, list[float]], w: dict[str, float]) -> SplitScores:
    tasks = {t: float(np.mean(v)) for t, v in per.items()}
    return SplitScores(overall=sum(w[t] * tasks[t] for t in tasks), tasks=tasks, n_items={t: len(v) for t, v in per.items()},
                       per_item={t: {str(i): float(x) for i, x in enumerate(v)} for t, v in per.items()})


def _exact_mcnemar(n10: int, n01: int) -> float:
    """Two-sided exact binomial test written out with integer binomial coefficients."""
    n, k = n10 + n01, min(n10, n01)
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n)


def test_paired_se_and_mdd_hand_worked_case():
    d = np.array([1.0, 0.0, 0.0, -1.0])
    # var(d, ddof=1) = 2/3, so SE = √(2/3 / 4); mean(d²) = 1/2, so MDD = (1.96 + 0.84)·√(1/2 / 4).
    assert paired_se([d], [1.0]) == pytest.approx(math.sqrt(2 / 3 / 4), rel=1e-12)
    assert min_detectable([d], [1.0]) == pytest.approx((Z_975 + Z_80) * math.sqrt(0.5 / 4), rel=1e-12)
    assert Z_975 == pytest.approx(1.959964, abs=1e-6) and Z_80 == pytest.approx(0.841621, abs=1e-6)


@pytest.mark.parametrize("n10,n01", [(0, 0), (5, 0), (7, 3), (30, 41), (120, 95), (0, 17)])
def test_mcnemar_equals_the_exact_binomial_test(n10, n01):
    a = np.array([1.0] * n10 + [0.0] * n01 + [1.0] * 9 + [0.0] * 4)
    b = np.array([0.0] * n10 + [1.0] * n01 + [1.0] * 9 + [0.0] * 4)
    expected = 1.0 if n10 + n01 == 0 else _exact_mcnemar(n10, n01)
    assert mcnemar_p(a, b) == pytest.approx(expected, rel=1e-10)


def test_mcnemar_hand_worked_case():
    # 6 discordant, 5 in favour of a: P(X ≤ 1) = (1 + 6) / 64, two-sided 14/64.
    a = np.array([1, 1, 1, 1, 1, 0, 1, 0], dtype=float)
    b = np.array([0, 0, 0, 0, 0, 1, 1, 0], dtype=float)
    assert mcnemar_p(a, b) == pytest.approx(14 / 64, rel=1e-12)


def test_vectorised_bootstrap_equals_a_plain_float64_loop_with_the_same_seed():
    rng = np.random.default_rng(7)
    diffs = [rng.integers(-1, 2, 37).astype(float), rng.normal(size=23)]
    w = [0.3, 0.7]
    fast = bootstrap_distribution(diffs, w, n_resamples=600, seed=11)  # > CHUNK: several chunks
    gens = [np.random.default_rng(s) for s in np.random.SeedSequence(11).spawn(2)]
    slow = []
    for _ in range(600):
        total = 0.0
        for d, wt, g in zip(diffs, w, gens):
            idx = g.integers(0, len(d), size=len(d))
            total += wt * sum(float(d[i]) for i in idx) / len(d)
        slow.append(total)
    # same draws; only the summation order differs
    np.testing.assert_allclose(fast, np.array(slow), rtol=0, atol=1e-12)


def test_sign_flip_p_agrees_with_mcnemar_on_one_binary_task():
    a = np.array([1.0] * 30 + [0.0] * 14 + [1.0] * 40)
    b = np.array([0.0] * 30 + [1.0] * 14 + [1.0] * 40)
    exact = _exact_mcnemar(30, 14)
    mc = sign_flip_p([a - b], [1.0], n_resamples=20000, seed=3)
    assert abs(mc - exact) < 0.01  # Monte Carlo SE at p≈0.02 and 20 000 resamples is about 0.001


def test_overall_comparison_is_stratified_and_weighted_like_the_overall_score():
    rng = np.random.default_rng(1)
    w = {"x": 0.25, "y": 0.75}
    pa = {"x": rng.integers(0, 2, 60).tolist(), "y": rng.integers(0, 2, 40).tolist()}
    pb = {"x": rng.integers(0, 2, 60).tolist(), "y": rng.integers(0, 2, 40).tolist()}
    a, b = _scores(pa, w), _scores(pb, w)
    c = paired_comparison(a, b, w, n_resamples=2000, seed=0)
    assert c.diff == pytest.approx(a.overall - b.overall, abs=1e-12)
    assert c.n == 100 and c.test == "sign-flip"
    by_numpy = math.sqrt(sum(w[t] ** 2 * np.var(np.subtract(pa[t], pb[t]), ddof=1) / len(pa[t]) for t in w))
    assert c.se == pytest.approx(by_numpy, rel=1e-12)
    # a 95% percentile interval of a mean is close to ±1.96 SE for samples of this size
    assert c.ci_low == pytest.approx(c.diff - 1.96 * c.se, abs=0.35 * c.se)
    assert c.ci_high == pytest.approx(c.diff + 1.96 * c.se, abs=0.35 * c.se)
    one = paired_comparison(a, b, w, task="x", n_resamples=500, seed=0)
    assert one.test == "mcnemar" and one.n == 60
    assert one.diff == pytest.approx(a.tasks["x"] - b.tasks["x"], abs=1e-12)
    assert one.p_value == pytest.approx(_exact_mcnemar(
        sum(x == 1 and y == 0 for x, y in zip(pa["x"], pb["x"])), sum(x == 0 and y == 1 for x, y in zip(pa["x"], pb["x"]))))


def test_comparison_pairs_items_by_id_and_needs_per_item_scores():
    a = SplitScores(overall=0.5, tasks={"t": 0.5}, per_item={"t": {"3": 1.0, "1": 0.0, "7": 1.0}})
    b = SplitScores(overall=0.5, tasks={"t": 0.5}, per_item={"t": {"7": 0.0, "3": 1.0, "1": 0.0, "9": 1.0}})
    c = paired_comparison(a, b, {"t": 1.0}, n_resamples=200)
    assert c.n == 3 and c.diff == pytest.approx(1 / 3)
    assert paired_comparison(a, SplitScores(overall=0.5, tasks={"t": 0.5}), {"t": 1.0}) is None


def test_verdict_words_come_from_the_interval():
    assert verdict(0.01, 0.05) == "better"
    assert verdict(-0.05, -0.001) == "worse"
    assert verdict(-0.01, 0.02) == "no detectable difference"
    assert verdict(0.0, 0.02) == "no detectable difference"


def test_per_item_lists_of_older_results_are_read_as_ids():
    s = SplitScores(overall=0.5, tasks={"t": 0.5}, per_item={"t": [1.0, 0.0]})
    assert s.per_item == {"t": {"0": 1.0, "1": 0.0}}
