"""Scores for a live model: suites of benchmark tasks, a code sandbox, lm-eval and custom evaluators.

``load_evaluator(spec)`` turns what a user names on the command line or in a config into an
:class:`Evaluator` whose ``evaluate(model, tokenizer, split, limit=None)`` returns :class:`Scores`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from exme.errors import ExmeError
from exme.evaluate.custom import CustomEvaluator, import_function
from exme.evaluate.evaluator import Capabilities, Evaluator, SuiteEvaluator, capabilities_of
from exme.evaluate.scores import Scores
from exme.evaluate.suite import Suite

__all__ = [
    "Capabilities", "Evaluator", "Scores", "Suite", "SuiteEvaluator", "CustomEvaluator", "EvaluatorSpec",
    "capabilities_of", "load_evaluator", "parse_evaluator_spec", "spec_kind",
]

#: Suffixes that make a spec a suite file even before the file exists (a JSON document is YAML too).
SUITE_SUFFIXES = (".yaml", ".yml", ".json")


class EvaluatorSpec(BaseModel):
    """What a ``--suite`` / ``suite:`` string names, parsed once for the CLI and the pipeline alike.

    ``kind`` is ``"suite"`` (``path``: a suite YAML), ``"lm-eval"`` (``tasks`` and the
    ``include_path`` folders, task YAML paths already turned into names and folders) or
    ``"custom"`` (``function``: ``package.module:function``).
    """

    model_config = ConfigDict(frozen=True)

    kind: Literal["suite", "lm-eval", "custom"]
    text: str
    path: Path | None = None
    tasks: tuple[str, ...] = ()
    include_path: tuple[Path, ...] = ()
    function: str | None = None


def spec_kind(spec: str | Path, *, root: str | Path | None = None) -> Literal["suite", "lm-eval", "custom"]:
    """What a spec names, decided in one place for ``exme eval`` and ``PIPELINE.yaml`` alike.

    ``lm-eval:...``: lm-eval tasks; a path ending in ``.yaml``, ``.yml`` or ``.json``, or any
    existing file (relative to ``root``): a suite; else ``module:function``: a custom evaluator.
    Anything else is one line saying what a spec may be.
    """
    text = str(spec).strip()
    if text.startswith("lm-eval:"):
        return "lm-eval"
    path = Path(text).expanduser()
    if root is not None and not path.is_absolute():
        path = Path(root) / path
    if path.suffix.lower() in SUITE_SUFFIXES or path.is_file():
        return "suite"
    if ":" in text:  # import errors name the module and attribute (custom.import_function)
        return "custom"
    raise ExmeError(
        f"evaluator {text!r} is neither a suite YAML file, 'lm-eval:task1,task2', nor 'module:function'"
    )


def parse_evaluator_spec(
    spec: str | Path,
    *,
    include_path: str | Path | list[str | Path] | tuple[str | Path, ...] | None = None,
    root: str | Path | None = None,
) -> EvaluatorSpec:
    """Parse a suite spec; relative paths (suite file, task YAMLs, include folders) resolve from ``root``.

    - ``lm-eval:name1,name2`` or ``lm-eval:path/task.yaml`` (lm-eval tasks; ``include_path``:
      folders of task YAMLs, the CLI's ``--include-path`` or a pipeline's ``lm_eval_include_path``);
    - ``path/suite.yaml`` (``.yml``, ``.json``, or any existing file): a suite;
    - ``package.module:function``: a custom evaluator.

    Which of the three a spec is comes from :func:`spec_kind`, which the pipeline's config reads too.
    """
    text = str(spec).strip()
    base = Path(root) if root is not None else None
    kind = spec_kind(text, root=base)

    def resolve(value: str | Path) -> Path:
        path = Path(value).expanduser()
        return base / path if base is not None and not path.is_absolute() else path

    if kind == "lm-eval":
        from exme.evaluate.lm_eval_adapter import resolve_task_entries

        entries = [e.strip() for e in text.removeprefix("lm-eval:").split(",") if e.strip()]
        if not entries:
            raise ExmeError("lm-eval: name at least one task, e.g. 'lm-eval:arc_easy,hellaswag'")
        names, folders = resolve_task_entries(entries, root=base)
        given = [] if include_path is None else include_path if isinstance(include_path, (list, tuple)) else [include_path]
        paths = [resolve(p) for p in given]
        for folder in paths:
            if not folder.is_dir():
                raise ExmeError(f"lm-eval include path {folder} is not a folder; give the folder holding the task YAML files")
        paths += [Path(f) for f in folders if Path(f) not in paths]
        return EvaluatorSpec(kind="lm-eval", text=text, tasks=tuple(names), include_path=tuple(paths))
    if include_path:
        raise ExmeError(f"an include path applies to lm-eval tasks only, not to {text!r}; remove it or use 'lm-eval:TASK'")
    if kind == "suite":
        return EvaluatorSpec(kind="suite", text=text, path=resolve(text))
    return EvaluatorSpec(kind="custom", text=text, function=text)


def load_evaluator(spec: str | Path | EvaluatorSpec, **opts: Any) -> Evaluator:
    """An evaluator from a spec string (or one already parsed by :func:`parse_evaluator_spec`).

    - ``path/to/suite.yaml``: a :class:`SuiteEvaluator` (options: ``batch_size``, ``mc_batch_size``,
      ``workers``, ``keep_items``, ``progress``);
    - ``lm-eval:task1,task2`` or ``lm-eval:path/task.yaml``: lm-evaluation-harness tasks on the
      live model (options: ``num_fewshot``, ``batch_size``, ``include_path``, ``dev_fraction``, ``seed``);
      task names are checked and their data loaded here, before any model is read;
    - ``package.module:function``: a custom function ``(model, tokenizer, split) -> {task: score}``.
    """
    if isinstance(spec, EvaluatorSpec):
        parsed = spec
        if opts.pop("include_path", None):
            raise ExmeError("give the include path to parse_evaluator_spec, not with an already parsed spec")
    else:
        parsed = parse_evaluator_spec(spec, include_path=opts.pop("include_path", None))
    if parsed.kind == "lm-eval":
        from exme.evaluate.lm_eval_adapter import LmEvalEvaluator

        names = ",".join(parsed.tasks)
        return LmEvalEvaluator.from_spec(names, include_path=[str(p) for p in parsed.include_path] or None, **opts)
    if parsed.kind == "suite":
        allowed = {"batch_size", "mc_batch_size", "workers", "keep_items", "progress"}
        unknown = sorted(set(opts) - allowed)
        if unknown:
            raise ExmeError(f"options {unknown} do not apply to a suite evaluator; use {sorted(allowed)}")
        return SuiteEvaluator(Suite.from_yaml(parsed.path), **opts)
    text = parsed.text
    unknown = set(opts) - {"name", "weights"}
    if unknown:
        raise ExmeError(f"options {sorted(unknown)} do not apply to a custom evaluator {text!r}")
    return CustomEvaluator(import_function(text), name=opts.get("name", text.rpartition(":")[2]), weights=opts.get("weights"))
