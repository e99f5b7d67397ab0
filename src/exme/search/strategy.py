"""Search strategies: how the points of a space are scored to find its best one, behind one interface.

A stage hands a strategy the points of its space (parameter dicts) and a way to score points
(``evaluate(points) -> records``, in order); the strategy decides which points to score, on how
many items, and in what order, and returns an :class:`Outcome` (the points scored on every search
item, and the partial evaluations of the points it dropped). ``evaluate`` is where recording,
sharing between equal models, resuming and worker claims happen (:class:`exme.search.StudyStore`
and the pipeline's runner), so a strategy knows nothing of studies, workers or heartbeats, and a
new strategy is one class in one file:

- :class:`Grid` — every point in full;
- :class:`Sequential` — points in order until ``stop(records so far)`` (α until collapse);
- :class:`Halving` — successive halving on growing item limits (``search.prune``);
- :class:`exme.search.racing.Race` — growing chunks, stopping points k others beat with confidence;
- :class:`exme.search.refine.Refine` — one of these over a coarse grid, then a finer grid around its best point;
- a box of continuous parameters is searched by a sampled strategy instead (:mod:`exme.search.sampled`:
  TPE, CMA-ES), which asks a sampler for points one at a time and tells their scores.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

from exme.search.study import Point, Record, best

Evaluate = Callable[[Sequence[Point]], list[Record]]


@dataclass(frozen=True)
class Outcome:
    """What a strategy found: full evaluations (``records``), partial ones of dropped points, notes."""

    records: list[Record]
    dropped: list[Record] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def best(self) -> Record:
        return best(self.records)


class Strategy(Protocol):
    """Score points of ``params`` through ``evaluate`` until the best one is known."""

    def run(self, params: Sequence[dict[str, Any]], evaluate: Evaluate) -> Outcome: ...


@dataclass(frozen=True)
class Grid:
    """Every point on every search item."""

    def run(self, params: Sequence[dict[str, Any]], evaluate: Evaluate) -> Outcome:
        return Outcome(evaluate([Point(p) for p in params]))


@dataclass(frozen=True)
class Sequential:
    """Points one after another until ``stop(records so far)`` is true; the rest are never scored."""

    stop: Callable[[list[Record]], bool]

    def run(self, params: Sequence[dict[str, Any]], evaluate: Evaluate) -> Outcome:
        records: list[Record] = []
        for p in params:
            records += evaluate([Point(p)])
            if self.stop(records):
                break
        return Outcome(records)


@dataclass(frozen=True)
class Halving:
    """Successive halving: every point on ``min_items`` items per task, keep the best 1/eta, grow the
    limit by eta, repeat; the last rung is a full evaluation (``limit=None``), so the chosen point's
    score is comparable with unpruned searches. Ties keep the earlier point.

    A rung's limit is a prefix of the same item lists as the rung before it, so the runner scores only
    the items the point has not run yet (:mod:`exme.search.partial`): a rung costs its new items.

    ``max_items`` (the most search items any task has), when known, makes a rung whose limit covers
    every item a full evaluation at once, instead of a partial one equal to it followed by a full one.
    """

    min_items: int
    eta: int
    max_items: int | None = None

    def run(self, params: Sequence[dict[str, Any]], evaluate: Evaluate) -> Outcome:
        alive = list(params)
        dropped: list[Record] = []
        limit: int | None = self.min_items
        while True:
            if len(alive) <= 1 or (limit is not None and self.max_items is not None and limit >= self.max_items):
                limit = None
            recs = evaluate([Point(p, limit=limit) for p in alive])
            if limit is None:
                return Outcome(recs, dropped)
            keep = max(1, math.ceil(len(alive) / self.eta))
            order = sorted(range(len(alive)), key=lambda i: -recs[i].overall)  # stable: ties keep order
            kept = sorted(order[:keep])
            dropped.extend(recs[i] for i in order[keep:])
            # A subset that already held every item of every task cannot grow: the next rung is full.
            exhausted = all(n < limit for i in kept for n in recs[i].n_items.values())
            alive = [alive[i] for i in kept]
            limit = None if exhausted else limit * self.eta
