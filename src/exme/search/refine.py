"""Coarse-to-fine search of one number (ExPO's α): a coarse grid, then a finer grid around its best point.

The coarse grid is scored by whatever strategy the stage would use on its own (every point, α in
order until the curve collapses, successive halving or a race); the finer grid — step/5 within one
coarse step of the best coarse value, never below 0 (:func:`refine_grid`) — is then scored by a
second strategy. Both run through the same ``evaluate``, so both land in the stage's one study and
a resumed run reads them back as before.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from exme.search.strategy import Evaluate, Grid, Outcome, Strategy
from exme.search.study import best


def refine_grid(grid: Sequence[float], center: float) -> list[float]:
    """A finer grid (step/5) within one coarse step either side of ``center``, never below 0.

    The step is the smallest gap of ``grid``, so an uneven grid is refined at its finest spacing;
    ``center`` itself is left out (it is the coarse point already scored).
    """
    gaps = [b - a for a, b in zip(grid, grid[1:])]
    step = min(gaps)
    fine = step / 5
    out = []
    for j in range(-4, 5):
        a = round(center + j * fine, 10)
        if j != 0 and a >= 0:
            out.append(a)
    return out


@dataclass(frozen=True)
class Refined(Outcome):
    """A refine search's outcome: both grids' records, dropped points and notes, and each grid's own outcome
    (a stage reads the coarse one to say how far a collapse stop got)."""

    coarse: Outcome = field(default_factory=lambda: Outcome([]))
    fine: Outcome | None = None


@dataclass(frozen=True)
class Refine:
    """``coarse`` over the given points (each ``{key: value}``, values of ``grid``), then ``fine`` over the
    values of :func:`refine_grid` around the best coarse value that ``grid`` does not hold.

    Ties among the coarse records go to the smaller value, as the stage's own choice does. The fine
    values lie less than one (smallest) coarse step from the centre, so none is a coarse value; they are
    still checked against ``grid`` (a value the coarse strategy never scored, past a collapse stop,
    included), so rounding can never score a coarse point twice under two spellings. With one coarse
    value there is no step: no refinement.
    """

    grid: Sequence[float]
    coarse: Strategy = field(default_factory=Grid)
    fine: Strategy = field(default_factory=Grid)
    key: str = "alpha"

    #: The most fine points one refinement adds (a progress display's total): four either side of the center.
    MOST_FINE = 8

    def fine_values(self, records: Sequence[Any]) -> list[float]:
        """The fine grid's values after the coarse ``records`` (empty when ``grid`` has a single value)."""
        if len(self.grid) < 2 or not records:
            return []
        center = best(sorted(records, key=lambda r: r.params[self.key])).params[self.key]
        return [a for a in refine_grid(self.grid, center) if a not in self.grid]

    def budget(self, n_points: int) -> int:
        """The most points this search scores over ``n_points`` coarse ones."""
        return n_points + (self.MOST_FINE if len(self.grid) > 1 else 0)

    def run(self, params: Sequence[dict[str, Any]], evaluate: Evaluate) -> Refined:
        first = self.coarse.run(params, evaluate)
        extra = self.fine_values(first.records)
        if not extra:
            return Refined(list(first.records), list(first.dropped), list(first.notes), coarse=first)
        second = self.fine.run([{self.key: a} for a in extra], evaluate)
        return Refined(first.records + second.records, first.dropped + second.dropped, first.notes + second.notes,
                       coarse=first, fine=second)
