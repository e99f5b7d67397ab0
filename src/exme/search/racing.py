"""Racing: stop scoring a candidate once the items already scored show it cannot reach the top k.

Every candidate still in the race is scored on the next chunk of items (the same items for all, so
the comparisons are paired; the chunks double, :func:`chunk_bounds`). After each chunk, a candidate ``c`` stops when, for each of the current
k best others ``j`` (by mean score so far), the upper confidence bound of the paired difference
``c − j`` lies below zero: k others are each better with confidence, so ``c`` is not among the k
best. The top k by mean never stop, so at least k candidates finish.

The test (:data:`TEST`): a one-sided paired z-test on the task-weighted mean of per-item
differences, ``d̄ = Σ_t w_t · mean_i(d_ti)`` with ``Var(d̄) = Σ_t w_t² s_t² / n_t``. Its level per
comparison is ``error_rate / (m(m − 1) · looks)``: a Bonferroni bound over every ordered pair of
the m candidates and every look (one after each chunk but the last), so the chance that any candidate which is not worse stops early
is at most ``error_rate`` (up to the normal approximation of each test), although the k best are
picked from the same data. A comparison needs at least two scored items in every task.

Pure: it never evaluates anything itself; ``score(alive, chunk)`` does, which is how the rank stage
runs it on the live model and how the tests run it on simulated scores.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Any, Callable, Mapping, Sequence

from exme.search.study import Point, Record

PerItem = Mapping[str, Mapping[str, float]]  # task -> item id -> score

TEST = ("one-sided paired z-test on the task-weighted per-item differences against each of the current "
        "k best, Bonferroni-adjusted over candidate pairs and looks")


@dataclass(frozen=True)
class RaceResult:
    """Who finished the race and who stopped after which chunk (0-based)."""

    survivors: list[int]
    stopped: dict[int, int] = field(default_factory=dict)
    chunks_scored: dict[int, int] = field(default_factory=dict)  # candidate -> chunks it was scored on
    z: float = math.inf


def chunk_bounds(n_items: int, chunk: int, doubling: bool = True) -> list[tuple[int, int]]:
    """(start, stop) positions of consecutive chunks covering ``n_items``: the first of ``chunk``
    items, each later one (``doubling``) as large as everything before it, so the looks fall after
    chunk, 2·chunk, 4·chunk, … items; without ``doubling`` every chunk holds ``chunk`` items.

    Why doubling: every look costs a write of each racing candidate into the model and a share of
    the error rate (Bonferroni over looks), so looks spaced geometrically keep both to about
    log₂(n / chunk) + 1 on a large search split, where equal chunks of 8 would give n / 8 of each.
    """
    if chunk < 1:
        raise ValueError(f"chunk must be at least 1, got {chunk}")
    bounds, start, size = [], 0, chunk
    while start < n_items:
        stop = min(start + size, n_items)
        bounds.append((start, stop))
        if doubling:
            size = stop  # the next chunk is as large as everything so far: the total doubles
        start = stop
    return bounds


def critical_z(error_rate: float, n_candidates: int, looks: int) -> float:
    """The one-sided normal quantile of each comparison (Bonferroni over ordered pairs and looks)."""
    if not 0.0 < error_rate < 0.5:
        raise ValueError(f"error rate must lie in (0, 0.5), got {error_rate}")
    tests = max(1, n_candidates * (n_candidates - 1) * max(1, looks))
    return NormalDist().inv_cdf(1.0 - error_rate / tests)


def weighted_mean(scores: PerItem, weights: Mapping[str, float]) -> float:
    """Σ_t w_t · mean(scores_t) / Σ_t w_t over the tasks that have scores."""
    tasks = [t for t, items in scores.items() if items]
    total = sum(weights.get(t, 1.0) for t in tasks)
    if not tasks or total <= 0:
        return float("nan")
    return sum(weights.get(t, 1.0) * sum(scores[t].values()) / len(scores[t]) for t in tasks) / total


def paired_upper_bound(a: PerItem, b: PerItem, weights: Mapping[str, float], z: float) -> float | None:
    """Upper confidence bound of the weighted mean paired difference ``a − b`` (``None``: too few items)."""
    tasks = [t for t in a if t in b]
    total = sum(weights.get(t, 1.0) for t in tasks)
    if not tasks or total <= 0:
        return None
    mean = var = 0.0
    for t in tasks:
        ids = [i for i in a[t] if i in b[t]]
        if len(ids) < 2:
            return None
        d = [a[t][i] - b[t][i] for i in ids]
        w = weights.get(t, 1.0) / total
        m = sum(d) / len(d)
        s2 = sum((x - m) ** 2 for x in d) / (len(d) - 1)
        mean += w * m
        var += w * w * s2 / len(d)
    return mean + z * math.sqrt(var)


def race(
    n_candidates: int,
    n_chunks: int,
    k: int,
    score: Callable[[list[int], int], Sequence[PerItem]],
    *,
    error_rate: float,
    weights: Mapping[str, float] | None = None,
) -> RaceResult:
    """Race ``n_candidates`` over ``n_chunks`` chunks for the ``k`` best places.

    ``score(alive, j)`` returns the per-item scores of each candidate in ``alive`` on chunk ``j``
    (in ``alive`` order). The race ends when at most k remain or every chunk but the last was
    scored; the candidates left are the survivors (ascending), whom the caller scores on every item.
    There is no look after the last chunk: a candidate stopped there would have been scored in full
    anyway, so such a look only spends error rate (the looks are ``n_chunks − 1``). Ties in the mean
    keep the earlier candidate.
    """
    weights = dict(weights or {})
    looks = max(1, n_chunks - 1)
    z = critical_z(error_rate, n_candidates, looks)
    seen: list[dict[str, dict[str, float]]] = [{} for _ in range(n_candidates)]
    alive = list(range(n_candidates))
    stopped: dict[int, int] = {}
    scored = {i: 0 for i in alive}
    for j in range(n_chunks - 1):
        if len(alive) <= k:
            break
        for i, items in zip(alive, score(list(alive), j)):
            scored[i] += 1
            for t, by_id in items.items():
                seen[i].setdefault(t, {}).update({str(x): float(v) for x, v in by_id.items()})
        means = {i: weighted_mean(seen[i], weights) for i in alive}
        out = []
        for c in alive:
            others = sorted((i for i in alive if i != c), key=lambda i: (-means[i], i))[:k]
            bounds = [paired_upper_bound(seen[c], seen[i], weights, z) for i in others]
            if len(others) == k and all(b is not None and b < 0 for b in bounds):
                out.append(c)
        for c in out:
            stopped[c] = j
        alive = [i for i in alive if i not in out]
    return RaceResult(survivors=alive, stopped=stopped, chunks_scored=scored, z=z)


def joined(records: Sequence[Record], weights: Mapping[str, float]) -> Record:
    """One record of a point that stopped early: its chunks' items together, joined as every partial
    evaluation is (:func:`exme.search.partial.join`: task score the mean of its items, generation
    statistics over all of them), so a stopped point's record reads like any other."""
    from exme.search.partial import join

    window: dict[str, list[str]] = {}
    for r in records:
        for t, items in r.per_item.items():
            window.setdefault(t, []).extend(i for i in items if i not in window[t])
    scores = join(window, records, {}, set(window), weights)
    return Record(params=dict(records[0].params), split="dev", limit=None, overall=scores["overall"],
                  tasks=scores["tasks"], n_items=scores["n_items"], seconds=sum(r.seconds for r in records),
                  number=-1, per_item=scores["per_item"], generation=scores["generation"])


@dataclass(frozen=True)
class Race:
    """The racing search strategy (:mod:`exme.search.strategy`): the points race on ``chunks`` of the
    search items for the ``k`` best places; the finishers are then scored on every search item, and
    the dropped records of the others hold the chunks they were scored on. The runner joins a
    finisher's chunks into its full record and scores only the chunks it did not run
    (:mod:`exme.search.partial`), so a race never costs more items than scoring every point in full."""

    k: int
    chunks: Sequence[tuple[int, int]]
    error_rate: float
    weights: Mapping[str, float] = field(default_factory=dict)

    def run(self, params: Sequence[dict[str, Any]], evaluate: Callable[[Sequence[Point]], list[Record]]) -> Any:
        from exme.search.strategy import Grid, Outcome

        if len(params) <= self.k or len(self.chunks) <= 1:
            return Grid().run(params, evaluate)
        by_chunk: dict[int, dict[int, Record]] = {}

        def score(alive: list[int], j: int) -> list[PerItem]:
            recs = evaluate([Point(params[i], chunk=tuple(self.chunks[j])) for i in alive])
            by_chunk[j] = dict(zip(alive, recs))
            return [r.per_item for r in recs]

        result = race(len(params), len(self.chunks), self.k, score, error_rate=self.error_rate, weights=self.weights)
        full = evaluate([Point(params[i]) for i in result.survivors])
        dropped = [joined([by_chunk[j][i] for j in range(last + 1)], self.weights)
                   for i, last in sorted(result.stopped.items())]
        looks = ", ".join(str(stop) for _, stop in self.chunks[:-1])
        note = (f"raced on the search items with looks after {looks} items per task ({TEST}; error "
                f"rate {self.error_rate:g}, z = {result.z:.2f}); {len(result.stopped)} of {len(params)} stopped early")
        return Outcome(full, dropped, [note])
