"""The ExMe pipeline's orchestrator: it sequences the stages of :mod:`exme.pipeline.stages` and persists.

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
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import yaml

from exme.errors import ExmeError
from exme.pipeline import stages
from exme.pipeline.config import PipelineConfig
from exme.pipeline.stages import exme_coefficients
from exme.report import save_results
from exme.report import verdict
from exme.report.schema import FinalRow, RankedCheckpoint, RunResults
from exme.report.stats import task_weights
from exme.search.cmaes import generation_note as cmaes_generation_note
from exme.search.sampled import sampled_strategies
from exme.search.study import Point, Record, StudyStore, failed_scores, scores_dict

__all__ = ["Runner", "exme_coefficients", "rank_checkpoints", "run_pipeline"]

def _version() -> str:
    try:
        from importlib.metadata import version

        return version("exme")
    except Exception:  # running from a source tree that is not installed
        return "0+unknown"


class _Bars:
    """One progress bar per stage (:mod:`exme.progress`: ETA on a terminal, a plain line per finished
    evaluation elsewhere); a no-op when progress is off."""

    def __init__(self, enabled: bool):
        from exme.progress import Progress

        self.display = Progress(enabled)

    @contextmanager
    def active(self) -> Iterator["_Bars"]:
        with self.display:
            yield self

    def stage(self, label: str, total: int, *, show_best: bool = True) -> Callable[..., None]:
        """A callback for :meth:`StudyStore.evaluate` that advances a new bar (with the best dev score so far)."""
        if not self.display.enabled:
            return lambda point, rec, reused, step=1: None
        bar = self.display.bar(label, total)
        best_seen = [-math.inf]

        def advance(point: Point, rec: Record, reused: bool, step: int = 1) -> None:
            # the best over full search-split scores only: a rung's prefix or a race's chunk is a partial score
            if rec.limit is None and point.chunk is None and show_best:
                best_seen[0] = max(best_seen[0], rec.overall)
            info = f"best {best_seen[0]:.4f}" if best_seen[0] > -math.inf else ""
            bar.advance(step, info=info + (" (resumed)" if reused else ""))

        return advance


class Runner:
    """Evaluations for the stages (:class:`exme.pipeline.stages.Evaluations`): candidates written into
    one live model, scored by the evaluator, recorded in the run's Optuna study, shown on the bars.

    ``evaluator`` overrides ``config.suite`` (any object with ``evaluate(model, tokenizer, split,
    limit=None)``), which is how code-defined objectives are plugged in from Python; what else it can
    do (score a subset of dev for the confirm split, keep per-item records for ``log_samples``) it
    declares in ``capabilities`` (:class:`exme.evaluate.Capabilities`).
    """

    def __init__(self, config: PipelineConfig, *, progress: bool = True, evaluator: Any = None):
        self.config = config
        self.progress = progress
        self.output = Path(config.output)
        self.checkpoints = config.checkpoint_paths()
        self.names = _unique_names(self.checkpoints)
        if evaluator is None:
            from exme.evaluate import load_evaluator

            evaluator = load_evaluator(config.evaluator_spec())
        self.evaluator = evaluator
        check_backend = getattr(evaluator, "check_backend", None)  # lm-eval: every task servable on the engine
        if check_backend is not None:
            check_backend(config.backend)
        self._check_log_samples()
        self.notes: list[str] = []
        self.dev_split = self._divide_dev()
        self.group_rule = self._group_rule()
        self.fingerprint = _fingerprint(config, self.dev_split)
        self.search_item_ids = self.search_items()
        self.timings: dict[str, float] = {}
        self.reused = 0
        self.evaluated = 0
        self.shared = 0
        self.costs: Any = None  # the cost projection (exme.search.cost.CostProjection), set by run_pipeline
        self._live: Any = None
        self._tokenizer: Any = None
        self._target: Any = None
        self._engine: Any = None  # backend vllm: the engine the live model writes into
        self._store: StudyStore | None = None
        self.inputs: Any = None  # the preflight report: what every input's files were when checked
        self.bars = _Bars(progress)
        from exme.search.partial import joinable_tasks

        self._joinable = joinable_tasks(evaluator)  # the tasks whose partial evaluations join exactly

    def _check_log_samples(self) -> None:
        """``log_samples`` needs per-item records, which only some evaluators keep (they declare it, see
        :class:`~exme.evaluate.Capabilities`): refused before any model loads."""
        from exme.evaluate import capabilities_of

        if self.config.log_samples and not capabilities_of(self.evaluator).item_records:
            raise ExmeError(
                f"log_samples: true (--log-samples) needs a suite YAML file, but the evaluator of {self.config.suite!r} "
                "keeps no per-item records (lm-eval tasks and custom objectives); remove log_samples, or log "
                "lm-eval samples with lm-eval itself"
            )

    def samples_path(self, row: str) -> Path:
        """Where ``log_samples`` writes a final-table row's test items."""
        safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in row)
        return self.output / "samples" / f"{safe}_test.jsonl"

    def _divide_dev(self) -> stages.DevSplit | None:
        """The search/confirm division of dev, checked before any model loads; ``None`` when off."""
        fraction = self.config.dev.confirm_fraction
        if fraction == 0:
            self.notes.append("no confirm split (dev.confirm_fraction: 0): every dev item was used for the searches, "
                              "so the dev scores of the chosen models are optimistic and nothing confirms them")
            return None
        from exme.evaluate import capabilities_of

        counts = getattr(self.evaluator, "counts", None)
        if not callable(counts) or not capabilities_of(self.evaluator).subset:
            self.notes.append("no confirm split: this evaluator cannot score a chosen subset of dev items "
                              "(a custom objective, or one that declares no subset capability), so every dev item was used for the searches")
            return None
        split = stages.dev_split(dict(counts()["dev"]), fraction, self.config.seed)
        stages.check_dev_split(split)
        return split

    def _group_rule(self) -> Any:
        """The tensor groups of ``alpha.granularity`` from the base's tensor names (headers only), so a
        granularity the model cannot have is one error before any model loads; ``None`` for global."""
        if self.config.alpha.granularity == "global":
            return None
        from exme.io import Checkpoint
        from exme.merge.groups import group_rule

        return group_rule(self.config.alpha.granularity, Checkpoint.open(self.config.base).names,
                          source=f"{self.config.base}: alpha.granularity")

    # ------------------------------------------------------------------ resources
    @property
    def store(self) -> StudyStore:
        if self._store is None:
            from exme.io.writer import write_faults

            with write_faults(self.output, "creating the run folder"):
                self.output.mkdir(parents=True, exist_ok=True)
            self._store = StudyStore(self.config.storage_url)
        return self._store

    def check_output(self, *, write_model: bool) -> None:
        """Before the first evaluation: the run folder takes files and has room for the final model.

        The final model is the one large write (the base's tensors in the run's dtype); the study,
        results, report and samples are small beside it.
        """
        from exme.io.preflight import planned_model_bytes
        from exme.io.writer import SIDE_FILES_SLACK, check_output_location

        needed = planned_model_bytes(self.config.base, self.config.dtype) + SIDE_FILES_SLACK if write_model else None
        if needed is not None and (self.output / "model").is_dir():
            needed = None  # written by an earlier invocation: it is replaced only when the choices changed
        check_output_location(self.output, needed, what="run folder")

    @property
    def live(self) -> Any:
        if self._live is None:
            from exme.search.live import LiveModel

            c = self.config
            if c.backend == "vllm":  # one live copy: candidates stream into the engine, no transformers module
                from exme.evaluate.backends.vllm import start_live

                opts = c.engine_options()
                self._live, self._engine = start_live(
                    c.base, dtype=c.dtype, device=c.device, seed=c.seed, kept=c.top_k, store=opts.pop("store"),
                    tokenizer_path=getattr(self.tokenizer, "name_or_path", None) or None, **opts,
                )
            else:
                self._live = LiveModel.load(c.base, dtype=c.dtype, device=c.device)
        return self._live

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            from exme.common import load_tokenizer

            for source in [self.config.base, *self.checkpoints]:
                try:
                    self._tokenizer = load_tokenizer(source)
                    break
                except ExmeError:  # no tokenizer files in this folder: try the next one
                    continue
            else:
                raise ExmeError(
                    f"{self.config.base}: no tokenizer found in the base or any checkpoint; save the tokenizer with the base"
                )
        return self._tokenizer

    def preflight(self) -> None:
        """Open, align and scan every input once before the first evaluation (cached in the run folder)."""
        from exme.io.preflight import check_inputs

        report = check_inputs(self.config.base, self.checkpoints, cache_dir=self.output, progress=self.progress,
                              refuse_changed=True)
        self.notes.extend(report.notes)
        self.inputs = report

    def inputs_unchanged(self) -> None:
        """Every input file is still the one preflight checked (a cheap ``stat`` per file)."""
        if self.inputs is not None:
            self.inputs.verify_unchanged()

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None

    def study_name(self, stage: str) -> str:
        return f"exme-{self.fingerprint}/{stage}"

    @contextmanager
    def timed(self, stage: str) -> Iterator[None]:
        """Add the wall time of the block to ``timings[stage]``."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.timings[stage] = self.timings.get(stage, 0.0) + time.perf_counter() - t0

    # ------------------------------------------------------------------ candidates
    def write(self, candidate: stages.Candidate) -> None:
        """Write a candidate's weights into the live model."""
        live = self.live
        if isinstance(candidate, stages.BaseWeights):
            live.apply_base()
        elif isinstance(candidate, stages.CheckpointWeights):
            live.load_checkpoint(candidate.path)
        elif isinstance(candidate, (stages.Combination, stages.MethodMerge)):
            if [Path(p) for p in live.model_paths] != list(candidate.models):
                live.set_models(list(candidate.models))
            if isinstance(candidate, stages.Combination):
                live.apply(candidate.coeffs)
            else:
                kwargs = {key: (list(v) if isinstance(v, tuple) else v) for key, v in candidate.kwargs}
                live.apply_method(candidate.method, seed=candidate.seed, **kwargs)
        else:
            raise TypeError(f"not a candidate: {candidate!r}")

    def search_items(self) -> dict[str, list[int]] | None:
        """Each task's search items (ids in its dev split), or ``None`` when the evaluator cannot score chosen items."""
        if self.dev_split is not None:
            return self.dev_split.search
        from exme.evaluate import capabilities_of

        counts = getattr(self.evaluator, "counts", None)
        if callable(counts) and capabilities_of(self.evaluator).subset:
            return {t: list(range(n)) for t, n in counts()["dev"].items()}
        return None

    def evaluation_key(self, point: Point, candidate: stages.Candidate) -> str:
        """What one evaluation *is*: the model (:func:`~exme.pipeline.stages.candidate_key`) and the items scored.

        Two points with the same key are one evaluation, whatever stage or parameter names they
        come from. A limit that covers every item of every task is a full evaluation.
        """
        limit = point.limit
        if limit is not None and point.split == "dev":
            items = self.search_item_ids
            if items and limit >= max(len(v) for v in items.values()):
                limit = None
        doc: dict[str, Any] = {"model": stages.candidate_key(candidate), "split": point.split, "limit": limit}
        if point.chunk is not None:
            doc["chunk"] = list(point.chunk)
        return json.dumps(doc, sort_keys=True)

    def _earlier(self, key: str) -> Record | None:
        """The recorded evaluation of ``key`` in this run, or ``None`` once this worker holds the claim to make it.

        While another live worker holds the claim this waits for its record, so an equal model is
        scored once across workers as well as across stages and resumes.
        """
        prefix = self.study_name("")
        while True:
            rec = self.store.find_model(prefix, key)
            if rec is not None:
                return rec
            if self.store.claim(self.study_name("models"), key):
                return self.store.find_model(prefix, key)  # finished just before its owner died
            time.sleep(self.store.poll_s)

    def _score(self, point: Point, candidate: stages.Candidate) -> Any:
        key = self.evaluation_key(point, candidate)
        earlier = self._earlier(key)
        if earlier is not None:  # the same model on the same items: read its scores back
            self.shared += 1
            if self.config.log_samples and point.split == "test" and "row" in earlier.params:
                self._copy_samples(str(earlier.params["row"]), str(point.params["row"]))
            return {"overall": earlier.overall, "tasks": earlier.tasks, "n_items": earlier.n_items,
                    "per_item": earlier.per_item, "generation": earlier.generation, "failed": earlier.failed,
                    "model": key, "shared": True}
        self.evaluated += 1
        t0 = time.perf_counter()
        self.inputs_unchanged()  # before reading: never a candidate made of a changed file
        scores = self._evaluate(point, candidate, key)
        self.inputs_unchanged()  # and after: a file replaced during the evaluation is never recorded
        out = {**scores_dict(scores), "model": key}
        if self.costs is not None:
            self.costs.add(out, time.perf_counter() - t0)
        return out

    def _evaluate(self, point: Point, candidate: stages.Candidate, key: str = "") -> Any:
        from exme.search.live import NonFiniteCandidate

        plan = self._incremental(point, key) if key else None
        if plan is not None and not any(plan[1].values()):  # every item held already: no write, no scoring
            return plan[0]({"tasks": {}, "n_items": {}, "per_item": {}, "generation": {}}, 0)
        try:
            self.write(candidate)
        except NonFiniteCandidate as err:  # recorded as failed: never chosen, flagged in the report
            self.notes.append(f"candidate {point.params} could not be scored: {err}")
            return failed_scores(str(err))
        if plan is not None:
            finish, todo = plan
            fresh = scores_dict(self.evaluator.evaluate(self.target(), self.tokenizer, "dev", items=todo))
            return finish(fresh, sum(len(v) for v in todo.values()))
        if point.chunk is not None:  # a race's chunk: the same positions of each task's search items
            # A task with no item in the chunk gets an empty list: not scored (absent from the scores).
            items = self._window(point) or {}
            return self.evaluator.evaluate(self.target(), self.tokenizer, "dev",
                                           items={t: [int(i) for i in ids] for t, ids in items.items()})
        if self.dev_split is not None and point.split in ("dev", "confirm"):
            # "dev" points are scored on the search part only; "confirm" on the held-out part.
            items = self.dev_split.search if point.split == "dev" else self.dev_split.confirm
            return self.evaluator.evaluate(self.target(), self.tokenizer, "dev", limit=point.limit, items=items)
        if self.config.log_samples and point.split == "test":
            return self._score_logged(point)
        return self.evaluator.evaluate(self.target(), self.tokenizer, point.split, limit=point.limit)

    def _window(self, point: Point) -> dict[str, list[str]] | None:
        """The search item ids a point on the search split scores, per task (``None``: not such a point,
        or the evaluator cannot score chosen items). Prefix (``limit``), chunk and full evaluations are
        all windows of the same item lists, which is what lets them share items."""
        if point.split != "dev" or not self.search_item_ids:
            return None
        if point.chunk is not None:
            start, stop = point.chunk
            return {t: [str(i) for i in ids[start:stop]] for t, ids in self.search_item_ids.items()}
        return {t: [str(i) for i in ids[:point.limit]] for t, ids in self.search_item_ids.items()}

    def _incremental(self, point: Point, key: str) -> tuple[Callable[[dict[str, Any], int], dict[str, Any]],
                                                          dict[str, list[int]]] | None:
        """How to score only the items of the point's window that no earlier evaluation of the same model
        holds (:mod:`exme.search.partial`): ``(finish, todo)``, where ``todo`` are the item ids per task
        left to score and ``finish(fresh scores, items scored)`` joins them with the earlier ones into
        the window's scores. ``None`` when nothing earlier lies inside the window (or the evaluator's
        tasks do not say they join): the window is scored whole. Planned before the candidate is written,
        so a window that earlier evaluations hold entirely (a race's chunk of a model scored in full, as
        the EXPO points are at β = 0 and 1) costs no write into the model."""
        from exme.search.partial import join, plan, restricted

        window = self._window(point)
        if window is None:
            return None
        if self._joinable is None or not self._joinable[0]:
            return None
        joinable, weights = self._joinable
        model = json.loads(key)["model"]
        earlier = []
        for rec in self.store.run_records(self.study_name("")):
            doc = json.loads(rec.model) if rec.model else None
            if doc is not None and doc.get("split") == "dev" and doc.get("model") == model:
                earlier.append(rec)
        whole = restricted(window, earlier, joinable)  # e.g. a race's chunk of a model scored in full before
        if whole is not None:
            pieces, missing = [whole], {t: [] if t in joinable else list(ids) for t, ids in window.items()}
        else:
            pieces, missing = plan(window, earlier, joinable)
        if not pieces:
            return None
        todo = {t: [int(i) for i in missing.get(t, [])] for t in weights}  # tasks with nothing left: skipped

        def finish(fresh: dict[str, Any], scored: int) -> dict[str, Any]:
            return {**join(window, pieces, fresh, joinable, weights), "scored": scored}

        return finish, todo

    def item_counts(self) -> dict[str, int | None]:
        """Items of one evaluation per purpose (search, confirm, test); ``None`` where the evaluator does not say."""
        counts = getattr(self.evaluator, "counts", None)
        test = sum(counts()["test"].values()) if callable(counts) else None
        return {"search": sum(len(v) for v in self.search_item_ids.values()) if self.search_item_ids else None,
                "confirm": sum(len(v) for v in self.dev_split.confirm.values()) if self.dev_split is not None else 0,
                "test": test}

    def evaluation_summary(self) -> dict[str, Any]:
        """Evaluations run, candidates that read an equal model's score, items per purpose: over the
        whole run (every worker, every resume), read from the studies."""
        records = self.store.run_records(self.study_name(""))
        fresh = [r for r in records if not r.shared and not r.extra.get("reused")]
        items = {"search": 0, "confirm": 0, "test": 0}
        for r in fresh:
            items["search" if r.split == "dev" else r.split] = items.get("search" if r.split == "dev" else r.split, 0) + r.fresh_items
        return {"evaluations": len(fresh), "shared": sum(r.shared for r in records), "items": items}

    def _score_logged(self, point: Point) -> Any:
        """A final-table row scored on test with its items kept and written as JSONL (the samples file).

        Written when the row is evaluated, so the file and the recorded score come from one evaluation;
        :func:`~exme.evaluate.run.write_samples` moves the items out of the scores, so the study does
        not store them.
        """
        from exme.evaluate.run import write_samples

        scores = self.evaluator.evaluate(self.target(), self.tokenizer, "test", limit=point.limit, keep_items=True)
        write_samples(self.evaluator.suite, "test", scores, self.samples_path(str(point.params["row"])))
        return scores

    def _copy_samples(self, source: str, row: str) -> None:
        """A row equal to one already scored gets that row's samples file (the same model's test items)."""
        import shutil

        src, dst = self.samples_path(source), self.samples_path(row)
        if src.is_file() and src != dst:
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)

    def note_missing_samples(self, rows: Sequence[FinalRow]) -> None:
        """A row read back from the study keeps the samples file its evaluation wrote; say which are missing."""
        if not self.config.log_samples:
            return
        missing = [r.name for r in rows if not r.failed and not self.samples_path(r.name).is_file()]
        if missing:
            self.notes.append(
                f"log_samples: no samples file for {', '.join(missing)}: their test scores were read back from the "
                f"study, evaluated before log_samples was on (or the file was removed); a new output folder "
                f"evaluates them again with their samples"
            )

    def target(self):
        """What the evaluator scores: the live module (backend hf) or the engine serving its candidate (vllm)."""
        if self._target is None:
            from exme.evaluate.backends import LiveTarget

            c = self.config
            self._target = LiveTarget(
                c.backend, lambda: self.live, model_path=c.base, device=c.device, dtype=c.dtype, seed=c.seed,
                tokenizer_path=getattr(self.tokenizer, "name_or_path", None) or None, **c.engine_options(),
                engine=self._engine if self.live is not None else None,
            )
        return self._target()

    # ------------------------------------------------------------------ Evaluations
    def points(self, stage: str, label: str, points: Sequence[Point],
               candidate: Callable[[Point], stages.Candidate]) -> list[Record]:
        bar = self.bars.stage(label, len(points), show_best=points[0].split == "dev")

        def on_result(point: Point, rec: Record, reused: bool) -> None:
            self.reused += int(reused)
            bar(point, rec, reused)

        return self.store.evaluate(
            self.study_name(stage), points, lambda p: self._score(p, candidate(p)), on_result=on_result
        )

    def search(self, stage: str, label: str, params: list[dict[str, Any]],
               candidate: Callable[[Point], stages.Candidate], strategy: Any) -> Any:
        """Run a search strategy (:mod:`exme.search.strategy`) over ``params`` on the stage's study.

        The strategy decides which points to score and on how many items; each call of its
        ``evaluate`` goes through the study (recorded, claimed across workers, read back when
        finished before or when an equal model was scored). One bar step per point of the space.
        """
        if isinstance(strategy, _GridChoice):
            label += strategy.suffix(len(params))
        budget = getattr(strategy, "budget", None)  # a strategy that may add points (refine) says how many at most
        bar = self.bars.stage(label, budget(len(params)) if budget is not None else len(params))
        seen: set[str] = set()

        def on_result(point: Point, rec: Record, reused: bool) -> None:
            self.reused += int(reused)
            key = json.dumps(point.params, sort_keys=True)
            bar(point, rec, reused, 0 if key in seen else 1)  # one step per candidate, the best on every result
            seen.add(key)

        def evaluate(points: Sequence[Point]) -> list[Record]:
            return self.store.evaluate(self.study_name(stage), points, lambda p: self._score(p, candidate(p)),
                                       on_result=on_result)

        return strategy.run(params, evaluate)

    def grid(self, stage: str, label: str, params: list[dict[str, Any]],
             candidate: Callable[[Point], stages.Candidate], *, prune: bool) -> tuple[list[Record], list[Record]]:
        out = self.search(stage, label, params, candidate, self.grid_strategy(stage, label, prune=prune))
        return out.records, out.dropped

    def grid_strategy(self, stage: str, label: str, *, prune: bool) -> Any:
        """The strategy :meth:`grid` runs (a race for the best place with ``search.race_grids``, successive
        halving with ``prune``, else every point), for a stage that runs it inside another strategy
        (:class:`exme.search.refine.Refine`). Its notes go to the run's notes under ``label`` as it runs."""
        return _GridChoice(self, stage, label, prune)

    def _grid_kind(self, n_points: int, prune: bool) -> str:
        """How a grid of ``n_points`` is scored: ``race`` (for the best place), ``prune`` (successive
        halving) or ``grid`` (every point on every item). One decision for the run and the bar's label."""
        if n_points <= 1:
            return "grid"
        if self.config.search.grids_race and self.search_item_ids:
            return "race"
        return "prune" if prune else "grid"

    def _run_grid(self, stage: str, label: str, params: Sequence[dict[str, Any]], evaluate: Any, prune: bool) -> Any:
        from exme.search.strategy import Grid, Halving, Outcome

        s = self.config.search
        kind = self._grid_kind(len(params), prune)
        if kind == "race":  # race the points for the best place (k = 1)
            from exme.search.racing import Race

            chunks = self.race_chunks(s.race_chunk) or []
            out = Race(1, chunks, s.race_error_rate, self.task_weights()).run(params, evaluate)
            self.notes += [f"{label}: {n}" for n in out.notes]
            return Outcome(out.records, out.dropped)
        if kind == "grid":
            return Grid().run(params, evaluate)
        items = self.search_item_ids
        strategy = Halving(s.prune_min_items, s.prune_eta, max(len(v) for v in items.values()) if items else None)
        out = strategy.run(params, evaluate)
        self._note_pruning(stage, label, list(params), out.records, out.dropped)
        return out

    def sample(self, stage: str, label: str, candidate: Callable[[Point], stages.Candidate], strategy: Any) -> Any:
        """Run a sampled strategy (:mod:`exme.search.sampled`: TPE, CMA-ES) on the stage's study: it asks for
        points and tells their scores through the study's trials (recorded, resumed, shared across workers)."""
        bar = self.bars.stage(label, strategy.n_trials)

        def on_result(point: Point, rec: Record, reused: bool) -> None:
            self.reused += int(reused)
            bar(point, rec, reused)

        return strategy.run(self.store.trials(self.study_name(stage), lambda p: self._score(p, candidate(p)),
                                              on_result=on_result))

    def race_chunks(self, chunk: int) -> list[tuple[int, int]] | None:
        from exme.search.racing import chunk_bounds

        if not self.search_item_ids:
            return None
        return chunk_bounds(max(len(v) for v in self.search_item_ids.values()), chunk)

    def task_weights(self) -> dict[str, float]:
        return task_weights(self.suite(), list(self.search_item_ids or {}))

    def _note_pruning(self, stage: str, label: str, params: list[dict[str, Any]], full: list[Record], dropped: list[Record]) -> None:
        """How many items successive halving scored, against scoring every point in full."""
        study = self.store.study(self.study_name(stage))
        spent = 0
        keys = {json.dumps(p, sort_keys=True) for p in params}
        for rec in self.store.records(study).values():
            if json.dumps(rec.params, sort_keys=True) in keys and not rec.shared:
                spent += rec.fresh_items
        per_full = max((r.total_items for r in full), default=0)
        unpruned = per_full * len(params)
        if unpruned:
            saved = 1 - spent / unpruned
            self.notes.append(
                f"{label}: successive halving scored {spent} items where the full grid needs {unpruned} "
                f"({100 * saved:.0f}% saved; {len(dropped)} of {len(params)} candidates dropped early)"
            )

    # ------------------------------------------------------------------ persisting
    def write_final_model(self, spec: dict[str, Any]) -> Path:
        """Write θ* with the streaming merge engine into ``<output>/model`` (once across workers)."""
        from exme.merge.config import MergeConfig
        from exme.merge.engine import run_merge

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
        if target.is_dir() and marker.is_file() and json.loads(marker.read_text()) == spec:
            self.store.release(self.study_name("final-model"), key)  # written by a worker that just finished
            return target
        from exme.io.writer import write_faults

        marker.unlink(missing_ok=True)
        self.inputs_unchanged()
        with self.timed("final model"):
            out = run_merge(config, target, device=self.config.device, force=True, seed=self.config.seed,
                            progress=self.progress)
        self.inputs_unchanged()  # every tensor streamed came from the checked files
        with write_faults(marker):
            marker.write_text(json.dumps(spec, indent=2))
        self.store.release(self.study_name("final-model"), key)
        return Path(out)

    def suite(self) -> dict[str, Any]:
        """What results.json records about the suite (the evaluator's own description when it has one)."""
        describe = getattr(self.evaluator, "describe", None)
        return {"spec": self.config.suite, **(describe() if callable(describe) else {})}

    def results(self, **parts: Any) -> RunResults:
        from exme.threads import current_threads

        return RunResults(
            threads=current_threads(),
            dev_split=self.dev_split.describe() if self.dev_split is not None else {"confirm_fraction": 0.0},
            exme_version=_version(),
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            config=json.loads(self.config.model_dump_json()),
            suite=self.suite(),
            timings=dict(self.timings),
            notes=list(self.notes),
            **parts,
        )


def rank_checkpoints(config: PipelineConfig, *, progress: bool = True, evaluator: Any = None) -> list[RankedCheckpoint]:
    """Stage 1 alone (``exme rank``): every checkpoint scored on dev, recorded in the run's study."""
    runner = Runner(config, progress=progress, evaluator=evaluator)
    try:
        runner.check_output(write_model=False)
        runner.preflight()
        with runner.bars.active(), runner.timed("rank"):
            return stages.rank(runner, runner.checkpoints, runner.names, config.top_k, config.search).ranking
    finally:
        runner.close()


def run_pipeline(config: PipelineConfig, *, progress: bool = True, evaluator: Any = None,
                 write_model: bool = True, report: bool = True) -> RunResults:
    """Run every stage and write the run folder (``results.json``, ``report.md``, plots, ``model/``).

    Safe to call again on the same output after an interruption: finished evaluations are read
    back from the study, never repeated. ``write_model=False`` skips the final model and
    ``report=False`` the report (``exme report`` can render it later from ``results.json``).
    """
    runner = Runner(config, progress=progress, evaluator=evaluator)
    out = Path(config.output)
    try:
        from exme.search.cost import CostProjection, pipeline_plan

        runner.check_output(write_model=write_model)
        with runner.timed("preflight"):
            runner.preflight()
        with runner.bars.active():
            costs = runner.costs = CostProjection(
                pipeline_plan(config, len(runner.checkpoints), runner.item_counts()),
                runner.bars.display.print if progress else (lambda line: None),
            )
            with runner.timed("rank"):
                ranked = stages.rank(runner, runner.checkpoints, runner.names, config.top_k, config.search)
            costs.stage_done("rank")
            runner.notes.extend(ranked.notes)
            _save(runner.results(ranking=ranked.ranking), out)
            with runner.timed("extrapolate"):
                extrapolated = stages.extrapolate(runner, ranked, config)
            costs.stage_done("extrapolate")
            runner.notes.extend(extrapolated.notes)
            with runner.timed("merge"):
                merged = stages.merge(runner, ranked, extrapolated, config)
            costs.stage_done("merge")
            runner.notes.extend(merged.notes)
            module = None
            if runner.group_rule is not None:
                with runner.timed("per-module α"):
                    module = stages.per_module(runner, ranked, merged, config, runner.group_rule)
                runner.notes.append(
                    f"α per {config.alpha.granularity} group ({len(runner.group_rule.groups)} groups × {len(ranked.kept)} "
                    f"checkpoints): {len(module.search.trials)} {sampled_strategies()[config.alpha.sampler].title} trials on the search split, the first the global optimum"
                )
                few = cmaes_generation_note(config.alpha.sampler, config.alpha.n_trials,
                                            len(runner.group_rule.groups) * len(ranked.kept))
                if few:
                    runner.notes.append(few)
            with runner.timed("baselines"):
                baselined = stages.baselines(runner, ranked, config)
            costs.stage_done("baselines")
            chosen = stages.chosen_models(ranked, extrapolated, merged, baselined, config.seed, module)
            with runner.timed("test"):
                tested = stages.test(runner, chosen)
            costs.stage_done("test")
            rows = tested.rows
            runner.note_missing_samples(rows)
            with runner.timed("rescore"):
                rescored = _rescore(runner, chosen, rows)
            if runner.dev_split is not None:
                with runner.timed("confirm"):
                    confirmed = stages.confirm(runner, chosen)
                costs.stage_done("confirm")
                rows = [r.model_copy(update={"confirm": stages.split_scores(rec)}) for r, rec in zip(rows, confirmed)]
        rows = _flag_collapsed(rows, config.collapse.margin)
        weights = task_weights(runner.suite(), list(rows[0].test.tasks) if rows else [])
        comparisons = verdict.compare(rows, weights, split="test", n_resamples=config.stats.bootstrap, seed=config.seed)
        if runner.dev_split is not None:
            comparisons += verdict.compare(rows, weights, split="confirm", n_resamples=config.stats.bootstrap, seed=config.seed)
        if rows and not any(c.split == "test" for c in comparisons):
            runner.notes.append("paired comparisons not available: the evaluator gives no per-item scores, "
                                "so only the scores' difference (and a binomial noise estimate where it applies) is shown")
        parts: dict[str, Any] = dict(
            ranking=ranked.ranking, alpha_search=[c.search for c in extrapolated.choices],
            beta_search=merged.beta_search, joint_search=merged.joint_search,
            baseline_search=baselined.searches, final=rows, comparisons=comparisons,
            module_search=module.search if module is not None else None,
            collapse={"margin": config.collapse.margin, "stop_on_collapse": config.alpha.stop_on_collapse,
                      "flagged": [r.name for r in rows if r.collapsed],
                      "evaluations_saved": sum(c.saved for c in extrapolated.choices)},
            rescore=rescored,
        )
        _save(runner.results(**parts), out)
        final_name = "ExMe" if module is None else stages.MODULE_ROW
        if write_model:
            out_dtype = str(runner.live.dtype).removeprefix("torch.")
            final = stages.Combination(tuple(ranked.kept), merged.coefficients if module is None else module.coefficients)
            mergekit = stages.mergekit_spec(config.base, ranked.kept, final.coeffs, out_dtype)
            # Global ExMe is written from its `exme` spec; per-group coefficients from merge.yaml itself
            # (task_arithmetic with filter lists), so the folder is what `exme merge merge.yaml` makes.
            spec = stages.final_model_spec(ranked, merged, config, out_dtype) if module is None else mergekit
            parts["final_model"] = str(runner.write_final_model(spec))
            (out / "merge.yaml").write_text(
                "# The final model in mergekit syntax: `exme merge merge.yaml OUT` or `mergekit-yaml merge.yaml OUT`.\n"
                + yaml.safe_dump(mergekit, sort_keys=False))
        paths = {"base": str(config.base), final_name: parts.get("final_model")}
        paths.update({r.name: str(p) for r, p in zip([r for r in rows if r.kind == "sft"], ranked.kept)})
        parts["recommended"] = verdict.recommend(rows, comparisons, paths)
        runner.notes.append(
            f"this invocation evaluated {runner.evaluated} candidates"
            + (f"; {runner.shared} candidates were a model already scored and read its score back" if runner.shared else "")
            + (f"; {runner.reused} finished evaluations were read back from the study (resumed or shared run)" if runner.reused else "")
        )
        parts["evaluations"] = runner.evaluation_summary()
        if costs.first_line:
            runner.notes.append(f"{costs.first_line} (projected; {parts['evaluations']['evaluations']} evaluations ran)")
        results = runner.results(**parts)
        _save(results, out)
        from exme.io.writer import write_faults

        # Only what was given (paths resolved): the file stays a valid PIPELINE.yaml to run again, and
        # results.json keeps the full configuration with every default.
        with write_faults(out / "pipeline.yaml"):
            (out / "pipeline.yaml").write_text(
                yaml.safe_dump(json.loads(config.model_dump_json(exclude_unset=True)), sort_keys=False)
            )
        if report:
            from exme.report import render

            with write_faults(out / "report.md", "writing the report"):
                render(results, out)
        return results
    finally:
        runner.close()

@dataclass(frozen=True)
class _GridChoice:
    """:meth:`Runner.grid`'s choice of strategy as one strategy object, decided when it runs (on how many
    points it is given), its notes added to the run's notes under ``label``."""

    runner: Runner
    stage: str
    label: str
    prune: bool

    def run(self, params: Sequence[dict[str, Any]], evaluate: Any) -> Any:
        return self.runner._run_grid(self.stage, self.label, params, evaluate, self.prune)

    def suffix(self, n_points: int) -> str:
        """What the progress bar adds to the label: how the grid is cut short, if it is."""
        return {"race": " (raced)", "prune": " (pruned)", "grid": ""}[self.runner._grid_kind(n_points, self.prune)]


# ---------------------------------------------------------------------- helpers
def _save(results: RunResults, out: Path) -> None:
    """results.json, with a disk fault as one line (the evaluations stay in the study)."""
    from exme.io.writer import write_faults

    with write_faults(out / "results.json"):
        save_results(results, out)


def _rescore(runner: Runner, chosen: Sequence[stages.Chosen], rows: Sequence[FinalRow]) -> dict[str, Any] | None:
    """The ExMe row's test items re-scored on a seeded sample in another batch composition
    (:mod:`exme.evaluate.determinism`): how many change, the noise floor under the paired intervals."""
    config = runner.config
    n = config.rescore_items
    pick = next(((c, r) for c, r in zip(chosen, rows) if r.kind == "exme" and not r.failed and r.test.per_item), None)
    from exme.evaluate import capabilities_of

    if not n or pick is None or not capabilities_of(runner.evaluator).subset:
        return None
    from exme.evaluate.determinism import rescore_sample

    candidate, row = pick
    runner.write(candidate.candidate)
    result = rescore_sample(
        runner.evaluator, runner.target(), runner.tokenizer, {t: dict(v) for t, v in row.test.per_item.items()},
        model=row.name, n=n, seed=config.seed, backend=config.backend,
        batch_invariant=bool(config.engine_options().get("batch_invariant", False)),
    )
    return result.model_dump()


def _flag_collapsed(rows: list[FinalRow], margin: float) -> list[FinalRow]:
    flagged = verdict.collapse_flags(rows, margin)
    return [r.model_copy(update={"collapsed": True}) if r.name in flagged else r for r in rows]


def _fingerprint(config: PipelineConfig, split: stages.DevSplit | None = None) -> str:
    """What the recorded evaluations depend on: base, suite (and its file's bytes), dtype, seed, the
    confirm share of dev (the items a "dev" evaluation scores), and the evaluation engine when it is
    not the default one (vLLM's kernels round differently from transformers', so a run moved to
    another backend re-evaluates instead of mixing the two engines' scores)."""
    suite = config.suite
    suite_bytes = ""
    if Path(suite).is_file():
        suite_bytes = hashlib.sha256(Path(suite).read_bytes()).hexdigest()
    parts: dict[str, Any] = {"base": str(Path(config.base).resolve()), "suite": suite, "suite_sha": suite_bytes,
                             "dtype": config.dtype, "seed": config.seed}
    if split is not None:
        parts["confirm_fraction"] = split.confirm_fraction
    if config.backend != "hf":  # absent for hf, so existing hf studies keep their names
        parts["backend"] = config.backend
        if config.engine_options().get("batch_invariant"):  # other kernels, other roundings
            parts["batch_invariant"] = True
    text = json.dumps(parts, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _unique_names(paths: Sequence[Path]) -> list[str]:
    names = [p.name for p in paths]
    if len(set(names)) == len(names):
        return names
    return [f"{p.parent.name}/{p.name}" if names.count(p.name) > 1 else p.name for p in paths]


