"""Scores for a live model: suites of benchmark tasks, a code sandbox, lm-eval and custom evaluators.

``load_evaluator(spec)`` turns what a user names on the command line or in a config into an
:class:`Evaluator` whose ``evaluate(model, tokenizer, split, limit=None)`` returns :class:`Scores`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from exme.errors import ExmeError
from exme.evaluate.custom import CustomEvaluator, import_function
from exme.evaluate.evaluator import Evaluator, SuiteEvaluator
from exme.evaluate.scores import Scores
from exme.evaluate.suite import Suite

__all__ = ["Evaluator", "Scores", "Suite", "SuiteEvaluator", "CustomEvaluator", "load_evaluator"]


def load_evaluator(spec: str | Path, **opts: Any) -> Evaluator:
    """An evaluator from a spec string.

    - ``path/to/suite.yaml``: a :class:`SuiteEvaluator` (options: ``batch_size``, ``mc_batch_size``,
      ``workers``, ``keep_items``, ``progress``);
    - ``lm-eval:task1,task2``: lm-evaluation-harness tasks on the live model (options:
      ``num_fewshot``, ``batch_size``, ``include_path``, ``dev_fraction``, ``seed``);
    - ``package.module:function``: a custom function ``(model, tokenizer, split) -> {task: score}``.
    """
    text = str(spec)
    if text.startswith("lm-eval:"):
        from exme.evaluate.lm_eval_adapter import LmEvalEvaluator

        return LmEvalEvaluator.from_spec(text.removeprefix("lm-eval:"), **opts)
    path = Path(text).expanduser()
    if path.suffix.lower() in (".yaml", ".yml") or path.is_file():
        allowed = {"batch_size", "mc_batch_size", "workers", "keep_items", "progress"}
        unknown = sorted(set(opts) - allowed)
        if unknown:
            raise ExmeError(f"options {unknown} do not apply to a suite evaluator; use {sorted(allowed)}")
        return SuiteEvaluator(Suite.from_yaml(path), **opts)
    if ":" in text:
        unknown = set(opts) - {"name", "weights"}
        if unknown:
            raise ExmeError(f"options {sorted(unknown)} do not apply to a custom evaluator {text!r}")
        return CustomEvaluator(import_function(text), name=opts.get("name", text.rpartition(":")[2]), weights=opts.get("weights"))
    raise ExmeError(
        f"evaluator {text!r} is neither a suite YAML file, 'lm-eval:task1,task2', nor 'module:function'"
    )
