"""Evaluators: score a live model on a split. The suite evaluator runs the registered task kinds.

The model is whatever object the caller holds; its weights may change between calls (a search
writes candidates into it in place), so only tokenization and prompt text are cached, keyed by
task, split and tokenizer, which is what makes the dozens of evaluations of one run cheap.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from exme.errors import ExmeError
from exme.evaluate.backends import as_backend
from exme.evaluate.kinds import ScoringContext
from exme.evaluate.scores import Scores
from exme.evaluate.suite import SPLITS, Suite, Task


@dataclass(frozen=True)
class Capabilities:
    """What an evaluator can do beyond ``evaluate(model, tokenizer, split, limit=None)``, declared by it.

    ``subset``: it has ``counts()`` (items per task per split) and ``evaluate(..., items={task:
    [ids]})`` scores just those items of a split, which is what a pipeline needs to hold part of dev
    out as a confirm split. ``item_records``: ``evaluate(..., keep_items=True)`` puts each item's
    record (output, prediction, score) in ``Scores.details[task]["items"]`` (``--log-samples``,
    ``--json``). Declared rather than guessed from a signature, so a wrapper that forwards
    ``**kwargs`` neither gains nor loses them by accident; an object that declares none has none.
    """

    subset: bool = False
    item_records: bool = False


NO_CAPABILITIES = Capabilities()


@runtime_checkable
class Evaluator(Protocol):
    """Anything that scores a live model on ``"dev"`` or ``"test"``; it may declare ``capabilities``."""

    def evaluate(self, model, tokenizer, split: str, limit: int | None = None) -> Scores: ...


def capabilities_of(evaluator: Any) -> Capabilities:
    """The capabilities ``evaluator`` declares (its ``capabilities`` attribute), none when it declares none."""
    caps = getattr(evaluator, "capabilities", None)
    return caps if isinstance(caps, Capabilities) else NO_CAPABILITIES


def check_split(split: str) -> str:
    """``dev``, ``test``, or ``all`` (every item: the number comparable with full-set results)."""
    if split not in (*SPLITS, "all"):
        raise ExmeError(f"split {split!r} is not one of {[*SPLITS, 'all']}")
    return split


class _Progress:
    """One progress display per evaluate call, one bar per task (:mod:`exme.progress`: an ETA on a
    terminal, a plain line every 10 s in a log); a no-op when disabled (a search calls evaluate
    many times and wants quiet)."""

    def __init__(self, enabled: bool):
        from exme.progress import Progress

        self.display = Progress(enabled, transient=True) if enabled else None
        if self.display is not None:
            self.display.__enter__()

    def bar(self, total: int, label: str):
        """A callback advancing a new bar of ``total`` steps (``None`` when disabled)."""
        if self.display is None or not total:
            return None
        bar = self.display.bar(label, total, min_interval=10.0)
        return lambda n: bar.advance(n)

    def close(self) -> None:
        if self.display is not None:
            self.display.stop()


class SuiteEvaluator:
    """Scores a model on every task of a :class:`Suite`.

    Options: ``batch_size`` (generation rows per batch), ``mc_batch_size`` (scored sequences per
    forward pass), ``workers`` (parallel sandboxed programs for code tasks), ``keep_items``
    (per-item records in ``Scores.details`` by default; one call can ask otherwise), ``progress``
    (rich bars). Each task's kind (:mod:`exme.evaluate.kinds`) prepares and scores its items.
    """

    capabilities = Capabilities(subset=True, item_records=True)

    def __init__(
        self,
        suite: Suite,
        *,
        batch_size: int = 16,
        mc_batch_size: int = 32,
        workers: int = 2,
        keep_items: bool = False,
        progress: bool = False,
    ):
        self.suite = suite
        self.batch_size = batch_size
        self.mc_batch_size = mc_batch_size
        self.workers = workers
        self.keep_items = keep_items
        self.progress = progress
        self._cache: dict[tuple[str, str], Any] = {}
        self._cache_tokenizer = None

    def describe(self) -> dict[str, Any]:
        """Suite name, tasks, weights, split rule and item counts, as recorded in results."""
        return self.suite.describe()

    def counts(self) -> dict[str, dict[str, int]]:
        return self.suite.counts()

    @property
    def split_rule(self) -> dict[str, Any]:
        return self.suite.split_rule

    def evaluate(self, model, tokenizer, split: str, limit: int | None = None,
                 items: dict[str, list[int]] | None = None, keep_items: bool | None = None) -> Scores:
        """Score ``model`` on ``split``; ``limit`` keeps the first ``limit`` items of each task's split.

        ``model`` is a ``transformers`` module or an evaluation :class:`~exme.evaluate.backends.Backend`.
        ``items`` restricts a task to those item ids (positions in the task's split, in the order
        given) before ``limit`` applies: how a pipeline scores the search and confirm parts of dev.
        Every item's primary score is returned in ``Scores.per_item`` under its id; ``keep_items``
        (default: the evaluator's setting) also returns each item's record in ``Scores.details``.
        """
        check_split(split)
        keep_items = self.keep_items if keep_items is None else keep_items
        if limit is not None and limit <= 0:
            raise ExmeError(f"limit must be a positive number of items, got {limit}")
        if tokenizer is not self._cache_tokenizer:
            self._cache.clear()
            self._cache_tokenizer = tokenizer
        # Build every prompt first so a template error surfaces before any model work.
        chosen = {t.name: list(range(len(t.records(split)))) for t in self.suite.tasks}
        chosen.update({name: [int(i) for i in ids] for name, ids in (items or {}).items() if name in chosen})
        # A task given an empty list of items is not scored at all (absent from the scores): how a
        # pipeline scores only the items a partial evaluation of the same model has not scored yet.
        skip = {name for name, ids in (items or {}).items() if name in chosen and not ids}
        prepared = [(task, self._prepared(task, split, tokenizer, chosen[task.name]))
                    for task in self.suite.tasks if task.name not in skip]
        engine = as_backend(model, tokenizer, batch_size=self.batch_size, mc_batch_size=self.mc_batch_size)
        was_training = getattr(model, "training", False)
        if was_training:
            model.eval()
        tasks: dict[str, float] = {}
        n_items: dict[str, int] = {}
        details: dict[str, dict[str, Any]] = {}
        per_item: dict[str, dict[str, float]] = {}
        progress = _Progress(self.progress)
        try:
            for task, prep in prepared:
                n = len(prep["records"]) if limit is None else min(limit, len(prep["records"]))
                metrics, scored, generation = self._score(task, prep, n, engine, progress)
                tasks[task.name] = metrics[task.spec.metric]
                n_items[task.name] = n
                details[task.name] = {"kind": task.kind, "metric": task.spec.metric, "metrics": metrics}
                per_item[task.name] = dict(zip(map(str, chosen[task.name][:n]), item_scores(task, scored)))
                if generation is not None:
                    details[task.name]["generation"] = generation
                if keep_items:
                    details[task.name]["items"] = scored
        finally:
            progress.close()
            if was_training:
                model.train()
        weights = {t.name: t.spec.weight for t in self.suite.tasks}
        return Scores.from_tasks(tasks, split=split, n_items=n_items, weights=weights, details=details,
                                 per_item=per_item)

    # -- preparation (cached: depends on the tokenizer and the data, never on the weights) --

    def _prepared(self, task: Task, split: str, tokenizer, ids: list[int] | None = None) -> dict[str, Any]:
        records = task.records(split)
        ids = list(range(len(records))) if ids is None else ids
        key = (task.name, split, tuple(ids))
        if key not in self._cache:
            self._cache[key] = self._prepare(task, [records[i] for i in ids], tokenizer)
        return self._cache[key]

    def _prepare(self, task: Task, records: list[dict[str, Any]], tokenizer) -> dict[str, Any]:
        return task.kind_def.prepare(task, records, tokenizer)

    # -- scoring (runs the model every time) --

    def _score(self, task: Task, prep: dict[str, Any], n: int, engine, progress: _Progress):
        """(metrics, per-item records, generation stats or None) of one task."""
        metrics, items, generation = task.kind_def.score(
            task, prep, n, engine, ScoringContext(workers=self.workers, bar=progress.bar))
        _label_items(items, prep, prep.get("records", [])[:n])
        return metrics, items, generation


_ID_FIELDS = ("id", "task_id", "ind", "doc_id")


def _label_items(items: list[dict[str, Any]], prep: dict[str, Any], records: list[dict[str, Any]]) -> None:
    """Each item's prompt as the model saw it, and its record's own id (``id``, ``task_id``, ...) when it has one."""
    texts = prep.get("texts") or [None] * len(records)
    for item, text, record in zip(items, texts, records):
        if text is not None:
            item["prompt"] = text
        key = next((f for f in _ID_FIELDS if f in record), None)
        if key is not None:
            item["id"] = record[key]


def item_scores(task: Task, items: list[dict[str, Any]]) -> list[float]:
    """Each item's primary score, so that their mean is the task's score (the task kind's rule).

    0/1 for accuracy-like metrics; for perplexity each document's share of the pooled score,
    ``−nllᵢ · n / Σ tokens``, whose mean is ``−Σ nll / Σ tokens`` (the task's neg_log_perplexity).
    """
    return task.kind_def.item_scores(task, items)
