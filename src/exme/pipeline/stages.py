"""The pipeline's stages as functions: rank → extrapolate → merge → baselines → test (→ confirm), then the
final model's merge spec.

Each stage takes what it needs (the earlier stages' typed results and the configuration) and returns
a typed result; none of them touches the study, the progress display or worker claims. They only
describe *candidates* (which weights to write into the live model) and hand them to an
:class:`Evaluations` object, which the orchestrator (:mod:`exme.pipeline.run`) implements on top of
the live model and the Optuna study. That keeps the arithmetic of the method (coefficients, which
record wins, which α comes next) readable and testable on its own, and lets the orchestrator
change how evaluations are stored or shown without touching a stage.

To add a stage: write a function here that takes the results it depends on and returns a frozen
dataclass, and call it from :func:`exme.pipeline.run.run_pipeline`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence, Union

from exme.errors import ExmeError
from exme.merge.groups import GroupCoefficients, GroupRule
from exme.merge.methods import exme_coefficients
from exme.merge.registry import baseline_kwargs, baseline_space
from exme.pipeline.config import PipelineConfig, checkpoint_step
from exme.report.schema import FinalRow, RankedCheckpoint, SearchResult, SplitScores, Trial
from exme.search.refine import Refine
from exme.search.sampled import sampled_strategies
from exme.search.strategy import Sequential
from exme.search.study import Point, Record, best
from exme.search.tpe import TPE



# ---------------------------------------------------------------------- candidates
@dataclass(frozen=True)
class BaseWeights:
    """The base model θ_b as it is."""


@dataclass(frozen=True)
class CheckpointWeights:
    """One SFT checkpoint as it is."""

    path: Path


@dataclass(frozen=True)
class Combination:
    """θ_b + Σ cᵢ(θᵢ − θ_b) over ``models`` (extrapolation and ExMe are both this).

    ``coeffs``: the same cᵢ for every tensor, or per group of tensors
    (:class:`~exme.merge.groups.GroupCoefficients`). Canonical: floats, and per-group coefficients
    equal in every group become the global tuple, so one model is one candidate however it was reached.
    """

    models: tuple[Path, ...]
    coeffs: tuple[float, ...] | GroupCoefficients

    def __post_init__(self) -> None:
        c = self.coeffs
        if isinstance(c, GroupCoefficients):
            uniform = c.uniform()
            object.__setattr__(self, "coeffs", c if uniform is None else tuple(uniform))
        else:
            object.__setattr__(self, "coeffs", tuple(float(x) for x in c))


@dataclass(frozen=True)
class MethodMerge:
    """A merge method's output over ``models`` (baselines: TIES, DARE, linear, task arithmetic)."""

    models: tuple[Path, ...]
    method: str
    kwargs: tuple[tuple[str, Any], ...]
    seed: int


#: The final-table row of ExMe with α per group of tensors (``alpha.granularity`` module or layers:N).
MODULE_ROW = "ExMe-module"

Candidate = Union[BaseWeights, CheckpointWeights, Combination, MethodMerge]


def canonical_coefficient(value: float) -> float:
    """One float per coefficient however it was computed: 12 significant digits, and −0.0 as 0.0.

    Why: the same model is reached by different arithmetic — β(1 + α) with α = 0 is β exactly, but
    1 − 0.7 is 0.30000000000000004 while a linear weight 0.3 normalised is 0.3. Rounding to 12
    significant digits joins such one-ulp twins and never two settings anyone would search apart.
    """
    return float(f"{float(value):.12g}") + 0.0


def candidate_key(candidate: Candidate) -> dict[str, Any]:
    """What model a candidate *is*, independent of the parameter names that produced it.

    The one place that decides when two candidates are the same model, so an evaluation is recorded
    once and read back by every stage that meets the same weights again (SFT-i is EXPO-i at α = 0,
    EXPO-i is ExMe at β ∈ {0, 1}, linear 0.5 is task arithmetic at λ = 0.5 ...):

    - a candidate linear in the task vectors (base, a checkpoint, a :class:`Combination`, a merge
      method whose registry entry gives ``coefficients()``) is ``{"linear": {path: cᵢ}}`` with
      θ = θ_b + Σ cᵢΔᵢ, zero coefficients dropped, paths resolved, numbers canonical;
    - any other :class:`MethodMerge` is its exact recipe: method, models in order, canonical kwargs, seed.

    - a :class:`Combination` with per-group coefficients is ``{"linear_groups": ...}``: its group rule and
      each group's linear key.
    """
    if isinstance(candidate, BaseWeights):
        return {"linear": {}}
    if isinstance(candidate, CheckpointWeights):
        return {"linear": {str(Path(candidate.path).resolve()): 1.0}}
    if isinstance(candidate, Combination):
        if isinstance(candidate.coeffs, GroupCoefficients):
            # Per-group coefficients (a Combination whose groups all agree is already a plain tuple):
            # the rule's filters in order and each group's linear key.
            rule = candidate.coeffs.rule
            return {"linear_groups": {
                "filters": [list(f) for f in rule.filters], "default": rule.default,
                "groups": {g: _linear_key(candidate.models, candidate.coeffs.of_group(g)) for g in rule.groups},
            }}
        return {"linear": _linear_key(candidate.models, candidate.coeffs)}
    if isinstance(candidate, MethodMerge):
        from exme.merge.registry import get_method

        kwargs = dict(candidate.kwargs)
        method = get_method(candidate.method)
        coeffs = method.coefficients({k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()}) \
            if method.linear else None
        if coeffs is not None:
            return {"linear": _linear_key(candidate.models, coeffs)}
        return {"method": candidate.method, "models": [str(Path(p).resolve()) for p in candidate.models],
                "kwargs": {k: _canonical_value(v) for k, v in sorted(kwargs.items())}, "seed": candidate.seed}
    raise TypeError(f"not a candidate: {candidate!r}")


def _linear_key(models: Sequence[Path], coeffs: Sequence[float]) -> dict[str, float]:
    out: dict[str, float] = {}
    for path, c in zip(models, coeffs):
        name = str(Path(path).resolve())
        out[name] = canonical_coefficient(out.get(name, 0.0) + float(c))
    return {name: c for name, c in sorted(out.items()) if c != 0.0}


def _canonical_value(value: Any) -> Any:
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        return canonical_coefficient(value)
    if isinstance(value, (list, tuple)):
        return [_canonical_value(v) for v in value]
    return str(value)


class Evaluations(Protocol):
    """What a stage needs from the orchestrator: scores of candidates, recorded and resumable.

    ``stage`` names the study the evaluations are recorded in; ``label`` is for the progress display.
    """

    def points(self, stage: str, label: str, points: Sequence[Point], candidate: Callable[[Point], Candidate]) -> list[Record]:
        """Every point scored once (read back when recorded before), in ``points`` order."""

    def grid(self, stage: str, label: str, params: list[dict[str, Any]], candidate: Callable[[Point], Candidate],
             *, prune: bool) -> tuple[list[Record], list[Record]]:
        """A grid on the search split: (full records, pruned partial records)."""

    def sample(self, stage: str, label: str, candidate: Callable[[Point], Candidate], strategy: Any) -> Any:
        """A sampled strategy (:mod:`exme.search.sampled`: TPE, CMA-ES) on the search split, seeded and
        resumable: its :class:`~exme.search.strategy.Outcome`."""

    def search(self, stage: str, label: str, params: list[dict[str, Any]], candidate: Callable[[Point], Candidate],
               strategy: Any) -> Any:
        """``strategy.run`` (:mod:`exme.search.strategy`) on the search split: its :class:`~exme.search.strategy.Outcome`."""

    def grid_strategy(self, stage: str, label: str, *, prune: bool) -> Any:
        """The strategy :meth:`grid` would run over a list of points (a race, successive halving or every
        point), to run inside another strategy (:class:`~exme.search.refine.Refine`); its notes are the run's."""

    def race_chunks(self, chunk: int) -> list[tuple[int, int]] | None:
        """Chunks of ``chunk`` search items per task, or ``None`` when the evaluator cannot score chosen items."""

    def task_weights(self) -> dict[str, float]:
        """Each task's weight in the overall score."""


# ---------------------------------------------------------------------- results
@dataclass(frozen=True)
class RankResult:
    """Stage 1: the base and every checkpoint on the search split, and the top k kept."""

    ranking: list[RankedCheckpoint]
    base_dev: Record
    sft_dev: dict[str, Record]  # by checkpoint name (a raced-out checkpoint: its chunks so far)
    kept: list[Path]
    kept_names: list[str]
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class AlphaChoice:
    """One kept checkpoint's α search: its records and the chosen α."""

    name: str
    search: SearchResult
    records: list[Record]
    best: Record
    saved: int = 0  # grid points not evaluated because the curve had collapsed


@dataclass(frozen=True)
class ExtrapolateResult:
    """Stage 2: α per kept checkpoint."""

    choices: list[AlphaChoice]
    notes: list[str] = field(default_factory=list)

    @property
    def alphas(self) -> list[float]:
        return [float(c.best.params["alpha"]) for c in self.choices]


@dataclass(frozen=True)
class MergeResult:
    """Stage 3: the ExMe setting (weights and α per kept checkpoint) and the search that chose it."""

    weights: list[float]
    alphas: list[float]
    dev: Record
    beta_search: SearchResult | None = None
    joint_search: SearchResult | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def coefficients(self) -> list[float]:
        return exme_coefficients(self.weights, self.alphas)


@dataclass(frozen=True)
class BaselineChoice:
    method: str
    params: dict[str, float]
    dev: Record
    search: SearchResult


@dataclass(frozen=True)
class BaselinesResult:
    """Each baseline's own small search and its chosen setting."""

    choices: list[BaselineChoice]

    @property
    def searches(self) -> list[SearchResult]:
        return [c.search for c in self.choices]


@dataclass(frozen=True)
class Chosen:
    """A model of the final table before it is scored on test: its row and how to write it."""

    row: FinalRow
    candidate: Candidate
    dev: Record | None


@dataclass(frozen=True)
class TestResult:
    """The final table: every chosen model scored on the test split."""

    rows: list[FinalRow]
    records: list[Record]


# ---------------------------------------------------------------------- stage 1: rank
def rank(ev: Evaluations, checkpoints: Sequence[Path], names: Sequence[str], top_k: int,
         search: Any = None) -> RankResult:
    """Score the base and every checkpoint on the search split; keep the top k (ties: the later step).

    With ``search.race`` the checkpoints race on chunks of the search items first
    (:func:`exme.search.racing.race`); those that stop early keep the scores of their chunks and rank
    below every finisher, the finishers are scored on every search item as without racing.
    """
    points = [Point({"model": "base"})] + [
        Point({"checkpoint": name, "path": str(p.resolve())}) for name, p in zip(names, checkpoints)
    ]

    def candidate(point: Point) -> Candidate:
        if "model" in point.params:
            return BaseWeights()
        return CheckpointWeights(Path(point.params["path"]))

    chunks = ev.race_chunks(search.race_chunk) if search is not None and search.race else None
    notes: list[str] = []
    stopped: dict[int, Record] = {}
    if chunks is not None:
        from exme.search.racing import Race

        strategy = Race(top_k, chunks, search.race_error_rate, ev.task_weights())
        out = ev.search("rank", "race checkpoints", [p.params for p in points[1:]], candidate, strategy)
        index = {names[i]: i for i in range(len(checkpoints))}
        stopped = {index[r.params["checkpoint"]]: r for r in out.dropped}
        if out.dropped:
            notes += [f"rank: {n}: " + ", ".join(f"{names[i]} after {stopped[i].total_items} items" for i in sorted(stopped))
                      for n in out.notes]
        else:
            notes += [f"rank: {n}" for n in out.notes]
    finishers = [i for i in range(len(checkpoints)) if i not in stopped]
    full = ev.points("rank", "rank checkpoints", [points[0]] + [points[i + 1] for i in finishers], candidate)
    records: dict[int, Record] = {**dict(zip(finishers, full[1:])), **stopped}
    order = sorted(
        range(len(checkpoints)),
        key=lambda i: (i not in stopped, records[i].overall, _step_or_position(checkpoints[i], i)),
        reverse=True,
    )
    kept = set(order[:top_k])
    ranking = [
        RankedCheckpoint(
            name=names[i], path=str(checkpoints[i]), step=checkpoint_step(checkpoints[i]),
            dev=split_scores(records[i]), kept=i in kept, stopped_early=i in stopped,
        )
        for i in range(len(checkpoints))
    ]
    return RankResult(
        ranking=ranking, base_dev=full[0], sft_dev={names[i]: records[i] for i in range(len(checkpoints))},
        kept=[checkpoints[i] for i in order[:top_k]], kept_names=[names[i] for i in order[:top_k]], notes=notes,
    )


# ---------------------------------------------------------------------- stage 2: extrapolate
def extrapolate(ev: Evaluations, ranked: RankResult, config: PipelineConfig) -> ExtrapolateResult:
    """α per kept checkpoint on the search split (grid, optional successive halving and refinement)."""
    models = tuple(ranked.kept)
    k = len(models)
    grid = config.alpha.grid
    prune = config.search.prune
    choices = []
    notes: list[str] = []
    # Collapse is judged against the generation of the best SFT checkpoint on the search split.
    reference = ranked.sft_dev[ranked.kept_names[0]].generation
    for i, name in enumerate(ranked.kept_names):
        def candidate(point: Point, i: int = i) -> Candidate:
            coeffs = [0.0] * k
            coeffs[i] = exme_coefficients([1.0], [float(point.params["alpha"])])[0]  # w(1 + α), w = 1: exactly 1 + α
            return Combination(models, tuple(coeffs))

        stage = f"alpha/{name}"
        label = f"α for {name}"
        params = [{"alpha": a} for a in grid]
        saved = 0
        coarse: Any
        if config.alpha.stop_on_collapse and not prune and reference and len(grid) > 1:
            def stop(records: list[Record]) -> bool:
                return collapse_stop(records, reference, config.collapse.margin)

            coarse = Sequential(stop)
        else:
            coarse = ev.grid_strategy(stage, label, prune=prune)
        if config.alpha.refine and len(grid) > 1:
            # The finer grid is never pruned (its points are all near the best), but raced as any grid is.
            strategy = Refine(grid, coarse, ev.grid_strategy(stage, f"{label} (refine)", prune=False))
            out = ev.search(stage, label, params, candidate, strategy)
            first = out.coarse
        else:
            out = first = ev.search(stage, label, params, candidate, coarse)
        full, dropped = list(out.records), list(out.dropped)
        if isinstance(coarse, Sequential):
            saved = len(params) - len(first.records)
            if saved:
                notes.append(
                    f"α for {name}: stopped after α = {first.records[-1].params['alpha']:g} collapsed (hit-the-limit share over the "
                    f"best SFT's by more than {config.collapse.margin:g}) and scored below the best so far; "
                    f"{saved} larger α not evaluated"
                )
        full = sorted(full, key=lambda r: r.params["alpha"])
        chosen = best(full)  # ties: the smaller α
        search = SearchResult(
            name=f"alpha:{name}", checkpoint=name,
            space={"alpha": list(grid), "refine": config.alpha.refine, "prune": prune},
            trials=trials(full, dropped, keys=("alpha",)),
            best_params={"alpha": chosen.params["alpha"]}, best_dev=chosen.overall,
        )
        choices.append(AlphaChoice(name=name, search=search, records=full, best=chosen, saved=saved))
    return ExtrapolateResult(choices=choices, notes=notes)


def collapse_stop(records: Sequence[Record], reference: dict[str, dict[str, float]], margin: float) -> bool:
    """Whether an α search should stop after its last record: that point is collapsed (some generative
    task's hit-the-limit share exceeds the reference's by more than ``margin``) and it scored below the
    best of the points before it. Larger α push the model further the same way, so they are skipped."""
    if len(records) < 2:
        return False
    last = records[-1]
    collapsed = any(
        g.get("hit_limit", 0.0) - reference[t].get("hit_limit", 0.0) > margin
        for t, g in last.generation.items() if t in reference
    )
    return collapsed and last.overall < max(r.overall for r in records[:-1])


# ---------------------------------------------------------------------- stage 3: merge
def merge(ev: Evaluations, ranked: RankResult, extrapolated: ExtrapolateResult, config: PipelineConfig) -> MergeResult:
    """β on the search split (grid, K = 2) or a joint TPE search over (α₁..α_K, weights)."""
    k = len(ranked.kept)
    models = tuple(ranked.kept)
    alphas = extrapolated.alphas
    if k == 1:
        return MergeResult(
            weights=[1.0], alphas=list(alphas), dev=extrapolated.choices[0].best,
            notes=["top_k is 1: nothing to merge, ExMe is the extrapolated best checkpoint"],
        )
    if config.search.mode == "grid":
        a1, a2 = alphas

        def candidate(point: Point) -> Candidate:
            b = float(point.params["beta"])
            return Combination(models, tuple(exme_coefficients([b, 1.0 - b], [a1, a2])))

        stage = f"beta/alpha_1={a1!r},alpha_2={a2!r}"
        params = [{"beta": b} for b in config.beta.grid]
        full, dropped = ev.grid(stage, "β merge", params, candidate, prune=config.search.prune)
        chosen = best(full)
        b = float(chosen.params["beta"])
        search = SearchResult(
            name="beta", space={"beta": list(config.beta.grid), "alpha_1": a1, "alpha_2": a2},
            trials=trials(full, dropped, keys=("beta",)), best_params={"beta": b}, best_dev=chosen.overall,
        )
        return MergeResult(weights=[b, 1.0 - b], alphas=[a1, a2], dev=chosen, beta_search=search)
    return _joint(ev, models, config)


def joint_weights_alphas(params: dict[str, Any], k: int) -> tuple[list[float], list[float]]:
    """(weights, alphas) of a joint-search point: β for K = 2, else wᵢ normalised to sum 1."""
    alphas = [float(params[f"alpha_{i}"]) for i in range(1, k + 1)]
    if k == 2:
        b = float(params["beta"])
        return [b, 1.0 - b], alphas
    raw = [float(params[f"w_{i}"]) for i in range(1, k + 1)]
    total = sum(raw)
    return ([w / total for w in raw] if total > 0 else [1.0 / k] * k), alphas


def _joint(ev: Evaluations, models: tuple[Path, ...], config: PipelineConfig) -> MergeResult:
    import optuna

    k = len(models)
    lo, hi = config.alpha.grid[0], config.alpha.grid[-1]
    dists: dict[str, Any] = {}
    fixed: dict[str, float] = {}
    for i in range(1, k + 1):
        if hi > lo:
            dists[f"alpha_{i}"] = optuna.distributions.FloatDistribution(lo, hi)
        else:
            fixed[f"alpha_{i}"] = lo
    if k == 2:
        dists["beta"] = optuna.distributions.FloatDistribution(0.0, 1.0)
    else:
        for i in range(1, k + 1):
            dists[f"w_{i}"] = optuna.distributions.FloatDistribution(0.0, 1.0)

    def to_params(raw: dict[str, float]) -> dict[str, float]:
        return {**fixed, **{key: float(v) for key, v in raw.items()}}

    def candidate(point: Point) -> Candidate:
        w, a = joint_weights_alphas(point.params, k)
        return Combination(models, tuple(exme_coefficients(w, a)))

    n = config.search.n_trials
    records = ev.sample("joint", "joint TPE", candidate, TPE(dists, n, config.seed, to_params)).records
    chosen = best(records)
    w, a = joint_weights_alphas(chosen.params, k)
    keys = tuple(sorted(chosen.params))
    search = SearchResult(
        name="joint", space={"mode": "tpe", "n_trials": n, "alpha": [lo, hi], "params": sorted(dists)},
        trials=trials(records, [], keys=keys),
        best_params={key: float(chosen.params[key]) for key in keys}, best_dev=chosen.overall,
    )
    return MergeResult(weights=w, alphas=a, dev=chosen, joint_search=search)


# ---------------------------------------------------------------------- per-module α

def group_coefficients(rule: Any, weights: Sequence[float], alphas: dict[str, list[float]]) -> GroupCoefficients:
    """ExMe's coefficients wᵢ(1 + αᵢ) per group of tensors, from the merge weights and α per group."""
    return GroupCoefficients.from_groups(rule, {g: exme_coefficients(weights, a) for g, a in alphas.items()})


@dataclass(frozen=True)
class ModuleResult:
    """α per checkpoint for each group of tensors (``alpha.granularity``), the merge weights of the
    global stage kept; searched from the global optimum on the search split."""

    rule: GroupRule
    weights: list[float]
    alphas: dict[str, list[float]]  # group → α per kept checkpoint
    dev: Record
    search: SearchResult

    @property
    def coefficients(self) -> GroupCoefficients:
        return group_coefficients(self.rule, self.weights, self.alphas)

    @property
    def params(self) -> dict[str, float]:
        return module_params(self.alphas)


def module_params(alphas: dict[str, Sequence[float]]) -> dict[str, float]:
    """Flat parameter names of per-group α: ``alpha_<i>/<group>``."""
    return {f"alpha_{i}/{g}": float(a) for g, al in alphas.items() for i, a in enumerate(al, start=1)}


def per_module(ev: Evaluations, ranked: RankResult, merged: MergeResult, config: PipelineConfig,
               rule: GroupRule) -> ModuleResult:
    """α per checkpoint and group by TPE or CMA-ES (``alpha.sampler``, ``alpha.n_trials`` trials), the merge weights fixed at the global
    choice; the first trial is the global optimum itself, so the search never ends below it on the search
    split (whether the finer α generalize is for the confirm and test splits to say)."""
    import hashlib
    import json

    import optuna

    k = len(ranked.kept)
    models = tuple(ranked.kept)
    weights, start_alphas = list(merged.weights), list(merged.alphas)
    if config.alpha.module_range is not None:
        lo, hi = config.alpha.module_range
    else:
        lo, hi = config.alpha.grid[0], config.alpha.grid[-1]
    lo, hi = min(lo, *start_alphas), max(hi, *start_alphas)
    # A checkpoint of weight 0 (β = 0 or 1) contributes nothing whatever its α: its α stay the global ones.
    names = [f"alpha_{i}/{g}" for g in rule.groups for i in range(1, k + 1) if weights[i - 1] != 0]
    dists = {n: optuna.distributions.FloatDistribution(lo, hi) for n in names} if hi > lo else {}

    def alphas_of(params: dict[str, Any]) -> dict[str, list[float]]:
        return {g: [float(params.get(f"alpha_{i}/{g}", start_alphas[i - 1])) for i in range(1, k + 1)]
                for g in rule.groups}

    def candidate(point: Point) -> Candidate:
        alphas = alphas_of(point.params)
        return Combination(models, group_coefficients(rule, weights, alphas))

    start = {n: v for n, v in module_params({g: start_alphas for g in rule.groups}).items() if n in names}
    sampler = config.alpha.sampler
    if dists:
        space = {"rule": rule.granularity, "weights": weights, "alphas": start_alphas, "range": [lo, hi]}
        if sampler != "tpe":  # TPE's studies keep the names they had before there was a choice
            space["sampler"] = sampler
        key = json.dumps(space)
        stage = f"module/{rule.granularity}/{hashlib.sha256(key.encode()).hexdigest()[:10]}"
        strategy = sampled_strategies()[sampler](dists, config.alpha.n_trials, config.seed, start=start)
        label = f"α per {'module' if rule.granularity == 'module' else 'layer group'}"
        records = ev.sample(stage, label + ("" if sampler == "tpe" else f" ({sampler})"), candidate, strategy).records
    else:  # a one-point range: nothing to search
        records = ev.points("module/fixed", "α per group", [Point(start)], candidate)
    chosen = best(records)
    alphas = alphas_of(chosen.params)
    search = SearchResult(
        name=f"module:{rule.granularity}",
        space={"mode": sampler, "n_trials": config.alpha.n_trials, "alpha": [lo, hi], "groups": list(rule.groups),
               "weights": weights, "start": start},
        trials=trials(records, [], keys=tuple(names)),
        best_params=module_params(alphas), best_dev=chosen.overall,
    )
    return ModuleResult(rule=rule, weights=weights, alphas=alphas, dev=chosen, search=search)


# ---------------------------------------------------------------------- baselines
def baseline_candidate(models: tuple[Path, ...], method: str, params: dict[str, Any], seed: int) -> MethodMerge:
    kwargs = baseline_kwargs(method, params, len(models))
    return MethodMerge(models, method, tuple(sorted((key, _freeze(v)) for key, v in kwargs.items())), seed)


def baselines(ev: Evaluations, ranked: RankResult, config: PipelineConfig) -> BaselinesResult:
    """Each baseline's own small search on the search split over the same kept checkpoints."""
    models = tuple(ranked.kept)
    k = len(models)
    choices = []
    for method in config.baselines:
        space = baseline_space(method, k)

        def candidate(point: Point, method: str = method) -> Candidate:
            return baseline_candidate(models, method, point.params, config.seed)

        full, dropped = ev.grid(f"baseline/{method}", f"baseline {method}", product(space), candidate,
                                prune=config.search.prune)
        chosen = best(full)
        search = SearchResult(
            name=method, space={key: list(v) for key, v in space.items()},
            trials=trials(full, dropped, keys=tuple(space)), best_params=dict(chosen.params), best_dev=chosen.overall,
        )
        choices.append(BaselineChoice(method=method, params=dict(chosen.params), dev=chosen, search=search))
    return BaselinesResult(choices=choices)


# ---------------------------------------------------------------------- the chosen models
def chosen_models(ranked: RankResult, extrapolated: ExtrapolateResult, merged: MergeResult,
                  baselined: BaselinesResult, seed: int, module: ModuleResult | None = None) -> list[Chosen]:
    """Base, every kept SFT, each EXPO, ExMe (and per-module ExMe) and the baselines at their chosen settings."""
    models = tuple(ranked.kept)
    k = len(models)
    out: list[Chosen] = []

    def add(name: str, kind: str, method: str | None, params: dict[str, Any], cand: Candidate, dev: Record | None) -> None:
        row = FinalRow(name=name, kind=kind, method=method, params=params,
                       dev=split_scores(dev) if dev else None, test=SplitScores(overall=0.0, tasks={}))
        out.append(Chosen(row=row, candidate=cand, dev=dev))

    add("base", "base", None, {}, BaseWeights(), ranked.base_dev)
    for i, (name, path) in enumerate(zip(ranked.kept_names, ranked.kept), start=1):
        add(f"SFT-{i}", "sft", None, {"checkpoint": name}, CheckpointWeights(path), ranked.sft_dev[name])
    alphas = extrapolated.alphas
    for i, (name, choice) in enumerate(zip(ranked.kept_names, extrapolated.choices), start=1):
        coeffs = [0.0] * k
        coeffs[i - 1] = exme_coefficients([1.0], [alphas[i - 1]])[0]
        add(f"EXPO-{i}", "expo", "extrapolate", {"checkpoint": name, "alpha": alphas[i - 1]},
            Combination(models, tuple(coeffs)), choice.best)
    w, a = merged.weights, merged.alphas
    exme_params: dict[str, Any] = {f"alpha_{i}": a[i - 1] for i in range(1, k + 1)}
    if k == 2:
        exme_params["beta"] = w[0]
    elif k > 2:
        exme_params.update({f"weight_{i}": w[i - 1] for i in range(1, k + 1)})
    add("ExMe", "exme", "exme", exme_params, Combination(models, tuple(merged.coefficients)), merged.dev)
    if module is not None:
        add(MODULE_ROW, "exme_module", "task_arithmetic", {"granularity": module.rule.granularity, **module.params},
            Combination(models, module.coefficients), module.dev)
    for choice in baselined.choices:
        add(choice.method, "baseline", choice.method, dict(choice.params),
            baseline_candidate(models, choice.method, choice.params, seed), choice.dev)
    return out


def _row_point(row: FinalRow, split: str) -> Point:
    params = {"row": row.name, **{key: (v if isinstance(v, (int, float, str)) else str(v)) for key, v in row.params.items()}}
    return Point(params, split=split)


# ---------------------------------------------------------------------- dev: search and confirm
MIN_CONFIRM_ITEMS = 10


@dataclass(frozen=True)
class DevSplit:
    """The division of each task's dev items (ids: positions in the task's dev split) into search and confirm."""

    seed: int
    confirm_fraction: float
    search: dict[str, list[int]]
    confirm: dict[str, list[int]]

    def describe(self) -> dict[str, Any]:
        """What ``results.json`` keeps, so anyone can check or rebuild the division."""
        return {
            "method": "seeded_permutation", "seed": self.seed, "confirm_fraction": self.confirm_fraction,
            "search": {t: list(v) for t, v in self.search.items()},
            "confirm": {t: list(v) for t, v in self.confirm.items()},
        }


def dev_split(dev_counts: dict[str, int], fraction: float, seed: int) -> DevSplit:
    """Per task, a permutation of the dev positions seeded by (seed, task name, "confirm"); the first
    ``round(n · fraction)`` are confirm, the rest search (each part listed in position order).

    A pure function of the counts, the fraction and the seed: a resumed run divides dev identically.
    """
    import zlib

    import numpy as np

    search, confirm = {}, {}
    for task, n in dev_counts.items():
        seq = np.random.SeedSequence([seed, zlib.crc32(task.encode("utf-8")), zlib.crc32(b"confirm")])
        perm = np.random.default_rng(seq).permutation(n).tolist()
        k = int(round(n * fraction))
        confirm[task] = sorted(perm[:k])
        search[task] = sorted(perm[k:])
    return DevSplit(seed=seed, confirm_fraction=fraction, search=search, confirm=confirm)


def check_dev_split(split: DevSplit, source: str = "pipeline config") -> None:
    """Every task keeps at least :data:`MIN_CONFIRM_ITEMS` confirm items and one search item."""
    for task, ids in split.confirm.items():
        if len(ids) < MIN_CONFIRM_ITEMS:
            n = len(ids) + len(split.search[task])
            raise ExmeError(
                f"{source}: dev.confirm_fraction {split.confirm_fraction} leaves task {task!r} {len(ids)} confirm "
                f"item(s) of its {n} dev items; at least {MIN_CONFIRM_ITEMS} are needed: raise dev.confirm_fraction, "
                "add dev items, or set dev.confirm_fraction: 0 to turn the confirm split off"
            )
        if not split.search[task]:
            raise ExmeError(f"{source}: dev.confirm_fraction {split.confirm_fraction} leaves task {task!r} no search items; lower it")


# ---------------------------------------------------------------------- test and confirm
def _score_chosen(ev: Evaluations, chosen: Sequence[Chosen], split: str, label: str) -> list[Record]:
    """Every chosen model scored once on ``split`` (a study of its own, keyed by row and settings)."""
    by_key = {}
    points = []
    for c in chosen:
        point = _row_point(c.row, split)
        by_key[point.key] = c.candidate
        points.append(point)
    return ev.points(split, label, points, lambda p: by_key[p.key])


def test(ev: Evaluations, chosen: Sequence[Chosen]) -> TestResult:
    """Every chosen model scored once on the test split."""
    records = _score_chosen(ev, chosen, "test", "test split")
    rows = [c.row.model_copy(update={"test": split_scores(rec), "failed": rec.failed}) for c, rec in zip(chosen, records)]
    return TestResult(rows=rows, records=records)


test.__test__ = False  # type: ignore[attr-defined]  # a stage, not a pytest test


def confirm(ev: Evaluations, chosen: Sequence[Chosen]) -> list[Record]:
    """Every chosen model scored once on the confirm part of dev (after every choice was made)."""
    return _score_chosen(ev, chosen, "confirm", "confirm split")


# ---------------------------------------------------------------------- final model
def final_model_spec(ranked: RankResult, merged: MergeResult, config: PipelineConfig, out_dtype: str) -> dict[str, Any]:
    """The merge config (method ``exme``) of θ*, as ``exme merge`` reads it."""
    spec: dict[str, Any] = {
        "merge_method": "exme",
        "base_model": str(config.base),
        "models": [
            {"model": str(p), "parameters": {"weight": w, "alpha": a}}
            for p, w, a in zip(ranked.kept, merged.weights, merged.alphas)
        ],
        "dtype": "float32",
        "out_dtype": out_dtype,
    }
    if config.output_format == "peft":  # one LoRA adapter; its factors are float32, no output dtype
        spec["output_format"] = "peft"
        del spec["out_dtype"]
    return spec


def mergekit_spec(base: Path, models: Sequence[Path], coeffs: Sequence[float] | GroupCoefficients,
                  out_dtype: str) -> dict[str, Any]:
    """``merge.yaml``: θ_b + Σ cᵢΔᵢ in mergekit's own syntax, ``task_arithmetic`` with weight cᵢ, no
    normalisation and λ = 1, so mergekit (and ``exme merge``) make the model from it.

    Per-group coefficients become per-model ``weight`` lists of ``{filter, value}`` entries, the rule's
    filters in order and a last entry without filter for the default group: mergekit takes the first
    entry whose filter is a substring of the tensor name, which is :meth:`GroupRule.group_of` exactly.
    A LoRA adapter is written ``BASE+ADAPTER``, the spelling both tools read.
    """
    from exme.io.source import is_adapter

    def weight(i: int) -> Any:
        if not isinstance(coeffs, GroupCoefficients):
            return float(coeffs[i])
        rule = coeffs.rule
        entries: list[dict[str, Any]] = [{"filter": f, "value": coeffs.of_group(g)[i]} for f, g in rule.filters]
        return entries + [{"value": coeffs.of_group(rule.default)[i]}]

    return {
        "merge_method": "task_arithmetic",
        "base_model": str(base),
        "parameters": {"normalize": False, "lambda": 1.0},
        "models": [{"model": f"{base}+{p}" if is_adapter(p) else str(p), "parameters": {"weight": weight(i)}}
                   for i, p in enumerate(models)],
        "dtype": "float32",
        "out_dtype": out_dtype,
    }


# ---------------------------------------------------------------------- helpers
def split_scores(rec: Record) -> SplitScores:
    return SplitScores(overall=rec.overall, tasks=dict(rec.tasks), n_items=dict(rec.n_items),
                       per_item={t: dict(v) for t, v in rec.per_item.items()},
                       generation={t: dict(g) for t, g in rec.generation.items()})


def trials(full: Sequence[Record], dropped: Sequence[Record], keys: Sequence[str]) -> list[Trial]:
    def params(rec: Record) -> dict[str, float]:
        return {key: float(rec.params[key]) for key in keys if key in rec.params}

    return [Trial(params=params(r), dev=split_scores(r)) for r in full] + [
        Trial(params=params(r), dev=split_scores(r), pruned=True) for r in dropped
    ]


def product(space: dict[str, list[float]]) -> list[dict[str, float]]:
    points: list[dict[str, float]] = [{}]
    for key, values in space.items():
        points = [{**p, key: float(v)} for p in points for v in values]
    return points


def _step_or_position(path: Path, position: int) -> tuple[int, int]:
    step = checkpoint_step(path)
    return (step if step is not None else -1, position)


def _freeze(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value
