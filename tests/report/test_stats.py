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
