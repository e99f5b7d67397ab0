"""Incremental scoring: a partial evaluation scores only the items of its window not scored before.

Successive halving scores a point on growing prefixes of the search items (8, 24, ... items per
task, then all of them) and racing on consecutive chunks, then scores its finishers on every item.
Scored from scratch each time, the items of the earlier rungs or chunks are scored again. Here an
evaluation of a model on a window of search items (per task: the item ids it covers) first collects
the recorded evaluations of the *same model* whose items lie inside that window and do not overlap
(:func:`plan`), scores only the items none of them holds, and joins the per-item scores
(:func:`join`) into the record a single evaluation of the window would have written: the same item
ids, per-item scores, task scores, overall and generation statistics, so later stages, a resumed
run and other workers read it as they read a full evaluation.

The join is exact only where a task's score is the mean of item scores that each depend on their own
item alone (:attr:`exme.evaluate.kinds.TaskKind.items_independent`); every other task (perplexity,
whose item shares are normalised over the items scored together; any task of an evaluator that does
not declare its kinds) is scored on its whole window again. Task scores of joined tasks are
``math.fsum(item scores) / n``, which does not depend on the order the pieces came in.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

from exme.evaluate.scores import weighted_mean
from exme.search.study import Record

Window = Mapping[str, Sequence[str]]  # task -> item ids (as recorded in per_item: str of the dev position)


def joinable_tasks(evaluator: Any) -> tuple[set[str], dict[str, float]] | None:
    """(tasks whose evaluations of disjoint windows join exactly, every task's weight in the overall), or
    ``None`` when the evaluator does not say what its tasks are (nothing is joined: windows are scored whole)."""
    suite = getattr(evaluator, "suite", None)
    tasks = getattr(suite, "tasks", None)
    if not tasks:
        return None
    try:
        joinable = {t.name for t in tasks if getattr(t.kind_def, "items_independent", False)}
        weights = {t.name: float(t.spec.weight) for t in tasks}
    except AttributeError:  # not a suite of exme task kinds
        return None
    return joinable, weights


def plan(window: Window, earlier: Sequence[Record], joinable: set[str]) -> tuple[list[Record], dict[str, list[str]]]:
    """Which earlier evaluations of the model to reuse, and which items are left to score.

    A record is a piece when it was scored (not failed), holds per-item scores, and each of its tasks'
    items lies inside ``window``; pieces are taken largest first and never overlap, so their generation
    statistics join exactly too. Only joinable tasks take items from pieces. Returns (pieces, missing
    item ids per task of the window, in window order; an empty list: nothing left for that task).
    """
    want = {t: [str(i) for i in ids] for t, ids in window.items()}
    inside = {t: set(ids) for t, ids in want.items()}
    covered: dict[str, set[str]] = {t: set() for t in want}
    pieces: list[Record] = []
    candidates = [r for r in earlier if r.failed is None and r.per_item
                  and all(t in inside and set(items) <= inside[t] for t, items in r.per_item.items())
                  and any(t in joinable and items for t, items in r.per_item.items())]
    for rec in sorted(candidates, key=lambda r: -sum(len(v) for v in r.per_item.values())):
        mine = {t: set(items) for t, items in rec.per_item.items() if t in joinable}
        if any(mine[t] & covered[t] for t in mine):
            continue
        for t, ids in mine.items():
            covered[t] |= ids
        pieces.append(rec)
    missing = {t: [i for i in ids if t not in joinable or i not in covered[t]] for t, ids in want.items()}
    return pieces, missing  # every candidate holds items of a joinable task


def restricted(window: Window, earlier: Sequence[Record], joinable: set[str]) -> Record | None:
    """An earlier evaluation holding every item of the window in each joinable task (a chunk of a model
    already scored in full), cut down to the window's items, or ``None``. Its generation statistics are
    dropped: they are means over the larger item set and cannot be cut down exactly."""
    want = {t: [str(i) for i in ids] for t, ids in window.items() if t in joinable and ids}
    if not want:
        return None
    for rec in earlier:
        if rec.failed is None and all(t in rec.per_item and set(ids) <= set(rec.per_item[t]) for t, ids in want.items()):
            per_item = {t: {i: rec.per_item[t][i] for i in ids} for t, ids in want.items()}
            return Record(params=dict(rec.params), split="dev", limit=None, overall=math.nan,
                          tasks={t: math.fsum(v.values()) / len(v) for t, v in per_item.items()},
                          n_items={t: len(v) for t, v in per_item.items()}, seconds=0.0, number=-1, per_item=per_item)
    return None


def join(window: Window, pieces: Sequence[Record], fresh: Mapping[str, Any], joinable: set[str],
         weights: Mapping[str, float]) -> dict[str, Any]:
    """The scores (as a trial stores them) of one evaluation of ``window``: ``pieces`` (from :func:`plan`)
    and ``fresh`` (the scores of the missing items; every item of a task that is not joinable).

    Task order and weights are the suite's (``weights``), so ``overall`` is the evaluator's own
    weighted mean of the task scores.
    """
    tasks: dict[str, float] = {}
    n_items: dict[str, int] = {}
    per_item: dict[str, dict[str, float]] = {}
    generation: dict[str, dict[str, float]] = {}
    fresh_items = fresh.get("per_item") or {}
    for t in [name for name in weights if name in window] + [name for name in window if name not in weights]:
        ids = [str(i) for i in window[t]]
        if not ids:
            continue
        if t not in joinable:  # scored whole, now
            tasks[t] = float(fresh["tasks"][t])
            n_items[t] = int(fresh["n_items"][t])
            per_item[t] = dict(fresh_items.get(t, {}))
            if t in (fresh.get("generation") or {}):
                generation[t] = dict(fresh["generation"][t])
            continue
        sources = [p for p in pieces if p.per_item.get(t)]
        if fresh_items.get(t):
            sources.append(_as_record(fresh))
        scores: dict[str, float] = {}
        for src in sources:
            scores.update(src.per_item[t])
        absent = [i for i in ids if i not in scores]
        if absent:
            raise ValueError(f"task {t!r}: items {absent[:5]} of the window were scored by no piece")
        per_item[t] = {i: float(scores[i]) for i in ids}
        tasks[t] = math.fsum(per_item[t].values()) / len(ids)
        n_items[t] = len(ids)
        stats = [(len(src.per_item[t]), src.generation[t]) for src in sources if t in src.generation]
        if stats and len(stats) == len(sources):
            generation[t] = join_generation(stats)
    overall = weighted_mean(tasks, {t: float(weights.get(t, 1.0)) for t in tasks})
    return {"overall": overall, "tasks": tasks, "n_items": n_items, "per_item": per_item, "generation": generation}


def join_generation(stats: Sequence[tuple[int, Mapping[str, float]]]) -> dict[str, float]:
    """Generation statistics of the union of disjoint item sets: each a mean over its items (``n`` the count),
    joined as ``Σ nⱼ·meanⱼ / Σ nⱼ``. Every statistic recorded is a mean of integers (tokens, 0/1 flags),
    so ``nⱼ·meanⱼ`` is rounded back to the integer sum it was made from: the result is the one a single
    evaluation of all the items computes, not one off by a rounding."""
    total = sum(n for n, _ in stats)
    keys = [k for k in stats[0][1] if k != "n" and all(k in g for _, g in stats)]
    out: dict[str, float] = {}
    for key in keys:
        parts = [n * float(g[key]) for n, g in stats]
        sums = [round(p) if abs(p - round(p)) < 1e-6 else p for p in parts]
        out[key] = math.fsum(sums) / total if total else float("nan")
    out["n"] = total
    return out


def _as_record(scores: Mapping[str, Any]) -> Record:
    return Record(params={}, split="dev", limit=None, overall=float(scores.get("overall", math.nan)),
                  tasks=dict(scores.get("tasks") or {}), n_items=dict(scores.get("n_items") or {}), seconds=0.0,
                  number=-1, per_item=dict(scores.get("per_item") or {}), generation=dict(scores.get("generation") or {}))
