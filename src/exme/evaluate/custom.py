"""A user's own evaluator: ``module:function`` taking (model, tokenizer, split) and returning scores."""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Callable
from typing import Any

from exme.errors import ExmeError
from exme.evaluate.evaluator import Capabilities
from exme.evaluate.scores import Scores


def import_function(spec: str) -> Callable[..., Any]:
    """The callable named by ``module:function`` (``module.sub:obj.attr`` works too)."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ExmeError(f"evaluator {spec!r} must look like 'package.module:function'")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as err:
        raise ExmeError(f"evaluator {spec!r}: cannot import module {module_name!r} ({err}); is it on PYTHONPATH?") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ExmeError(f"evaluator {spec!r}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ExmeError(f"evaluator {spec!r} is not callable")
    return obj


class CustomEvaluator:
    """Wraps ``fn(model, tokenizer, split) -> {task: score}`` (or a :class:`Scores`) as an evaluator.

    If ``fn`` also accepts a ``limit`` argument it is passed on; otherwise ``limit`` is ignored and
    ``n_items`` is left empty, since only the function knows how many items it used. It can score
    neither a chosen subset of items nor keep per-item records: only the function knows its items.
    """

    capabilities = Capabilities()

    def __init__(self, fn: Callable[..., Any], name: str = "custom", weights: dict[str, float] | None = None):
        self.fn = fn
        self.name = name
        self.weights = dict(weights or {})
        try:
            self._takes_limit = "limit" in inspect.signature(fn).parameters
        except (TypeError, ValueError):
            self._takes_limit = False

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "kind": "custom", "split": {"method": "defined by the function"}}

    def evaluate(self, model, tokenizer, split: str, limit: int | None = None) -> Scores:
        from exme.evaluate.evaluator import check_split

        check_split(split)
        kwargs = {"limit": limit} if self._takes_limit else {}
        result = self.fn(model, tokenizer, split, **kwargs)
        if isinstance(result, Scores):
            return result
        if isinstance(result, (int, float)) and not isinstance(result, bool):
            result = {self.name: float(result)}
        if not isinstance(result, dict) or not result:
            raise ExmeError(f"evaluator {self.name!r} must return a non-empty dict of task -> score, got {type(result).__name__}")
        tasks: dict[str, float] = {}
        for key, value in result.items():
            try:
                tasks[str(key)] = float(value)
            except (TypeError, ValueError):
                raise ExmeError(f"evaluator {self.name!r}: score for {key!r} is not a number ({value!r})") from None
            if math.isnan(tasks[str(key)]):
                raise ExmeError(f"evaluator {self.name!r}: score for {key!r} is NaN")
        return Scores.from_tasks(tasks, split=split, weights=self.weights)
