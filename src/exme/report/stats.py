"""How big is a score difference compared with its noise? Pure arithmetic over :mod:`schema` scores.

A test split of a few hundred items cannot separate two models that differ by a point or two; a
report that prints only the difference invites over-reading it. These functions give the standard
error of an overall-score difference so the report can say how many standard errors a gain is.

The overall score is a weighted mean of task scores, ``S = Σ_t w_t s_t`` with ``Σ w_t = 1``, and the
tasks use disjoint items, so ``Var(S_a − S_b) = Σ_t w_t² Var(s_{a,t} − s_{b,t})``. Two estimates of
the per-task term:

- **paired** (both models have per-item scores on the same items): ``Var = var(d) / n`` with
  ``d_i = a_i − b_i`` (sample variance, ddof=1). Correct whatever the correlation of the errors.
- **binomial** (only accuracies and item counts): ``Var = (p_a(1−p_a) + p_b(1−p_b)) / n``, treating
  the two models' errors as independent. Models that fail on the same items are positively
  correlated, so this over-states the noise: a conservative estimate.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from exme.report.schema import SplitScores

PAIRED = "paired"
BINOMIAL = "binomial"


def task_weights(suite: Mapping[str, Any], task_names: list[str]) -> dict[str, float]:
    """Normalised task weights (summing to 1) for ``task_names``, read from the suite description.

    Accepted shapes (the first found wins): ``suite["weights"] = {task: w}``;
    ``suite["tasks"] = {task: {"weight": w, ...}}``; ``suite["tasks"] = [{"name": task, "weight": w}]``.
    A task without a weight counts 1, so a suite that records no weights is an unweighted mean.
    """
    raw: dict[str, float] = {}
    weights = suite.get("weights")
    tasks = suite.get("tasks")
    if isinstance(weights, Mapping):
        raw = {str(k): float(v) for k, v in weights.items()}
    elif isinstance(tasks, Mapping):
        raw = {str(k): float(v["weight"]) for k, v in tasks.items() if isinstance(v, Mapping) and "weight" in v}
    elif isinstance(tasks, list):
        raw = {
            str(t["name"]): float(t["weight"])
            for t in tasks
            if isinstance(t, Mapping) and "name" in t and "weight" in t
        }
    chosen = {name: raw.get(name, 1.0) for name in task_names}
    total = sum(chosen.values())
    if total <= 0:
        return {name: 1.0 / len(task_names) for name in task_names} if task_names else {}
    return {name: w / total for name, w in chosen.items()}


def _is_rate(x: float) -> bool:
    return 0.0 <= x <= 1.0


def binomial_se(scores: SplitScores, weights: Mapping[str, float]) -> float | None:
    """Standard error of one model's overall score, ``sqrt(Σ w_t² p_t(1−p_t)/n_t)``.

    ``None`` when an item count is missing or a score is not a rate in [0, 1] (then a binomial
    model does not apply and the report says it has no noise estimate).
    """
    var = 0.0
    for task, p in scores.tasks.items():
        n = scores.n_items.get(task)
        if not n or not _is_rate(p):
            return None
        var += weights.get(task, 0.0) ** 2 * p * (1.0 - p) / n
    return math.sqrt(var)


def binomial_se_of_difference(a: SplitScores, b: SplitScores, weights: Mapping[str, float]) -> float | None:
    """Standard error of ``a.overall − b.overall`` treating the two models as independent binomials."""
    var = 0.0
    for task in a.tasks:
        n = a.n_items.get(task) or b.n_items.get(task)
        if task not in b.tasks or not n:
            return None
        pa, pb = a.tasks[task], b.tasks[task]
        if not (_is_rate(pa) and _is_rate(pb)):
            return None
        var += weights.get(task, 0.0) ** 2 * (pa * (1.0 - pa) + pb * (1.0 - pb)) / n
    return math.sqrt(var)


def paired_se_of_difference(a: SplitScores, b: SplitScores, weights: Mapping[str, float]) -> float | None:
    """Standard error of ``a.overall − b.overall`` from per-item differences on the same items.

    ``None`` unless both have per-item scores of equal length (≥ 2) for every task of ``a``.
    """
    var = 0.0
    for task in a.tasks:
        xs, ys = a.per_item.get(task), b.per_item.get(task)
        if not xs or not ys or len(xs) != len(ys) or len(xs) < 2:
            return None
        n = len(xs)
        diffs = [x - y for x, y in zip(xs, ys)]
        mean = sum(diffs) / n
        sample_var = sum((d - mean) ** 2 for d in diffs) / (n - 1)
        var += weights.get(task, 0.0) ** 2 * sample_var / n
    return math.sqrt(var)


@dataclass(frozen=True)
class Difference:
    """``a − b`` on one split, with its standard error and how that error was estimated."""

    a: float
    b: float
    diff: float
    se: float | None
    method: str | None  # PAIRED | BINOMIAL | None (no estimate possible)

    @property
    def z(self) -> float | None:
        """The difference in standard errors (``None`` without an error estimate or when it is 0)."""
        if self.se is None or self.se == 0:
            return None
        return self.diff / self.se

    @property
    def within_noise(self) -> bool | None:
        """True when ``|diff| < 2·se``: not distinguishable from test-set noise at about 95%."""
        if self.se is None:
            return None
        return abs(self.diff) < 2.0 * self.se


def difference(a: SplitScores, b: SplitScores, weights: Mapping[str, float]) -> Difference:
    """``a.overall − b.overall`` with the paired standard error when per-item scores allow, else binomial."""
    se = paired_se_of_difference(a, b, weights)
    method: str | None = PAIRED
    if se is None:
        se = binomial_se_of_difference(a, b, weights)
        method = BINOMIAL if se is not None else None
    return Difference(a=a.overall, b=b.overall, diff=a.overall - b.overall, se=se, method=method)
