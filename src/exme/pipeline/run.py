"""The ExMe pipeline: rank → extrapolate → merge → test-split table → final model → report.

Every stage is a set of evaluations on one live model (:class:`exme.search.LiveModel`), recorded
as Optuna trials (:class:`exme.search.StudyStore`), so a run that is interrupted and started again
reads back what it had finished and goes on from there, and several workers can share the work.
Every choice (checkpoints, α, β, baseline settings) is made on the dev split; the test split is
only evaluated for the final table.
"""

from __future__ import annotations

import hashlib
import json
import math
import socket
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import yaml

from exme.errors import ExmeError
from exme.pipeline.config import PipelineConfig, checkpoint_step
from exme.report import save_results
from exme.report.schema import FinalRow, RankedCheckpoint, RunResults, SearchResult, SplitScores, Trial
from exme.search.study import Point, Record, StudyStore, best, successive_halving

#: Each baseline's own small dev search (one list of values per searched setting).
BASELINE_SPACES: dict[str, dict[str, list[float]]] = {
    "linear": {"weight_1": [0.3, 0.5, 0.7]},
    "task_arithmetic": {"lambda": [0.3, 0.5, 0.7, 1.0]},
    "ties": {"density": [0.3, 0.5, 0.7]},
    "dare_linear": {"density": [0.3, 0.5, 0.7]},
    "dare_ties": {"density": [0.3, 0.5, 0.7]},
}


def exme_coefficients(weights: Sequence[float], alphas: Sequence[float]) -> list[float]:
    """cᵢ = wᵢ(1 + αᵢ): θ* = θ_b + Σ cᵢΔᵢ, computed exactly as ``exme.merge.methods.exme`` does."""
    return [float(w) * (1.0 + float(a)) for w, a in zip(weights, alphas)]


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("exme")
    except Exception:  # running from a source tree that is not installed
        return "0+unknown"


@dataclass
class _Stage:
    """What a finished stage hands on: its search result and the chosen parameters."""

    search: SearchResult
    records: list[Record]
    best: Record
    notes: list[str] = field(default_factory=list)


class _Bars:
    """Rich progress bars, one per stage; a no-op when progress is off."""

    def __init__(self, enabled: bool):
        self.progress = None
        if enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.progress = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                TextColumn("{task.fields[info]}"),
            )

    @contextmanager
    def active(self) -> Iterator["_Bars"]:
        if self.progress is None:
            yield self
            return
        with self.progress:
            yield self

    def stage(self, label: str, total: int, *, show_best: bool = True) -> Callable[[Point, Record, bool], None]:
        """A callback for :meth:`StudyStore.evaluate` that advances a new bar (with the best dev score so far)."""
        if self.progress is None:
            return lambda point, rec, reused, step=1: None
        task = self.progress.add_task(label, total=total, info="")
        best_seen = [-math.inf]

        def advance(point: Point, rec: Record, reused: bool, step: int = 1) -> None:
            if rec.limit is None and show_best:
                best_seen[0] = max(best_seen[0], rec.overall)
            info = f"best {best_seen[0]:.4f}" if best_seen[0] > -math.inf else ""
            self.progress.update(task, advance=step, info=info + (" (resumed)" if reused else ""))

        return advance


class Pipeline:
    """One run of the pipeline over a validated :class:`PipelineConfig`.

    ``evaluator`` overrides ``config.suite`` (any object with ``evaluate(model, tokenizer, split,
    limit=None)``), which is how code-defined objectives are plugged in from Python.
    """

    def __init__(self, config: PipelineConfig, *, progress: bool = True, evaluator: Any = None):
        self.config = config
        self.progress = progress
        self.output = Path(config.output)
        self.checkpoints = config.checkpoint_paths()
        self.names = _unique_names(self.checkpoints)
        if evaluator is None:
            from exme.evaluate import load_evaluator

            evaluator = load_evaluator(config.suite)
        self.evaluator = evaluator
        self.fingerprint = _fingerprint(config)
        self.notes: list[str] = []
        self.timings: dict[str, float] = {}
        self.reused = 0
        self.evaluated = 0
        self._live = None
        self._tokenizer = None
        self._target = None
        self._store: StudyStore | None = None
        self._bars = _Bars(progress)

    # ------------------------------------------------------------------ resources
    @property
    def store(self) -> StudyStore:
        if self._store is None:
            self.output.mkdir(parents=True, exist_ok=True)
            self._store = StudyStore(self.config.storage_url)
        return self._store

    @property
    def live(self):
        if self._live is None:
            from exme.search.live import LiveModel

            self._live = LiveModel.load(self.config.base, dtype=self.config.dtype, device=self.config.device)
        return self._live

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            for source in [self.config.base, *self.checkpoints]:
                try:
                    self._tokenizer = AutoTokenizer.from_pretrained(source)
                    break
                except Exception:  # no tokenizer files in this folder: try the next one
                    continue
            else:
                raise ExmeError(
                    f"{self.config.base}: no tokenizer found in the base or any checkpoint; save the tokenizer with the base"
                )
        return self._tokenizer

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None

    def study_name(self, stage: str) -> str:
        return f"exme-{self.fingerprint}/{stage}"

    # ------------------------------------------------------------------ evaluation
    def _evaluate(self, apply: Callable[[], None], point: Point):
        apply()
        self.evaluated += 1
        return self.evaluator.evaluate(self.target(), self.tokenizer, point.split, limit=point.limit)

    def target(self):
        """What the evaluator scores: the live module (backend hf) or the engine serving its candidate (vllm)."""
        if self._target is None:
            from exme.evaluate.backends import LiveTarget

            c = self.config
            self._target = LiveTarget(
                c.backend, lambda: self.live, model_path=c.base, device=c.device, dtype=c.dtype, seed=c.seed,
                tokenizer_path=getattr(self.tokenizer, "name_or_path", None) or None,
                **(c.vllm.model_dump() if c.backend == "vllm" else {}),
            )
        return self._target()

    def _run_points(self, stage: str, label: str, points: Sequence[Point], setter: Callable[[Point], Callable[[], None]]) -> list[Record]:
        bar = self._bars.stage(label, len(points), show_best=points[0].split == "dev")

        def on_result(point: Point, rec: Record, reused: bool) -> None:
            self.reused += int(reused)
            bar(point, rec, reused)

        return self.store.evaluate(
            self.study_name(stage), points, lambda p: self._evaluate(setter(p), p), on_result=on_result
        )

    def _grid(self, stage: str, label: str, params: list[dict[str, Any]], setter, *, prune: bool) -> tuple[list[Record], list[Record]]:
        """Evaluate a grid on dev, with successive halving when asked; (full records, pruned partials)."""
        if not prune or len(params) <= 1:
            return self._run_points(stage, label, [Point(p) for p in params], setter), []
        s = self.config.search
        bar = self._bars.stage(label + " (pruned)", len(params))
        seen: set[str] = set()

        def on_result(point: Point, rec: Record, reused: bool) -> None:
            self.reused += int(reused)
            key = json.dumps(point.params, sort_keys=True)
            bar(point, rec, reused, 0 if key in seen else 1)  # one step per candidate, the best on every result
            seen.add(key)

        full, dropped = successive_halving(
            self.store, self.study_name(stage), params, lambda p: self._evaluate(setter(p), p),
            min_items=s.prune_min_items, eta=s.prune_eta, on_result=on_result,
        )
        self._note_pruning(stage, label, params, full, dropped)
        return full, dropped

    def _note_pruning(self, stage: str, label: str, params: list[dict[str, Any]], full: list[Record], dropped: list[Record]) -> None:
        """How many items successive halving scored, against scoring every point in full."""
        study = self.store.study(self.study_name(stage))
        spent = 0
        keys = {json.dumps(p, sort_keys=True) for p in params}
        for rec in self.store.records(study).values():
            if json.dumps(rec.params, sort_keys=True) in keys:
                spent += rec.total_items
        per_full = max((r.total_items for r in full), default=0)
        unpruned = per_full * len(params)
        if unpruned:
            saved = 1 - spent / unpruned
            self.notes.append(
                f"{label}: successive halving scored {spent} items where the full grid needs {unpruned} "
                f"({100 * saved:.0f}% saved; {len(dropped)} of {len(params)} candidates dropped early)"
            )

    # ------------------------------------------------------------------ stage 1: rank
    def rank(self) -> list[RankedCheckpoint]:
        """Score the base and every checkpoint on dev; keep the top k (ties: the later step)."""
        t0 = time.perf_counter()
        points = [Point({"model": "base"})] + [
            Point({"checkpoint": name, "path": str(p.resolve())}) for name, p in zip(self.names, self.checkpoints)
        ]

        def setter(point: Point) -> Callable[[], None]:
            if "model" in point.params:
                return self.live.apply_base
            return lambda: self.live.load_checkpoint(Path(point.params["path"]))

        records = self._run_points("rank", "rank checkpoints", points, setter)
        self.base_dev = records[0]
        order = sorted(
            range(len(self.checkpoints)),
            key=lambda i: (records[i + 1].overall, _step_or_position(self.checkpoints[i], i)),
            reverse=True,
        )
        kept = set(order[: self.config.top_k])
        self.kept = [self.checkpoints[i] for i in order[: self.config.top_k]]
        self.kept_names = [self.names[i] for i in order[: self.config.top_k]]
        self.sft_dev = {self.names[i]: records[i + 1] for i in range(len(self.checkpoints))}
        self.ranking = [
            RankedCheckpoint(
                name=self.names[i], path=str(self.checkpoints[i]), step=checkpoint_step(self.checkpoints[i]),
                dev=_split(records[i + 1]), kept=i in kept,
            )
            for i in range(len(self.checkpoints))
        ]
        self.timings["rank"] = self.timings.get("rank", 0.0) + time.perf_counter() - t0
        return self.ranking

    # ------------------------------------------------------------------ stage 2: extrapolate
    def extrapolate(self) -> list[_Stage]:
        """α per kept checkpoint on dev (grid, optional successive halving and refinement)."""
        t0 = time.perf_counter()
        self.live.set_models(self.kept)
        k = len(self.kept)
        grid = self.config.alpha.grid
        stages = []
        for i, name in enumerate(self.kept_names):
            def setter(point: Point, i: int = i) -> Callable[[], None]:
                coeffs = [0.0] * k
                coeffs[i] = 1.0 + float(point.params["alpha"])
                return lambda: self.live.apply(coeffs)

            stage = f"alpha/{name}"
            params = [{"alpha": a} for a in grid]
            full, dropped = self._grid(stage, f"α for {name}", params, setter, prune=self.config.search.prune)
            if self.config.alpha.refine and len(grid) > 1:
                chosen = best(sorted(full, key=lambda r: r.params["alpha"]))
                extra = [{"alpha": a} for a in _refine(grid, chosen.params["alpha"]) if a not in grid]
                if extra:
                    more, more_dropped = self._grid(stage, f"α for {name} (refine)", extra, setter, prune=False)
                    full, dropped = full + more, dropped + more_dropped
            full = sorted(full, key=lambda r: r.params["alpha"])
            chosen = best(full)  # ties: the smaller α
            search = SearchResult(
                name=f"alpha:{name}", checkpoint=name,
                space={"alpha": list(grid), "refine": self.config.alpha.refine, "prune": self.config.search.prune},
                trials=_trials(full, dropped, keys=("alpha",)),
                best_params={"alpha": chosen.params["alpha"]}, best_dev=chosen.overall,
            )
            stages.append(_Stage(search, full, chosen))
        self.alpha_stages = stages
        self.alphas = [float(s.best.params["alpha"]) for s in stages]
        self.timings["extrapolate"] = self.timings.get("extrapolate", 0.0) + time.perf_counter() - t0
        return stages

    # ------------------------------------------------------------------ stage 3: merge
    def merge(self) -> tuple[dict[str, Any], SearchResult | None, SearchResult | None]:
        """β on dev (grid, K = 2) or a joint TPE search over (α₁..α_K, weights); the ExMe choice."""
        t0 = time.perf_counter()
        k = len(self.kept)
        beta_search = joint_search = None
        if k == 1:
            self.exme_params = {"weights": [1.0], "alphas": list(self.alphas)}
            self.exme_dev = self.alpha_stages[0].best
            self.notes.append("top_k is 1: nothing to merge, ExMe is the extrapolated best checkpoint")
        elif self.config.search.mode == "grid":
            a1, a2 = self.alphas

            def setter(point: Point) -> Callable[[], None]:
                b = float(point.params["beta"])
                coeffs = exme_coefficients([b, 1.0 - b], [a1, a2])
                return lambda: self.live.apply(coeffs)

            stage = f"beta/alpha_1={a1!r},alpha_2={a2!r}"
            params = [{"beta": b} for b in self.config.beta.grid]
            full, dropped = self._grid(stage, "β merge", params, setter, prune=self.config.search.prune)
            chosen = best(full)
            b = float(chosen.params["beta"])
            beta_search = SearchResult(
                name="beta", space={"beta": list(self.config.beta.grid), "alpha_1": a1, "alpha_2": a2},
                trials=_trials(full, dropped, keys=("beta",)), best_params={"beta": b}, best_dev=chosen.overall,
            )
            self.exme_params = {"weights": [b, 1.0 - b], "alphas": [a1, a2]}
            self.exme_dev = chosen
        else:
            joint_search = self._joint()
        self.timings["merge"] = self.timings.get("merge", 0.0) + time.perf_counter() - t0
        return self.exme_params, beta_search, joint_search

    def _joint(self) -> SearchResult:
        import optuna

        k = len(self.kept)
        lo, hi = self.config.alpha.grid[0], self.config.alpha.grid[-1]
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

        def weights_alphas(params: dict[str, Any]) -> tuple[list[float], list[float]]:
            alphas = [float(params[f"alpha_{i}"]) for i in range(1, k + 1)]
            if k == 2:
                b = float(params["beta"])
                return [b, 1.0 - b], alphas
            raw = [float(params[f"w_{i}"]) for i in range(1, k + 1)]
            total = sum(raw)
            return ([w / total for w in raw] if total > 0 else [1.0 / k] * k), alphas

        def objective(point: Point):
            w, a = weights_alphas(point.params)
            coeffs = exme_coefficients(w, a)
            return self._evaluate(lambda: self.live.apply(coeffs), point)

        n = self.config.search.n_trials
        bar = self._bars.stage("joint TPE", n)

        def on_result(point: Point, rec: Record, reused: bool) -> None:
            self.reused += int(reused)
            bar(point, rec, reused)

        records = self.store.tpe(
            self.study_name("joint"), dists, objective, n_trials=n, seed=self.config.seed,
            to_params=to_params, on_result=on_result,
        )
        chosen = best(records)
        w, a = weights_alphas(chosen.params)
        self.exme_params = {"weights": w, "alphas": a}
        self.exme_dev = chosen
        keys = tuple(sorted(chosen.params))
        return SearchResult(
            name="joint", space={"mode": "tpe", "n_trials": n, "alpha": [lo, hi], "params": sorted(dists)},
            trials=_trials(records, [], keys=keys),
            best_params={key: float(chosen.params[key]) for key in keys}, best_dev=chosen.overall,
        )

    # ------------------------------------------------------------------ baselines
    def baselines(self) -> list[SearchResult]:
        """Each baseline's own small dev search over the same kept checkpoints."""
        t0 = time.perf_counter()
        k = len(self.kept)
        out = []
        self.baseline_choice: dict[str, tuple[dict[str, float], Record]] = {}
        for method in self.config.baselines:
            space = dict(BASELINE_SPACES[method])
            if method == "linear" and k != 2:
                space = {}
            params_list = _product(space)

            def setter(point: Point, method: str = method) -> Callable[[], None]:
                kwargs = _baseline_kwargs(method, point.params, k)
                return lambda: self.live.apply_method(method, seed=self.config.seed, **kwargs)

            stage = f"baseline/{method}"
            full, _ = self._grid(stage, f"baseline {method}", params_list, setter, prune=False)
            chosen = best(full)
            out.append(
                SearchResult(
                    name=method, space={key: list(v) for key, v in space.items()},
                    trials=_trials(full, [], keys=tuple(space)), best_params=dict(chosen.params), best_dev=chosen.overall,
                )
            )
            self.baseline_choice[method] = (dict(chosen.params), chosen)
        self.timings["baselines"] = self.timings.get("baselines", 0.0) + time.perf_counter() - t0
        return out

    # ------------------------------------------------------------------ test table
    def test_table(self) -> list[FinalRow]:
        """Base, every kept SFT, each EXPO, ExMe and the baselines on the test split."""
        t0 = time.perf_counter()
        k = len(self.kept)
        rows: list[tuple[FinalRow, Callable[[], None], Record | None]] = []

        def row(name: str, kind: str, method: str | None, params: dict[str, Any], apply: Callable[[], None], dev: Record | None) -> None:
            rows.append((FinalRow(name=name, kind=kind, method=method, params=params, dev=_split(dev) if dev else None,
                                  test=SplitScores(overall=0.0, tasks={})), apply, dev))

        row("base", "base", None, {}, self.live.apply_base, self.base_dev)
        for i, (name, path) in enumerate(zip(self.kept_names, self.kept), start=1):
            row(f"SFT-{i}", "sft", None, {"checkpoint": name}, lambda p=path: self.live.load_checkpoint(p), self.sft_dev[name])
        for i, (name, stage) in enumerate(zip(self.kept_names, self.alpha_stages), start=1):
            coeffs = [0.0] * k
            coeffs[i - 1] = 1.0 + self.alphas[i - 1]
            row(f"EXPO-{i}", "expo", "extrapolate", {"checkpoint": name, "alpha": self.alphas[i - 1]},
                lambda c=coeffs: self.live.apply(c), stage.best)
        w, a = self.exme_params["weights"], self.exme_params["alphas"]
        exme_params: dict[str, Any] = {f"alpha_{i}": a[i - 1] for i in range(1, k + 1)}
        if k == 2:
            exme_params["beta"] = w[0]
        elif k > 2:
            exme_params.update({f"weight_{i}": w[i - 1] for i in range(1, k + 1)})
        coeffs = exme_coefficients(w, a)
        row("ExMe", "exme", "exme", exme_params, lambda: self.live.apply(coeffs), self.exme_dev)
        for method, (params, dev) in self.baseline_choice.items():
            kwargs = _baseline_kwargs(method, params, k)
            row(method, "baseline", method, dict(params),
                lambda m=method, kw=kwargs: self.live.apply_method(m, seed=self.config.seed, **kw), dev)

        appliers = {}
        points = []
        for final, apply, _ in rows:
            params = {"row": final.name, **{key: (v if isinstance(v, (int, float, str)) else str(v)) for key, v in final.params.items()}}
            point = Point(params, split="test")
            appliers[point.key] = apply
            points.append(point)
        records = self._run_points("test", "test split", points, lambda p: appliers[p.key])
        final_rows = []
        for (final, _, _), rec in zip(rows, records):
            final_rows.append(final.model_copy(update={"test": _split(rec)}))
        self.final_rows = final_rows
        self.timings["test"] = self.timings.get("test", 0.0) + time.perf_counter() - t0
        return final_rows

    # ------------------------------------------------------------------ final model
    def write_final_model(self) -> Path:
        """Write θ* with the streaming merge engine (method ``exme``) into ``<output>/model``."""
        from exme.merge.config import MergeConfig
        from exme.merge.engine import run_merge

        t0 = time.perf_counter()
        dtype = str(self.live.dtype).removeprefix("torch.")
        spec = {
            "merge_method": "exme",
            "base_model": str(self.config.base),
            "models": [
                {"model": str(p), "parameters": {"weight": w, "alpha": a}}
                for p, w, a in zip(self.kept, self.exme_params["weights"], self.exme_params["alphas"])
            ],
            "dtype": "float32",
            "out_dtype": dtype,
        }
        config = MergeConfig.model_validate(spec)
        target = self.output / "model"
        marker = self.output / "model.spec.json"  # what model/ holds, so a resumed run need not rewrite it
        if target.is_dir() and marker.is_file() and json.loads(marker.read_text()) == spec:
            return target
        # Workers on one machine sharing this output folder write it once: the first to claim it.
        key = json.dumps({"host": socket.gethostname(), "out": str(target.resolve()), "spec": spec}, sort_keys=True)
        if not self.store.claim(self.study_name("final-model"), key):
            self.notes.append(f"{target} is written by another worker sharing this run folder")
            return target
        marker.unlink(missing_ok=True)
        out = run_merge(config, target, device=self.config.device, force=True, seed=self.config.seed,
                        progress=self.progress)
        marker.write_text(json.dumps(spec, indent=2))
        self.timings["final model"] = time.perf_counter() - t0
        return Path(out)

    # ------------------------------------------------------------------ results
    def results(self, **parts: Any) -> RunResults:
        describe = getattr(self.evaluator, "describe", None)
        suite = describe() if callable(describe) else {"spec": self.config.suite}
        return RunResults(
            exme_version=_version(),
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            config=json.loads(self.config.model_dump_json()),
            suite={"spec": self.config.suite, **suite},
            timings=dict(self.timings),
            notes=list(self.notes),
            **parts,
        )


def rank_checkpoints(config: PipelineConfig, *, progress: bool = True, evaluator: Any = None) -> list[RankedCheckpoint]:
    """Stage 1 alone (``exme rank``): every checkpoint scored on dev, recorded in the run's study."""
    pipe = Pipeline(config, progress=progress, evaluator=evaluator)
    try:
        with pipe._bars.active():
            return pipe.rank()
    finally:
        pipe.close()


def run_pipeline(config: PipelineConfig, *, progress: bool = True, evaluator: Any = None,
                 write_model: bool = True, report: bool = True) -> RunResults:
    """Run every stage and write the run folder (``results.json``, ``report.md``, plots, ``model/``).

    Safe to call again on the same output after an interruption: finished evaluations are read
    back from the study, never repeated. ``write_model=False`` skips the final model and
    ``report=False`` the report (``exme report`` can render it later from ``results.json``).
    """
    pipe = Pipeline(config, progress=progress, evaluator=evaluator)
    out = Path(config.output)
    try:
        with pipe._bars.active():
            ranking = pipe.rank()
            save_results(pipe.results(ranking=ranking), out)
            alpha = pipe.extrapolate()
            _, beta_search, joint_search = pipe.merge()
            baseline_search = pipe.baselines()
            final = pipe.test_table()
        parts: dict[str, Any] = dict(
            ranking=ranking, alpha_search=[s.search for s in alpha], beta_search=beta_search,
            joint_search=joint_search, baseline_search=baseline_search, final=final,
        )
        save_results(pipe.results(**parts), out)
        if write_model:
            parts["final_model"] = str(pipe.write_final_model())
        pipe.notes.append(
            f"this invocation evaluated {pipe.evaluated} candidates"
            + (f"; {pipe.reused} finished evaluations were read back from the study (resumed or shared run)" if pipe.reused else "")
        )
        results = pipe.results(**parts)
        save_results(results, out)
        # Only what was given (paths resolved): the file stays a valid PIPELINE.yaml to run again, and
        # results.json keeps the full configuration with every default.
        (out / "pipeline.yaml").write_text(
            yaml.safe_dump(json.loads(config.model_dump_json(exclude_unset=True)), sort_keys=False)
        )
        if report:
            from exme.report import render

            render(results, out)
        return results
    finally:
        pipe.close()


# ---------------------------------------------------------------------- helpers
def _fingerprint(config: PipelineConfig) -> str:
    """What the recorded evaluations depend on: base, suite (and its file's bytes), dtype, seed."""
    suite = config.suite
    suite_bytes = ""
    if Path(suite).is_file():
        suite_bytes = hashlib.sha256(Path(suite).read_bytes()).hexdigest()
    text = json.dumps(
        {"base": str(Path(config.base).resolve()), "suite": suite, "suite_sha": suite_bytes,
         "dtype": config.dtype, "seed": config.seed},
        sort_keys=True,
    )
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _unique_names(paths: Sequence[Path]) -> list[str]:
    names = [p.name for p in paths]
    if len(set(names)) == len(names):
        return names
    return [f"{p.parent.name}/{p.name}" if names.count(p.name) > 1 else p.name for p in paths]


def _step_or_position(path: Path, position: int) -> tuple[int, int]:
    step = checkpoint_step(path)
    return (step if step is not None else -1, position)


def _split(rec: Record) -> SplitScores:
    return SplitScores(overall=rec.overall, tasks=dict(rec.tasks), n_items=dict(rec.n_items))


def _trials(full: Sequence[Record], dropped: Sequence[Record], keys: Sequence[str]) -> list[Trial]:
    def params(rec: Record) -> dict[str, float]:
        return {key: float(rec.params[key]) for key in keys if key in rec.params}

    return [Trial(params=params(r), dev=_split(r)) for r in full] + [
        Trial(params=params(r), dev=_split(r), pruned=True) for r in dropped
    ]


def _refine(grid: Sequence[float], center: float) -> list[float]:
    """A finer grid (step/5) within one coarse step either side of ``center``, never below 0."""
    gaps = [b - a for a, b in zip(grid, grid[1:])]
    step = min(gaps)
    fine = step / 5
    out = []
    for j in range(-4, 5):
        a = round(center + j * fine, 10)
        if j != 0 and a >= 0:
            out.append(a)
    return out


def _product(space: dict[str, list[float]]) -> list[dict[str, float]]:
    points: list[dict[str, float]] = [{}]
    for key, values in space.items():
        points = [{**p, key: float(v)} for p in points for v in values]
    return points


def _baseline_kwargs(method: str, params: dict[str, Any], k: int) -> dict[str, Any]:
    """The merge-method arguments of a baseline setting (weights over the kept checkpoints)."""
    if method == "linear":
        w1 = float(params.get("weight_1", 1.0 / k))
        weights = [w1, 1.0 - w1] if k == 2 else [1.0 / k] * k
        return {"weights": weights, "normalize": True}
    if method == "task_arithmetic":
        return {"weights": [1.0] * k, "lambda_": float(params["lambda"])}
    if method in ("ties", "dare_ties"):
        return {"weights": [1.0] * k, "density": float(params["density"]), "normalize": True}
    if method == "dare_linear":
        return {"weights": [1.0] * k, "density": float(params["density"]), "normalize": True}
    raise ExmeError(f"unknown baseline {method!r}")
