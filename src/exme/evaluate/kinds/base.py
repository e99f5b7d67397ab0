"""What a task kind is: the one place that says how a kind of benchmark item is read, prompted and scored.

A suite names a kind per task (``kind: gsm8k``); everything that differs between kinds lives on
its :class:`TaskKind` object, found by name in :data:`exme.evaluate.kinds.REGISTRY`. Suite
validation, prompt building and the suite evaluator only look a kind up and call it, so a new
kind is one file here and one ``register_kind`` call, with no change to the evaluator.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:  # only for hints: the suite module imports this package
    from exme.evaluate.backends import Backend
    from exme.evaluate.suite import Task, TaskSpec

Bar = Callable[[int], None] | None


@dataclass(frozen=True)
class ScoringContext:
    """What a kind may use while scoring besides the engine: sandbox workers and progress bars.

    ``bar(total, label)`` starts a progress bar and returns its advance callback (``None`` when the
    evaluation is quiet), so a kind shows progress without knowing how it is displayed.
    """

    workers: int = 2
    bar: Callable[[int, str], Bar] = lambda total, label: None


class TaskKind:
    """One kind of task. Subclasses set the class attributes and override what differs.

    ``generative``: the engine generates a completion per item (``True``) or scores given text by
    its log-likelihood (``False``). ``required``: fields every record must hold (checked when the
    suite loads, with file and line). ``metrics``: what it can report, the first being the default
    ``metric``. ``prompt`` / ``target``: default ``str.format`` templates of the question and of a
    few-shot answer; ``chat_prompt``: the question's template under a chat template, when it
    differs (an instruction a chat model needs). ``stop``: default stop strings; ``chat_stop``: those under a chat template when
    they differ. ``fewshot``: whether few-shot examples apply. ``own_keys``: task keys that only
    kinds declaring them read (given for another kind, they are an error rather than ignored).
    """

    name: ClassVar[str]
    required: ClassVar[tuple[str, ...]] = ()
    metrics: ClassVar[tuple[str, ...]]
    generative: ClassVar[bool] = True
    prompt: ClassVar[str] = "{prompt}"
    chat_prompt: ClassVar[str | None] = None
    target: ClassVar[str] = ""
    stop: ClassVar[tuple[str, ...]] = ()
    chat_stop: ClassVar[tuple[str, ...] | None] = None
    fewshot: ClassVar[bool] = True
    own_keys: ClassVar[tuple[str, ...]] = ()
    #: Each item's score depends on that item alone, so the task's score on a set of items is the mean
    #: of the item scores of any partition of it: evaluations of disjoint item windows join exactly
    #: (a pipeline then scores only the items a partial evaluation has not). False where an item's
    #: score is normalised over the items scored with it (perplexity's share of the pooled tokens).
    items_independent: ClassVar[bool] = True

    # -- records --

    def required_fields(self, spec: "TaskSpec") -> tuple[str, ...]:
        """Fields every record of ``spec``'s task must have."""
        return self.required

    def read_text(self, path: Path, spec: "TaskSpec", limit: int | None) -> list[dict[str, Any]] | None:
        """Records of a data file that is not JSONL, or ``None`` to read it as JSONL (the default)."""
        return None

    def check_record(self, record: dict[str, Any], where: str) -> None:
        """Kind-specific checks of one record, normalising it in place; ``where`` names it in messages."""

    # -- prompts --

    def fields(self, record: dict[str, Any]) -> dict[str, Any]:
        """The record's fields plus the derived ones its templates may use."""
        return dict(record)

    def prompt_text(self, task: "Task", record: dict[str, Any], tokenizer) -> tuple[str, bool]:
        """The full prompt of one record and whether a chat template wrote it (few-shot blocks or turns)."""
        from exme.evaluate.prompts import prompt_text

        return prompt_text(task, record, tokenizer)

    def stop_strings(self, task: "Task") -> list[str]:
        """The task's own stop strings, else the kind's defaults (``chat_stop`` under a chat template)."""
        if task.spec.stop is not None:
            return list(task.spec.stop)
        if task.spec.chat_template and self.chat_stop is not None:
            return list(self.chat_stop)
        return list(self.stop)

    # -- scoring --

    def prepare(self, task: "Task", records: list[dict[str, Any]], tokenizer) -> dict[str, Any]:
        """Everything scoring needs that does not depend on the weights (cached by the evaluator)."""
        raise NotImplementedError

    def score(
        self, task: "Task", prep: dict[str, Any], n: int, engine: "Backend", ctx: ScoringContext
    ) -> tuple[dict[str, float], list[dict[str, Any]], dict[str, Any] | None]:
        """(metrics, one record per item, generation statistics or ``None``) of the first ``n`` items."""
        raise NotImplementedError

    def item_scores(self, task: "Task", items: list[dict[str, Any]]) -> list[float]:
        """Each item's primary score, so that their mean is the task's score under ``task.spec.metric``."""
        raise NotImplementedError


class GenerativeKind(TaskKind):
    """A kind whose items are answered by greedy generation and scored from the completion."""

    generative = True

    def prepare(self, task: "Task", records: list[dict[str, Any]], tokenizer) -> dict[str, Any]:
        from exme.evaluate.prompts import encode

        texts = [self.prompt_text(task, r, tokenizer) for r in records]
        return {
            "records": records,
            "texts": [t for t, _ in texts],
            "ids": [encode(tokenizer, t, from_chat_template=c) for t, c in texts],
        }

    def score(self, task, prep, n, engine, ctx):
        from exme.evaluate.backends import generation_stats

        rows = engine.generate(
            prep["ids"][:n],
            max_new_tokens=task.spec.max_new_tokens,
            stop=self.stop_strings(task),
            progress=ctx.bar(n, f"{task.name}: generating"),
        )
        completions = [r.text for r in rows]
        metrics, items = self.score_completions(task, prep, completions, prep["records"][:n], ctx)
        for item, row in zip(items, rows):
            item.update(new_tokens=row.new_tokens, finish=row.finish)
        return metrics, items, generation_stats(rows, task.spec.max_new_tokens)

    def score_completions(
        self, task: "Task", prep: dict[str, Any], completions: list[str], records: list[dict[str, Any]],
        ctx: ScoringContext,
    ) -> tuple[dict[str, float], list[dict[str, Any]]]:
        """(metrics, one record per item) of the completions against their records."""
        raise NotImplementedError

    def item_scores(self, task, items):
        return [float(bool(it["correct"])) for it in items]


def mean(values: Sequence[Any]) -> float:
    """Share of true values (NaN when there are none)."""
    values = list(values)
    return float(sum(bool(v) for v in values) / len(values)) if values else float("nan")
