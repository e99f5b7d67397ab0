"""Evaluators: score a live model on a split. The suite evaluator runs the built-in task kinds.

The model is whatever object the caller holds; its weights may change between calls (a search
writes candidates into it in place), so only tokenization and prompt text are cached, keyed by
task, split and tokenizer, which is what makes the dozens of evaluations of one run cheap.
"""

from __future__ import annotations

import math
import re
from typing import Any, Protocol, runtime_checkable

from exme.errors import ExmeError
from exme.evaluate import prompts
from exme.evaluate.extract import (
    normalize_text,
    score_gsm8k,
)
from exme.evaluate.backends import Backend, as_backend, generation_stats
from exme.evaluate.lm import Continuation
from exme.evaluate.scores import Scores
from exme.evaluate.suite import SPLITS, Suite, Task


@runtime_checkable
class Evaluator(Protocol):
    """Anything that scores a live model on ``"dev"`` or ``"test"``."""

    def evaluate(self, model, tokenizer, split: str, limit: int | None = None) -> Scores: ...


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
    (per-item records in ``Scores.details``), ``progress`` (rich bars).
    """

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
                 items: dict[str, list[int]] | None = None) -> Scores:
        """Score ``model`` on ``split``; ``limit`` keeps the first ``limit`` items of each task's split.

        ``model`` is a ``transformers`` module or an evaluation :class:`~exme.evaluate.backends.Backend`.
        ``items`` restricts a task to those item ids (positions in the task's split, in the order
        given) before ``limit`` applies: how a pipeline scores the search and confirm parts of dev.
        Every item's primary score is returned in ``Scores.per_item`` under its id.
        """
        check_split(split)
        if limit is not None and limit <= 0:
            raise ExmeError(f"limit must be a positive number of items, got {limit}")
        if tokenizer is not self._cache_tokenizer:
            self._cache.clear()
            self._cache_tokenizer = tokenizer
        # Build every prompt first so a template error surfaces before any model work.
        chosen = {t.name: list(range(len(t.records(split)))) for t in self.suite.tasks}
        chosen.update({name: [int(i) for i in ids] for name, ids in (items or {}).items() if name in chosen})
        prepared = [(task, self._prepared(task, split, tokenizer, chosen[task.name])) for task in self.suite.tasks]
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
                if self.keep_items:
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
        if task.kind == "perplexity":
            docs = [list(tokenizer(str(r[task.spec.text_field]), add_special_tokens=True)["input_ids"]) for r in records]
            n_bytes = [len(str(r[task.spec.text_field]).encode("utf-8")) for r in records]
            return {"records": records, "docs": docs, "bytes": n_bytes}
        texts = [prompts.prompt_text(task, r, tokenizer) for r in records]
        prep: dict[str, Any] = {"records": records, "texts": [t for t, _ in texts]}
        if task.kind == "multiple_choice":
            requests, spans, lengths = [], [], []
            for (text, chat), record in zip(texts, records):
                ctx = prompts.encode(tokenizer, text, from_chat_template=chat)
                start = len(requests)
                for choice in record["choices"]:
                    cont_text = " " + choice if not chat else choice
                    whole = prompts.encode(tokenizer, text + cont_text, from_chat_template=chat)
                    if whole[: len(ctx)] == ctx and len(whole) > len(ctx):
                        cont = whole[len(ctx) :]
                    else:  # the tokenizer merged across the boundary: encode the continuation alone
                        cont = list(tokenizer(cont_text, add_special_tokens=False)["input_ids"])
                    requests.append(Continuation(tuple(ctx), tuple(cont)))
                    lengths.append(len(choice))  # lm-eval's acc_norm: characters of the choice text
                spans.append((start, len(requests)))
            prep.update(requests=requests, spans=spans, choice_lengths=lengths)
        else:
            prep["ids"] = [prompts.encode(tokenizer, t, from_chat_template=c) for t, c in texts]
            if task.kind == "generate":
                prep["regex"] = re.compile(task.spec.regex) if task.spec.regex else None
        return prep

    # -- scoring (runs the model every time) --

    def _score(self, task: Task, prep: dict[str, Any], n: int, engine: Backend, progress: _Progress):
        """(metrics, per-item records, generation stats or None) of one task."""
        if task.kind == "multiple_choice":
            return (*self._score_mc(task, prep, n, engine, progress), None)
        if task.kind == "perplexity":
            return (*self._score_perplexity(task, prep, n, engine, progress), None)
        rows = engine.generate(
            prep["ids"][:n],
            max_new_tokens=task.spec.max_new_tokens,
            stop=prompts.stop_strings(task),
            progress=progress.bar(n, f"{task.name}: generating"),
        )
        generation = generation_stats(rows, task.spec.max_new_tokens)
        completions = [r.text for r in rows]
        records = prep["records"][:n]
        if task.kind == "gsm8k":
            scored = [score_gsm8k(c, str(r["answer"]), task.spec.answer_filter) for c, r in zip(completions, records)]
            preds, correct = [p for p, _ in scored], [ok for _, ok in scored]
            items = [{"completion": c, "prediction": p, "correct": ok} for c, p, ok in zip(completions, preds, correct)]
            metrics = {"exact_match": _mean(correct)}
        elif task.kind == "generate":
            metrics, items = _score_generate(prep["regex"], completions, records)
        else:
            from exme.evaluate.code import score_code

            metrics, items = score_code(
                task, records, completions, workers=self.workers, progress=progress.bar(n, f"{task.name}: running tests")
            )
        for item, row in zip(items, rows):
            item.update(new_tokens=row.new_tokens, finish=row.finish)
        _label_items(items, prep, records)
        return metrics, items, generation

    def _score_mc(self, task, prep, n, engine: Backend, progress: _Progress):
        spans = prep["spans"][:n]
        end = spans[-1][1] if spans else 0
        scored = engine.loglikelihood(prep["requests"][:end], progress=progress.bar(end, f"{task.name}: scoring choices"))
        acc, acc_norm, items = [], [], []
        for (start, stop), record in zip(spans, prep["records"][:n]):
            logps = [scored[i][0] for i in range(start, stop)]
            normed = [lp / max(1, prep["choice_lengths"][i]) for lp, i in zip(logps, range(start, stop))]
            pick = max(range(len(logps)), key=logps.__getitem__)
            pick_norm = max(range(len(normed)), key=normed.__getitem__)
            acc.append(pick == record["label"])
            acc_norm.append(pick_norm == record["label"])
            items.append({"loglik": logps, "prediction": pick, "prediction_norm": pick_norm, "label": record["label"]})
        _label_items(items, prep, prep["records"][:n])
        return {"acc": _mean(acc), "acc_norm": _mean(acc_norm)}, items

    def _score_perplexity(self, task, prep, n, engine: Backend, progress: _Progress):
        per_doc = engine.token_nll(prep["docs"][:n], progress=progress.bar(n, f"{task.name}: perplexity"))
        total_nll = sum(nll for nll, _ in per_doc)
        total_tokens = sum(k for _, k in per_doc)
        total_bytes = sum(prep["bytes"][:n])
        if total_tokens == 0:
            raise ExmeError(f"task {task.name!r}: the documents have no tokens to predict (each needs 2 or more)")
        mean_nll = total_nll / total_tokens
        metrics = {
            "neg_log_perplexity": -mean_nll,
            "perplexity": math.exp(mean_nll),
            "bits_per_byte": total_nll / math.log(2) / max(1, total_bytes),
            "tokens": float(total_tokens),
        }
        items = [{"nll": nll, "tokens": k} for nll, k in per_doc]
        return metrics, items


_ID_FIELDS = ("id", "task_id", "ind", "doc_id")


def _label_items(items: list[dict[str, Any]], prep: dict[str, Any], records: list[dict[str, Any]]) -> None:
    """Each item's prompt as the model saw it, and its record's own id (``id``, ``task_id``, ...) when it has one."""
    for item, text, record in zip(items, prep["texts"], records):
        item["prompt"] = text
        key = next((f for f in _ID_FIELDS if f in record), None)
        if key is not None:
            item["id"] = record[key]


def item_scores(task: Task, items: list[dict[str, Any]]) -> list[float]:
    """Each item's primary score, so that their mean is the task's score.

    0/1 for accuracy-like metrics; for perplexity each document's share of the pooled score,
    ``−nllᵢ · n / Σ tokens``, whose mean is ``−Σ nll / Σ tokens`` (the task's neg_log_perplexity).
    """
    metric = task.spec.metric
    if task.kind == "perplexity":
        total = sum(it["tokens"] for it in items)
        return [-float(it["nll"]) * len(items) / total if total else 0.0 for it in items]
    if task.kind == "multiple_choice":
        key = "prediction_norm" if metric == "acc_norm" else "prediction"
        return [float(it[key] == it["label"]) for it in items]
    if task.kind in ("humaneval", "mbpp"):
        return [float(it["status"] == "passed") for it in items]
    key = "contains" if metric == "contains" else "correct"
    return [float(bool(it[key])) for it in items]


def _pad_id(tokenizer) -> int:
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if value is not None:
            return int(value)
    return 0


def _mean(values) -> float:
    values = list(values)
    return float(sum(bool(v) for v in values) / len(values)) if values else float("nan")


def _score_generate(regex, completions: list[str], records: list[dict[str, Any]]):
    exact, contains, items = [], [], []
    for completion, record in zip(completions, records):
        targets = record["target"] if isinstance(record["target"], list) else [record["target"]]
        targets = [normalize_text(str(t)) for t in targets]
        answer = completion
        if regex is not None:
            match = regex.search(completion)
            answer = (match.group(1) if match.groups() else match.group(0)) if match else ""
        answer = normalize_text(answer)
        exact.append(answer in targets)
        contains.append(any(t and t in normalize_text(completion) for t in targets))
        items.append({"completion": completion, "prediction": answer, "correct": exact[-1], "contains": contains[-1]})
    return {"exact_match": _mean(exact), "contains": _mean(contains)}, items
