"""How big is a score difference compared with its noise? Pure arithmetic over :mod:`schema` scores.

A test split of a few hundred items cannot separate two models that differ by a point or two; a
report that prints only the difference invites over-reading it. Two models scored on the *same*
items are compared item by item (paired), which is both tighter and more honest than treating their
accuracies as independent:

- **paired difference** ``D = Σ_t w_t · mean(d_t)`` with ``d_{t,i} = a_{t,i} − b_{t,i}`` the per-item
  differences of task ``t`` and ``w_t`` the normalised task weights (the overall score's weights);
- **paired SE** ``√(Σ_t w_t² var(d_t) / n_t)`` (sample variance, ddof = 1; tasks use disjoint items);
- **95% CI** from a seeded paired bootstrap over items, stratified by task (each resample redraws
  ``n_t`` items of every task with replacement and recomputes ``D``); percentile interval;
- **p-value** for "no difference": the exact McNemar (sign) test on the discordant items when one
  task's scores are all 0/1, else a seeded sign-flip permutation test of ``D`` (each item's
  difference keeps or flips its sign with probability ½; with 0/1 scores and one task this is
  McNemar's test computed by simulation);
- **minimum detectable difference** at 80% power and 5% two-sided level:
  ``(z₀.₉₇₅ + z₀.₈) · √(Σ_t w_t² · mean(d_t²) / n_t)``; ``mean(d²)`` is the variance of a difference
  under "no difference", i.e. for 0/1 scores the observed discordance rate. When no item differs
  (every ``d = 0``) it is undefined (``None``), not 0: items on which two models never disagree say
  nothing about how large a difference they could detect;
- **Holm adjustment** across the comparisons of one family (ExMe against each of up to ten
  references on one split and task): with the family's ``m`` raw p-values sorted ascending,
  ``p̃_(i) = min(1, max_{j ≤ i} (m − j + 1) · p_(j))``. Each raw p controls its own error rate only;
  the adjusted ones keep the chance of *any* false "better"/"worse" in the family at 5%.

The overall score is a weighted mean of task scores and the tasks use disjoint items, so the
binomial fallback (only accuracies and item counts known) is
``Var = Σ_t w_t² (p_a(1−p_a) + p_b(1−p_b)) / n_t``: conservative, since models that fail on the same
items are positively correlated.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from exme.report.schema import SplitScores

PAIRED = "paired"
BINOMIAL = "binomial"
Z_975 = 1.959963984540054  # two-sided 5%
Z_80 = 0.8416212335729143  # 80% power
#: Resamples at a time: bounds the bootstrap's memory to CHUNK × items indices.
CHUNK = 256

BETTER, WORSE, NO_DIFFERENCE = "better", "worse", "no detectable difference"


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


def paired_items(a: SplitScores, b: SplitScores, task: str) -> tuple[np.ndarray, np.ndarray] | None:
    """Both models' per-item scores of ``task`` on the items both scored, in item-id order (float64).

    ``None`` when either has no per-item scores for the task or they share fewer than 2 items.
    """
    xs, ys = a.per_item.get(task), b.per_item.get(task)
    if not xs or not ys:
        return None
    ids = sorted(set(xs) & set(ys), key=_id_order)
    if len(ids) < 2:
        return None
    return np.array([xs[i] for i in ids], dtype=np.float64), np.array([ys[i] for i in ids], dtype=np.float64)


def _id_order(item_id: str) -> tuple[int, Any]:
    return (0, int(item_id)) if item_id.lstrip("-").isdigit() else (1, item_id)


def paired_se_of_difference(a: SplitScores, b: SplitScores, weights: Mapping[str, float]) -> float | None:
    """Standard error of ``a.overall − b.overall`` from per-item differences on the same items.

    ``None`` unless both have per-item scores (≥ 2 shared items) for every task of ``a``.
    """
    diffs = _task_diffs(a, b, list(a.tasks))
    if diffs is None:
        return None
    return paired_se([d for d in diffs.values()], [weights.get(t, 0.0) for t in diffs])


def _task_diffs(a: SplitScores, b: SplitScores, tasks: Sequence[str]) -> dict[str, np.ndarray] | None:
    out = {}
    for task in tasks:
        pair = paired_items(a, b, task)
        if pair is None:
            return None
        out[task] = pair[0] - pair[1]
    return out


# --------------------------------------------------------------------------- paired arithmetic on arrays


def paired_se(diffs: Sequence[np.ndarray], weights: Sequence[float]) -> float:
    """``√(Σ_t w_t² var(d_t) / n_t)`` (sample variance, ddof = 1)."""
    var = 0.0
    for d, w in zip(diffs, weights):
        if len(d) > 1:
            var += w * w * float(np.var(d, ddof=1)) / len(d)
    return math.sqrt(var)


def _task_rngs(seed: int, n_tasks: int) -> list[np.random.Generator]:
    """One generator per task, so a task's resamples do not depend on the other tasks' sizes."""
    return [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(n_tasks)]


def bootstrap_ci(diffs: Sequence[np.ndarray], weights: Sequence[float], *, n_resamples: int = 2000,
                 seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile CI of ``Σ_t w_t mean(d_t)`` from a paired bootstrap stratified by task.

    Vectorised: each task's resample indices are drawn ``CHUNK`` resamples at a time as one
    ``(chunk, n_t)`` integer array and averaged with one gather, so memory stays at
    ``CHUNK × n_t`` indices whatever ``n_resamples`` is. Task ``t`` draws from its own generator
    (``SeedSequence(seed).spawn``), one row of ``n_t`` indices per resample, in resample order.
    """
    stats = bootstrap_distribution(diffs, weights, n_resamples=n_resamples, seed=seed)
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(stats, [tail, 1.0 - tail])
    return float(low), float(high)


def _resampled(diffs: Sequence[np.ndarray], weights: Sequence[float], n_resamples: int, seed: int,
               one_chunk) -> np.ndarray:
    """``Σ_t w_t · one_chunk(d_t, rng_t, rows)`` over ``n_resamples`` resamples, ``CHUNK`` rows at a time;
    task t draws from its own generator (``SeedSequence(seed).spawn``), in resample order."""
    out = np.zeros(n_resamples, dtype=np.float64)
    for d, w, rng in zip(diffs, weights, _task_rngs(seed, len(diffs))):
        d = np.asarray(d, dtype=np.float64)
        if len(d) == 0:
            continue
        for start in range(0, n_resamples, CHUNK):
            rows = min(CHUNK, n_resamples - start)
            out[start:start + rows] += w * one_chunk(d, rng, rows)
    return out


def bootstrap_distribution(diffs: Sequence[np.ndarray], weights: Sequence[float], *, n_resamples: int,
                           seed: int) -> np.ndarray:
    """The ``n_resamples`` bootstrap values of ``Σ_t w_t mean(d_t)`` (see :func:`bootstrap_ci`)."""
    return _resampled(diffs, weights, n_resamples, seed,
                      lambda d, rng, rows: d[rng.integers(0, len(d), size=(rows, len(d)))].mean(axis=1))


def is_binary(values: np.ndarray) -> bool:
    return bool(np.all((values == 0.0) | (values == 1.0)))


def mcnemar_p(a: np.ndarray, b: np.ndarray) -> float:
    """Exact two-sided McNemar test of paired 0/1 scores: ``min(1, 2·P(X ≤ min(n₁₀, n₀₁)))``,
    ``X ~ Binomial(n₁₀ + n₀₁, ½)``; 1 when no item is discordant."""
    n10 = int(np.sum((a == 1.0) & (b == 0.0)))
    n01 = int(np.sum((a == 0.0) & (b == 1.0)))
    n = n10 + n01
    if n == 0:
        return 1.0
    k = min(n10, n01)
    # log-space binomial tail: exact for any n without overflow
    logs = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) - n * math.log(2.0) for i in range(k + 1)]
    top = max(logs)
    tail = math.exp(top) * sum(math.exp(v - top) for v in logs)
    return min(1.0, 2.0 * tail)


def sign_flip_p(diffs: Sequence[np.ndarray], weights: Sequence[float], *, n_resamples: int = 2000, seed: int = 0) -> float:
    """Two-sided sign-flip permutation p-value of ``Σ_t w_t mean(d_t)``: ``(1 + #|T*| ≥ |T|) / (1 + B)``."""
    observed = abs(sum(w * float(np.mean(d)) for d, w in zip(diffs, weights) if len(d)))
    stats = _resampled(diffs, weights, n_resamples, seed + 1,
                       lambda d, rng, rows: ((rng.integers(0, 2, size=(rows, len(d))) * 2.0 - 1.0) @ d) / len(d))
    # a tiny tolerance so a resample equal to the observed value (common with 0/1 scores) counts
    hits = int(np.sum(np.abs(stats) >= observed - 1e-12))
    return (1 + hits) / (1 + n_resamples)


def min_detectable(diffs: Sequence[np.ndarray], weights: Sequence[float], *, power_z: float = Z_80,
                   level_z: float = Z_975) -> float | None:
    """Smallest true difference this item set detects with 80% power (5% two-sided), from the observed
    discordance: ``(z₀.₉₇₅ + z₀.₈) · √(Σ_t w_t² mean(d_t²) / n_t)``.

    ``None`` when no item with weight differs: the formula would give 0 ("detects any difference"),
    the opposite of the truth, since the items showed no disagreement to size it from.
    """
    var = sum(w * w * float(np.mean(np.square(d))) / len(d) for d, w in zip(diffs, weights) if len(d))
    if var == 0.0:
        return None
    return (level_z + power_z) * math.sqrt(var)


def n_disagree(diffs: Sequence[np.ndarray]) -> int:
    """Items on which the two models' scores differ (any task): 0 means nothing tells them apart."""
    return int(sum(int(np.count_nonzero(np.asarray(d, dtype=np.float64))) for d in diffs))


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the order given.

    Sorted ascending, ``p̃_(i) = min(1, max_{j ≤ i} (m − j + 1) · p_(j))``: the smallest p is multiplied
    by m, the next by m − 1, ..., and the running maximum keeps the adjusted values in the raw order.
    Rejecting every hypothesis with ``p̃ < 0.05`` keeps the family-wise error rate at 5% under any
    dependence between the tests (they share ExMe's scores, so they are dependent).
    """
    m = len(p_values)
    order = sorted(range(m), key=lambda i: (p_values[i], i))
    out = [1.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, (m - rank) * float(p_values[i]))
        out[i] = min(1.0, running)
    return out


def verdict(ci_low: float, ci_high: float, p_adjusted: float | None = None, level: float = 0.05) -> str:
    """The words of a comparison: "better" when the CI lies above 0, "worse" below, else no detectable
    difference; with ``p_adjusted`` (Holm, across the family), "better"/"worse" also need it below
    ``level``, so ten comparisons at once do not give ten chances of a false verdict."""
    if p_adjusted is not None and not p_adjusted < level:
        return NO_DIFFERENCE
    if ci_low > 0:
        return BETTER
    if ci_high < 0:
        return WORSE
    return NO_DIFFERENCE


@dataclass(frozen=True)
class Paired:
    """``a − b`` on the items both scored: the numbers a comparison of ``results.json`` holds."""

    n: int
    diff: float
    se: float
    ci_low: float
    ci_high: float
    p_value: float
    test: str  # "mcnemar" | "sign-flip"
    mdd: float | None  # None: no item differs, so undefined
    n_disagree: int = 0  # items whose scores differ

    @property
    def verdict(self) -> str:
        return verdict(self.ci_low, self.ci_high)


def paired_comparison(a: SplitScores, b: SplitScores, weights: Mapping[str, float], *, task: str | None = None,
                      n_resamples: int = 2000, seed: int = 0) -> Paired | None:
    """Paired statistics of ``a − b`` overall (``task=None``: stratified, the overall score's weights)
    or on one task; ``None`` when per-item scores are missing for a task."""
    tasks = [task] if task is not None else [t for t in a.tasks if weights.get(t, 0.0) > 0]
    if not tasks:
        return None
    pairs = {}
    for t in tasks:
        pair = paired_items(a, b, t)
        if pair is None:
            return None
        pairs[t] = pair
    if task is not None:
        w = [1.0]
    else:
        total = sum(weights.get(t, 0.0) for t in tasks)
        w = [weights.get(t, 0.0) / total for t in tasks]
    diffs = [x - y for x, y in pairs.values()]
    diff = float(sum(wt * float(np.mean(d)) for d, wt in zip(diffs, w)))
    low, high = bootstrap_ci(diffs, w, n_resamples=n_resamples, seed=seed)
    if len(diffs) == 1 and is_binary(pairs[tasks[0]][0]) and is_binary(pairs[tasks[0]][1]):
        p, test = mcnemar_p(*pairs[tasks[0]]), "mcnemar"
    else:
        p, test = sign_flip_p(diffs, w, n_resamples=n_resamples, seed=seed), "sign-flip"
    return Paired(
        n=int(sum(len(d) for d in diffs)), diff=diff, se=paired_se(diffs, w), ci_low=low, ci_high=high,
        p_value=p, test=test, mdd=min_detectable(diffs, w), n_disagree=n_disagree(diffs),
    )


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
