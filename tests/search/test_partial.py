"""Joining partial evaluations (exme.search.partial): which earlier records are reused, which items are
left, and the joined scores against hand-worked ones."""

from __future__ import annotations

import math

import pytest

from exme.evaluate.kinds import get_kind
from exme.search.partial import join, join_generation, plan
from exme.search.study import Record


def rec(per_item: dict[str, dict[str, float]], generation=None, failed=None) -> Record:
    tasks = {t: sum(v.values()) / len(v) for t, v in per_item.items()}
    return Record(params={}, split="dev", limit=None, overall=0.0, tasks=tasks,
                  n_items={t: len(v) for t, v in per_item.items()}, seconds=0.0, number=0,
                  per_item=per_item, generation=generation or {}, failed=failed)


def test_plan_takes_the_largest_disjoint_pieces_inside_the_window_and_rescores_other_tasks_whole():
    window = {"a": ["0", "1", "2", "3", "4", "5"], "p": ["0", "1", "2", "3"]}
    rung1 = rec({"a": {"0": 1.0, "1": 0.0}, "p": {"0": -1.0, "1": -2.0}})
    rung2 = rec({"a": {"0": 1.0, "1": 0.0, "2": 1.0, "3": 1.0}, "p": {str(i): -1.0 for i in range(4)}})
    outside = rec({"a": {"4": 1.0, "7": 0.0}})  # item 7 is not in the window
    failed = rec({"a": {"4": 1.0}}, failed="non-finite")
    pieces, missing = plan(window, [rung1, outside, rung2, failed], joinable={"a"})
    assert pieces == [rung2]  # rung1 overlaps it
    assert missing == {"a": ["4", "5"], "p": ["0", "1", "2", "3"]}  # p (perplexity-like) is scored whole


def test_join_equals_the_hand_worked_scores_of_the_whole_window():
    window = {"a": ["0", "1", "2", "3", "4", "5"], "p": ["0", "1"]}
    piece = rec({"a": {"0": 1.0, "1": 0.0, "2": 1.0, "3": 1.0}},
                generation={"a": {"mean_new_tokens": 3.5, "hit_limit": 0.25, "no_stop": 0.0, "n": 4}})
    fresh = {"overall": 0.0, "tasks": {"a": 0.5, "p": -2.5}, "n_items": {"a": 2, "p": 2},
             "per_item": {"a": {"4": 1.0, "5": 0.0}, "p": {"0": -2.0, "1": -3.0}},
             "generation": {"a": {"mean_new_tokens": 5.0, "hit_limit": 0.5, "no_stop": 0.5, "n": 2}}}
    out = join(window, [piece], fresh, joinable={"a"}, weights={"a": 2.0, "p": 1.0})
    assert out["tasks"] == {"a": 4 / 6, "p": -2.5}
    assert out["n_items"] == {"a": 6, "p": 2}
    assert out["overall"] == pytest.approx((2.0 * 4 / 6 + 1.0 * -2.5) / 3.0, rel=1e-15)
    # Tokens 4·3.5 + 2·5 = 24 over 6 items; limit hits 1 + 1 = 2; no-stop 0 + 1 = 1.
    assert out["generation"]["a"] == {"mean_new_tokens": 4.0, "hit_limit": 2 / 6, "no_stop": 1 / 6, "n": 6}
    assert out["per_item"]["a"] == {"0": 1.0, "1": 0.0, "2": 1.0, "3": 1.0, "4": 1.0, "5": 0.0}


def test_a_joined_task_score_does_not_depend_on_the_order_of_its_pieces():
    values = [0.1, 0.7, 1e-17, 0.3, 0.2, 1.0 / 3.0]
    ids = [str(i) for i in range(len(values))]
    direct = math.fsum(values) / len(values)
    a = rec({"t": dict(zip(ids[:2], values[:2]))})
    b = rec({"t": dict(zip(ids[2:5], values[2:5]))})
    fresh = {"tasks": {}, "n_items": {}, "per_item": {"t": {ids[5]: values[5]}}, "generation": {}}
    for pieces in ([a, b], [b, a]):
        out = join({"t": ids}, pieces, fresh, joinable={"t"}, weights={"t": 1.0})
        assert out["tasks"]["t"] == direct and out["overall"] == direct


def test_generation_statistics_join_to_the_integer_sums_they_came_from():
    # 3 items with 7 tokens and 7 items with 3: a float mean of each, rounded back to the sums 21 and 21.
    out = join_generation([(3, {"mean_new_tokens": 7.0, "hit_limit": 1 / 3, "n": 3}),
                           (7, {"mean_new_tokens": 3.0, "hit_limit": 2 / 7, "n": 7})])
    assert out == {"mean_new_tokens": 42 / 10, "hit_limit": 3 / 10, "n": 10}


def test_only_perplexity_says_its_items_do_not_join():
    assert get_kind("perplexity").items_independent is False
    for name in ("multiple_choice", "gsm8k", "generate", "humaneval", "mbpp"):
        assert get_kind(name).items_independent is True


def test_a_window_inside_an_earlier_evaluation_is_cut_from_it_without_its_generation():
    from exme.search.partial import restricted

    full = rec({"a": {str(i): float(i % 2) for i in range(8)}, "p": {str(i): -1.0 for i in range(8)}},
               generation={"a": {"mean_new_tokens": 3.0, "hit_limit": 0.0, "no_stop": 0.0, "n": 8}})
    window = {"a": ["2", "3", "4"], "p": ["2", "3", "4"]}
    cut = restricted(window, [rec({"a": {"2": 1.0}}), full], joinable={"a"})
    assert cut.per_item == {"a": {"2": 0.0, "3": 1.0, "4": 0.0}} and cut.tasks == {"a": 1 / 3}
    assert cut.generation == {}
    assert restricted({"a": ["7", "8"]}, [full], joinable={"a"}) is None  # item 8 was never scored
    fresh = {"tasks": {"p": -1.0}, "n_items": {"p": 3}, "per_item": {"p": {"2": -1.0, "3": -1.0, "4": -1.0}},
             "generation": {}}
    out = join(window, [cut], fresh, joinable={"a"}, weights={"a": 1.0, "p": 1.0})
    assert out["overall"] == pytest.approx((1 / 3 - 1.0) / 2, rel=1e-15) and "a" not in out["generation"]
