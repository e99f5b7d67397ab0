"""lm-evaluation-harness tasks scored on the live model (optional extra: ``pip install exme[lm-eval]``).

The live model object is wrapped in ``lm_eval``'s ``HFLM`` (never reloaded from disk), and each
task's evaluation documents are divided into dev and test by the same seeded permutation a suite
uses; ``simple_evaluate(samples=...)`` then scores exactly the documents of the asked split.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from exme.errors import ExmeError
from exme.evaluate.scores import Scores
from exme.evaluate.suite import SplitRule, split_indices

PREFERRED_METRICS = ("acc", "exact_match", "pass@1", "f1", "mcc", "bleu")


def _require_lm_eval():
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise ExmeError("lm-eval tasks need the optional extra: pip install 'exme[lm-eval]'") from None


def _leaf_tasks(task_dict: dict) -> dict[str, Any]:
    """Flatten lm-eval's (possibly nested, group → subtasks) task dict into name → Task."""
    leaves: dict[str, Any] = {}
    for key, value in task_dict.items():
        if isinstance(value, dict):
            leaves.update(_leaf_tasks(value))
        elif value is not None:
            leaves[key if isinstance(key, str) else getattr(value, "task_name", str(key))] = value
    return leaves


def primary_metric(metrics: dict[str, Any], preferred: str | None = None) -> tuple[str, float]:
    """(name, value) of the task's main score among lm-eval's ``"metric,filter"`` keys."""
    numeric = {
        k: float(v) for k, v in metrics.items() if "," in k and "_stderr" not in k and isinstance(v, (int, float))
    }
    names = ([preferred] if preferred else []) + list(PREFERRED_METRICS)
    for name in names:
        for key, value in numeric.items():
            if key.split(",")[0] == name:
                return name if key.endswith(",none") else key, value
    if not numeric:
        raise ExmeError(f"lm-eval returned no numeric metric ({sorted(metrics)})")
    key = sorted(numeric)[0]
    return key, numeric[key]


class LmEvalEvaluator:
    """Named lm-eval tasks on the live model, split into dev/test by a seeded permutation of their docs."""

    def __init__(
        self,
        tasks: list[str],
        *,
        num_fewshot: int | None = None,
        batch_size: int = 8,
        include_path: str | Path | list[str | Path] | None = None,
        seed: int = 0,
        dev_fraction: float = 0.5,
        metric: str | None = None,
        weights: dict[str, float] | None = None,
        apply_chat_template: bool = False,
    ):
        _require_lm_eval()
        if not tasks:
            raise ExmeError("lm-eval: name at least one task, e.g. 'lm-eval:arc_easy,hellaswag'")
        self.task_names = list(tasks)
        self.num_fewshot = num_fewshot
        self.batch_size = batch_size
        self.include_path = [str(p) for p in include_path] if isinstance(include_path, list) else include_path
        self.rule = SplitRule(seed=seed, dev_fraction=dev_fraction)
        self.metric = metric
        self.weights = dict(weights or {})
        self.apply_chat_template = apply_chat_template
        self._task_manager = None
        self._indices: dict[str, dict[str, list[int]]] | None = None

    @classmethod
    def from_spec(cls, names: str, **opts: Any) -> "LmEvalEvaluator":
        """From the part after ``lm-eval:`` (comma-separated task names)."""
        import inspect

        tasks = [n.strip() for n in names.split(",") if n.strip()]
        allowed = set(inspect.signature(cls.__init__).parameters) - {"self", "tasks"}
        unknown = sorted(set(opts) - allowed)
        if unknown:
            raise ExmeError(f"options {unknown} do not apply to lm-eval tasks; use {sorted(allowed)}")
        return cls(tasks, **opts)

    # -- tasks and their split (data only: cached across calls) --

    def task_manager(self):
        """lm-eval's task index. With ``include_path`` holding every named task, the built-in
        tasks (thousands of YAML files, seconds to index) are not indexed at all."""
        if self._task_manager is None:
            from lm_eval.tasks import TaskManager

            manager = None
            if self.include_path:
                manager = TaskManager(include_path=self.include_path, include_defaults=False)
                if not all(name in manager.all_tasks for name in self.task_names):
                    manager = None
            self._task_manager = manager or TaskManager(include_path=self.include_path)
        return self._task_manager

    def split_indices(self) -> dict[str, dict[str, list[int]]]:
        """``{"dev": {task: [doc indices]}, "test": {...}}`` from the seeded rule; computed once."""
        if self._indices is None:
            manager = self.task_manager()
            try:
                if hasattr(manager, "load"):  # lm-eval >= 0.4.10: flat dict of leaf tasks
                    leaves = dict(manager.load(list(self.task_names))["tasks"])
                else:
                    from lm_eval.tasks import get_task_dict

                    leaves = _leaf_tasks(get_task_dict(self.task_names, manager))
            except (KeyError, ValueError) as err:
                raise ExmeError(f"lm-eval could not load tasks {self.task_names}: {err}; check names and include_path") from None
            indices: dict[str, dict[str, list[int]]] = {"dev": {}, "test": {}}
            for name, task in leaves.items():
                n_docs = len(list(task.eval_docs))
                dev, test = split_indices(n_docs, self.rule, name)
                indices["dev"][name], indices["test"][name] = sorted(dev), sorted(test)
            self._indices = indices
        return self._indices

    def counts(self) -> dict[str, dict[str, int]]:
        return {s: {t: len(ix) for t, ix in by_task.items()} for s, by_task in self.split_indices().items()}

    @property
    def split_rule(self) -> dict[str, Any]:
        return {"method": "seeded_permutation", **self.rule.model_dump()}

    def describe(self) -> dict[str, Any]:
        return {
            "name": "lm-eval:" + ",".join(self.task_names),
            "tasks": {t: {"kind": "lm-eval", "weight": self.weights.get(t, 1.0)} for t in self.counts()["dev"]},
            "split": self.split_rule,
            "n_items": self.counts(),
            "num_fewshot": self.num_fewshot,
        }

    # -- scoring --

    def evaluate(self, model, tokenizer, split: str, limit: int | None = None) -> Scores:
        """lm-eval scores of the live ``model`` on the ``split`` documents (first ``limit`` of each task)."""
        from exme.evaluate.evaluator import check_split

        check_split(split)
        import lm_eval
        from lm_eval.models.huggingface import HFLM

        indices = self.split_indices()
        by_task = indices[split] if split != "all" else {t: sorted(ix + indices["test"][t]) for t, ix in indices["dev"].items()}
        samples = {t: ix[:limit] if limit else list(ix) for t, ix in by_task.items()}
        was_training = getattr(model, "training", False)
        model.eval()
        logging.getLogger("lm_eval").setLevel(logging.WARNING)
        try:
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=self.batch_size)
            output = lm_eval.simple_evaluate(
                model=lm,
                tasks=self.task_names,
                num_fewshot=self.num_fewshot,
                batch_size=self.batch_size,
                samples=samples,
                task_manager=self.task_manager(),
                log_samples=False,
                bootstrap_iters=0,
                apply_chat_template=self.apply_chat_template,
                verbosity="WARNING",
            )
        finally:
            if was_training:
                model.train()
        results = output["results"]
        tasks: dict[str, float] = {}
        details: dict[str, dict[str, Any]] = {}
        for name in samples:
            if name not in results:
                raise ExmeError(f"lm-eval returned no result for task {name!r}")
            metric, value = primary_metric(results[name], self.metric)
            tasks[name] = value
            details[name] = {
                "kind": "lm-eval",
                "metric": metric,
                "metrics": {
                    k.split(",")[0] if k.endswith(",none") else k: float(v)
                    for k, v in results[name].items()
                    if isinstance(v, (int, float)) and "_stderr" not in k and k != "sample_len"
                },
            }
        n_items = {t: len(ix) for t, ix in samples.items()}
        return Scores.from_tasks(tasks, split=split, n_items=n_items, weights=self.weights, details=details)
