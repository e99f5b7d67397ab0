"""Refinement on a fake evaluate (a known score of α): which points it scores, and the best it finds."""

from __future__ import annotations

import pytest

from exme.search.racing import Race
from exme.search.refine import Refine, refine_grid
from exme.search.strategy import Grid, Halving, Sequential
from exme.search.study import Record

GRID = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5]


def _evaluate(log, score, n_items=20):
    """Every point scored by ``score(α)`` (the same on each of ``n_items`` items of one task), logged."""
    def evaluate(points):
        out = []
        for p in points:
            a = p.params["alpha"]
            log.append((a, p.limit, p.chunk))
            if p.chunk is not None:
                ids = range(*p.chunk)
            else:
                ids = range(n_items if p.limit is None else min(p.limit, n_items))
            s = score(a)
            out.append(Record(params=dict(p.params), split="dev", limit=p.limit, overall=s, tasks={"t": s},
                              n_items={"t": len(ids)}, seconds=0.0, number=-1,
                              per_item={"t": {str(i): s for i in ids}}))
        return out
    return evaluate


def _params(grid):
    return [{"alpha": a} for a in grid]


def test_refine_grid_by_hand():
    # Step 0.1 → fine step 0.02, four either side of 0.3, the centre left out.
    assert refine_grid(GRID, 0.3) == [0.22, 0.24, 0.26, 0.28, 0.32, 0.34, 0.36, 0.38]
    # Never below 0: around 0.04 only 0.0, 0.02 lie below the centre.
    assert refine_grid(GRID, 0.04) == [0.0, 0.02, 0.06, 0.08, 0.1, 0.12]
    # An uneven grid is refined at its smallest gap (0.1 here, not 0.5).
    assert refine_grid([0.0, 0.5, 0.6, 1.0], 0.6) == [0.52, 0.54, 0.56, 0.58, 0.62, 0.64, 0.66, 0.68]


def test_finds_the_optimum_between_grid_points_and_scores_exactly_the_expected_points():
    """score(α) = −(α − 0.26)²: the coarse best is 0.3, the fine grid around it holds 0.26."""
    log = []
    out = Refine(GRID).run(_params(GRID), _evaluate(log, lambda a: -(a - 0.26) ** 2))
    fine = [0.22, 0.24, 0.26, 0.28, 0.32, 0.34, 0.36, 0.38]
    assert [a for a, _, _ in log] == GRID + fine  # every coarse point once, then every fine point once
    assert all(limit is None and chunk is None for _, limit, chunk in log)
    assert out.best.params == {"alpha": 0.26}
    assert [r.params["alpha"] for r in out.coarse.records] == GRID and out.fine is not None
    assert [r.params["alpha"] for r in out.records] == GRID + fine and out.dropped == []


def test_the_fine_grid_stays_within_one_coarse_step_and_repeats_no_coarse_point():
    """Best coarse point 0.1 on a 0.05-spaced grid: fine step 0.01, four either side, none a coarse value."""
    grid = [0.0, 0.05, 0.1, 0.15, 0.2]
    log = []
    out = Refine(grid).run(_params(grid), _evaluate(log, lambda a: -(a - 0.11) ** 2))
    fine = [0.06, 0.07, 0.08, 0.09, 0.11, 0.12, 0.13, 0.14]
    assert [a for a, _, _ in log] == grid + fine
    assert out.best.params == {"alpha": 0.11}


def test_ties_centre_on_the_smaller_value_and_one_value_is_not_refined():
    # score ≡ 0: every coarse point ties; the centre is the smallest, 0.0, so no fine point is negative.
    log = []
    Refine(GRID).run(_params(GRID), _evaluate(log, lambda a: 0.0))
    assert [a for a, _, _ in log][len(GRID):] == [0.02, 0.04, 0.06, 0.08]
    log = []
    out = Refine([0.3]).run(_params([0.3]), _evaluate(log, lambda a: -a))
    assert [a for a, _, _ in log] == [0.3] and out.fine is None


def test_a_collapse_stop_limits_the_coarse_grid():
    """Sequential stops after 0.2 (its score falls below 0.1's); 0.3 to 0.5 are never scored, and the fine
    grid lies around 0.1."""
    log = []
    stop = Sequential(lambda recs: len(recs) > 1 and recs[-1].overall < max(r.overall for r in recs[:-1]))
    out = Refine(GRID, coarse=stop).run(_params(GRID), _evaluate(log, lambda a: -(a - 0.12) ** 2))
    assert [a for a, _, _ in log] == [0.0, 0.1, 0.2, 0.02, 0.04, 0.06, 0.08, 0.12, 0.14, 0.16, 0.18]
    assert len(out.coarse.records) == 3 and out.best.params == {"alpha": 0.12}


def test_halving_coarse_keeps_its_dropped_points_and_the_fine_grid_is_full():
    log = []
    coarse = Halving(5, 3, max_items=20)
    out = Refine(GRID, coarse=coarse).run(_params(GRID), _evaluate(log, lambda a: -(a - 0.42) ** 2))
    # Rung 1: six points on 5 items; the best ceil(6/3) = 2 (0.4, 0.5) on 15; the best (0.4) in full.
    assert log[:9] == [(a, 5, None) for a in GRID] + [(0.4, 15, None), (0.5, 15, None), (0.4, None, None)]
    assert log[9:] == [(a, None, None) for a in [0.32, 0.34, 0.36, 0.38, 0.42, 0.44, 0.46, 0.48]]
    assert sorted(r.params["alpha"] for r in out.dropped) == [0.0, 0.1, 0.2, 0.3, 0.5]
    assert out.best.params == {"alpha": 0.42}


def test_raced_grids_join_their_notes():
    """Both grids raced (k = 1) on chunks of 5 of 20 items; the outcome holds the two races' notes, in order."""
    chunks = [(0, 5), (5, 10), (10, 15), (15, 20)]
    race = Race(1, chunks, 0.05, {"t": 1.0})
    log = []
    out = Refine(GRID, coarse=race, fine=race).run(_params(GRID), _evaluate(log, lambda a: -(a - 0.26) ** 2))
    # Every item of a point scores the same, so each paired difference has zero variance: the race
    # stops every point but the best after its first chunk (the bound is the mean difference, < 0).
    assert [(a, c) for a, _, c in log[:6]] == [(a, (0, 5)) for a in GRID]
    assert (0.3, None) in [(a, c) for a, _, c in log] and out.best.params == {"alpha": 0.26}
    assert len(out.notes) == 2 and all("looks after 5, 10, 15 items per task" in n for n in out.notes)
    assert "5 of 6 stopped early" in out.notes[0] and "7 of 8 stopped early" in out.notes[1]
    assert sorted(r.params["alpha"] for r in out.dropped) == pytest.approx(
        sorted([0.0, 0.1, 0.2, 0.4, 0.5, 0.22, 0.24, 0.28, 0.32, 0.34, 0.36, 0.38]))


def test_default_inner_strategies_are_grids():
    r = Refine(GRID)
    assert isinstance(r.coarse, Grid) and isinstance(r.fine, Grid) and r.budget(6) == 14
