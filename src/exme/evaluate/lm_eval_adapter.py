"""lm-evaluation-harness tasks scored on the live model (optional extra: ``pip install exme[lm-eval]``).

On ``backend: hf`` the live ``transformers`` module is wrapped in ``lm_eval``'s own ``HFLM`` (never
reloaded from disk). On any other backend (the held vLLM engine) :class:`BackendLM` serves lm-eval's
model interface (``loglikelihood``, ``loglikelihood_rolling``, ``generate_until``) from exme's
:class:`~exme.evaluate.backends.Backend`, tokenizing as lm-eval's ``VLLM`` model does, so the same
engine that scores suite tasks scores lm-eval tasks with candidates swapped in place. Each task's
evaluation documents are divided into dev and test by the same seeded permutation a suite uses;
``simple_evaluate(samples=...)`` then scores exactly the documents of the asked split.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import os
import re
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from exme.errors import ExmeError
from exme.evaluate.evaluator import Capabilities
from exme.evaluate.lm import Continuation
from exme.evaluate.scores import Scores
from exme.evaluate.suite import SplitRule, split_indices

PREFERRED_METRICS = ("acc", "exact_match", "pass@1", "f1", "mcc", "bleu")
_TRUE = {"1", "ON", "YES", "TRUE"}
LOCAL_DATA_HINT = (
    "download it once where the Hugging Face Hub is reachable (it is then read from the cache), or point "
    "lm-eval at local data: a task YAML with 'dataset_path: json' and 'dataset_kwargs: {data_files: "
    "{test: /path/data.jsonl}}' in a folder given with --include-path (lm_eval_include_path in a pipeline)"
)


def _hub_host() -> str:
    return urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname or "huggingface.co"


def hub_offline(timeout: float = 2.0) -> bool:
    """Whether the Hugging Face Hub is out of reach: offline mode is set, or a short TCP connect fails.

    Why probe: without it, ``datasets`` retries an unreachable hub for tens of seconds (23 s to 60 s
    measured on a loaded machine) before a 60-line ``ConnectionError``.
    """
    if any(os.environ.get(k, "").upper() in _TRUE for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")):
        return True
    try:
        socket.create_connection((_hub_host(), 443), timeout=timeout).close()
    except OSError:
        return True
    return False


@contextlib.contextmanager
def _offline_mode() -> Iterator[None]:
    """Hub and datasets in offline mode (cache only, no retries) for the duration of the block."""
    patched = []
    for module_name, names in (("huggingface_hub.constants", ("HF_HUB_OFFLINE",)),
                               ("datasets.config", ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))):
        try:
            module = __import__(module_name, fromlist=["_"])
        except ImportError:
            continue
        for name in names:
            if hasattr(module, name):
                patched.append((module, name, getattr(module, name)))
                setattr(module, name, True)
    try:
        yield
    finally:
        for module, name, value in patched:
            setattr(module, name, value)


def _is_fetch_error(err: BaseException) -> bool:
    """A data set that could not be fetched (no network, offline mode, not in the cache)."""
    seen = 0
    while err is not None and seen < 10:
        name = type(err).__name__
        if isinstance(err, ConnectionError) or name in {
            "OfflineModeIsEnabled", "LocalEntryNotFoundError", "DatasetNotFoundError", "ConnectTimeout", "ConnectError",
        }:
            return True
        err, seen = err.__cause__ or err.__context__, seen + 1
    return False


def _yaml_task_name(path: Path) -> str:
    """The ``task:`` name of an lm-eval task YAML (its ``!function`` tags are not evaluated here)."""
    import yaml

    class _Loader(yaml.SafeLoader):
        pass

    _Loader.add_multi_constructor("!", lambda loader, suffix, node: None)
    try:
        doc = yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader)
    except (OSError, yaml.YAMLError) as err:
        raise ExmeError(f"lm-eval task file {path} cannot be read: {err}") from None
    name = doc.get("task") if isinstance(doc, dict) else None
    if not isinstance(name, str) or not name:
        raise ExmeError(f"lm-eval task file {path} has no 'task: <name>' key; name the task in the YAML")
    return name


def resolve_task_entries(entries: list[str], root: str | Path | None = None) -> tuple[list[str], list[str]]:
    """(task names, extra include folders) for entries that are names or paths of task YAML files.

    ``lm-eval:/path/task.yaml`` is lm-eval's own convention for a one-off task: the file's folder
    joins the include path and the task is named by its ``task:`` key.
    """
    names, folders = [], []
    for entry in entries:
        if entry.lower().endswith((".yaml", ".yml")) or "/" in entry or os.sep in entry:
            path = Path(entry).expanduser()
            if not path.is_absolute() and root is not None:
                path = Path(root) / path
            if not path.is_file():
                raise ExmeError(f"lm-eval task file {path} not found; give an existing task YAML or a task name")
            names.append(_yaml_task_name(path))
            folder = str(path.resolve().parent)
            if folder not in folders:
                folders.append(folder)
        else:
            names.append(entry)
    return names, folders


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


# The lm-eval output types BackendLM serves, and the Backend method that answers each (every backend
# has them all: they are the Backend protocol, so no backend needs to be looked up by name here).
OUTPUT_TYPE_NEEDS = {
    "loglikelihood": "loglikelihood",
    "multiple_choice": "loglikelihood",
    "loglikelihood_rolling": "loglikelihood",
    "generate_until": "generate",
}


def _samples(gen_kwargs: dict[str, Any] | None) -> bool:
    """Whether lm-eval generation kwargs ask for sampled (not greedy) generation."""
    kwargs = dict(gen_kwargs or {})
    temperature = kwargs.get("temperature")
    if kwargs.get("do_sample") is True:
        return temperature is None or float(temperature) > 0.0
    return temperature is not None and float(temperature) > 0.0 and kwargs.get("do_sample") is not False


def unservable(output_type: str, gen_kwargs: dict[str, Any] | None, backend: str) -> str | None:
    """Why ``backend`` cannot serve this lm-eval task, or ``None`` when it can.

    ``hf`` runs lm-eval's own ``HFLM`` (every output type, sampling included). Any other backend
    serves lm-eval through :class:`BackendLM`: each output type needs one Backend method, and its
    generation is greedy, so a task that samples would be scored differently from what it asks.
    """
    if backend == "hf":
        return None
    if output_type not in OUTPUT_TYPE_NEEDS:
        return f"output type {output_type!r} is not one exme serves ({', '.join(OUTPUT_TYPE_NEEDS)})"
    if output_type == "generate_until" and _samples(gen_kwargs):
        return "it samples (do_sample/temperature in its generation_kwargs), and exme's engines generate greedily"
    return None


def _datasets_bars() -> None:
    """``datasets`` progress bars (tasks load their data through it) only with ``--verbose``, as the
    other libraries' bars: otherwise they precede even a one-line error about a task."""
    from exme.runtime import is_verbose

    try:
        import datasets
    except ImportError:
        return
    (datasets.enable_progress_bars if is_verbose() else datasets.disable_progress_bars)()


def _gen_settings(gen_kwargs: dict[str, Any], default_max: int) -> tuple[list[str], int]:
    """(stop strings, max new tokens) from lm-eval generation kwargs (``until``, ``max_gen_toks`` and its aliases)."""
    until = gen_kwargs.get("until")
    stops = [until] if isinstance(until, str) else list(until or [])
    for key in ("max_gen_toks", "max_new_tokens", "max_tokens", "max_completion_tokens"):
        if gen_kwargs.get(key) is not None:
            return stops, int(gen_kwargs[key])
    return stops, default_max


_BACKEND_LM: Any = None


def backend_lm(backend: Any, tokenizer: Any, *, max_gen_toks: int = 256) -> Any:
    """lm-eval's model interface over an exme :class:`~exme.evaluate.backends.Backend`.

    Built on lm-eval's ``TemplateLM``, which turns (context, continuation) strings into token ids
    as every lm-eval causal model does (trailing spaces of the context move to the continuation;
    an empty context is the prefix token); the scoring then runs through the backend:

    * ``loglikelihood``/``multiple_choice``: ``Backend.loglikelihood`` (the sum and the greedy flag);
    * ``loglikelihood_rolling``: lm-eval's disjoint rolling windows, each scored as a continuation;
    * ``generate_until``: greedy ``Backend.generate`` with the task's ``until`` plus the EOS text
      as stop strings, the text cut again at the first stop (as lm-eval does).

    Tokenization follows lm-eval's ``VLLM`` model (the tokenizer's own special tokens, none added
    to a string that already starts with the BOS text; the prefix token is BOS, else EOS), and on
    the vLLM engine generated text keeps special tokens as that model's does.
    """
    global _BACKEND_LM
    if _BACKEND_LM is None:
        _BACKEND_LM = _make_backend_lm()
    return _BACKEND_LM(backend, tokenizer, max_gen_toks=max_gen_toks)


def _make_backend_lm() -> Any:
    from lm_eval.api.model import TemplateLM
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    from exme.evaluate.extract import truncate_at_stop

    class BackendLM(TemplateLM):
        def __init__(self, backend: Any, tokenizer: Any, *, max_gen_toks: int = 256):
            super().__init__()
            self.engine = backend
            self.tokenizer = tokenizer
            self.max_gen_toks = max_gen_toks
            window = getattr(backend, "max_model_len", None)
            if window is None:
                from exme.evaluate.lm import max_context

                window = max_context(getattr(backend, "module", None))
            self.max_length = int(window)
            # An engine that scores a prompt by generating one token after it needs room for that token.
            self._rolling_len = self.max_length - (2 if hasattr(backend, "max_model_len") else 0)
            # Declared by the engine (lm-eval's own model for it decodes that way), not looked up by backend name.
            self._generate_opts = dict(getattr(backend, "lm_eval_generate_options", {}))

        @property
        def eot_token_id(self) -> int:
            return self.tokenizer.eos_token_id

        @property
        def prefix_token_id(self) -> int:
            bos = self.tokenizer.bos_token_id
            return bos if bos is not None else self.tokenizer.eos_token_id

        @property
        def tokenizer_name(self) -> str:
            return str(getattr(self.tokenizer, "name_or_path", "tokenizer")).replace("/", "__")

        def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
            return self.tokenizer.apply_chat_template(
                chat_history, tokenize=False, add_generation_prompt=add_generation_prompt,
                continue_final_message=not add_generation_prompt,
            )

        def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
            if not string:
                return []
            if add_special_tokens is None:
                bos = self.tokenizer.decode(self.prefix_token_id) if self.prefix_token_id is not None else None
                if bos and string.startswith(bos):
                    add_special_tokens = False  # the text carries its BOS already (a chat template's)
            opts = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
            return list(self.tokenizer(string, **opts)["input_ids"])

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
            conts = [Continuation(tuple(ctx), tuple(cont)) for _, ctx, cont in requests]
            results = [(float(lp), bool(greedy)) for lp, greedy in self.engine.loglikelihood(conts)]
            for (key, _, _), answer in zip(requests, results):
                if key is not None:
                    self.cache_hook.add_partial("loglikelihood", key, answer)
            return results

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
            windows: list[tuple[int, list[int], list[int]]] = []
            for index, req in enumerate(requests):
                tokens = self.tok_encode(req.args[0])
                pairs = get_rolling_token_windows(
                    token_list=tokens, prefix_token=self.prefix_token_id, max_seq_len=self._rolling_len, context_len=1,
                )
                windows.extend((index, *make_disjoint_window(pair)) for pair in pairs)
            scored = self._loglikelihood_tokens([(None, ctx, cont) for _, ctx, cont in windows])
            totals = [0.0] * len(requests)
            for (index, _, _), (logp, _) in zip(windows, scored):
                totals[index] += logp
            for req, total in zip(requests, totals):
                self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
            return totals

        def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
            eos = self.tokenizer.decode(self.eot_token_id) if self.eot_token_id is not None else None
            eos = eos or getattr(self.tokenizer, "eos_token", None)
            groups: dict[str, list[int]] = {}
            for i, req in enumerate(requests):
                groups.setdefault(repr(sorted(dict(req.args[1]).items())), []).append(i)
            out = [""] * len(requests)
            for indices in groups.values():
                gen_kwargs = dict(requests[indices[0]].args[1])
                if _samples(gen_kwargs):
                    raise ExmeError(
                        f"lm-eval task {requests[indices[0]].task_name!r} asks for sampled generation; "
                        f"backend {self.engine.name} generates greedily; use backend hf"
                    )
                stops, max_new = _gen_settings(gen_kwargs, self.max_gen_toks)
                if eos and eos not in stops:
                    stops.append(eos)
                prompts = [self.tok_encode(requests[i].args[0]) for i in indices]
                rows = self.engine.generate(prompts, max_new_tokens=max_new, stop=stops, **self._generate_opts)
                for i, row in zip(indices, rows):
                    out[i] = truncate_at_stop(row.text, stops)
                    self.cache_hook.add_partial("generate_until", requests[i].args, out[i])
            return out

    return BackendLM


class LmEvalEvaluator:
    """Named lm-eval tasks on the live model, split into dev/test by a seeded permutation of their docs."""

    capabilities = Capabilities(subset=True)  # positions of a split via items=; no per-item records

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
        if include_path is None or include_path == []:
            self.include_path: list[str] | None = None
        else:
            paths = include_path if isinstance(include_path, (list, tuple)) else [include_path]
            self.include_path = [str(p) for p in paths]
            for p in self.include_path:
                if not Path(p).is_dir():
                    raise ExmeError(f"lm-eval include path {p} is not a folder; give the folder holding the task YAML files")
        self.rule = SplitRule(seed=seed, dev_fraction=dev_fraction)
        self.metric = metric
        self.weights = dict(weights or {})
        self.apply_chat_template = apply_chat_template
        self._task_manager = None
        self._indices: dict[str, dict[str, list[int]]] | None = None
        self._requests: dict[str, tuple[str, dict[str, Any]]] = {}  # task → (output type, generation kwargs)
        self._served: set[str] = set()  # backends check_backend found able to serve every task

    @classmethod
    def from_spec(cls, names: str, **opts: Any) -> "LmEvalEvaluator":
        """From the part after ``lm-eval:`` (comma-separated task names or task YAML paths).

        The names are checked and the data loaded here, before any model is read, so a typo or
        an unreachable data set costs seconds, not a model load.
        """
        import inspect

        from exme.evaluate import parse_evaluator_spec

        spec = parse_evaluator_spec("lm-eval:" + names, include_path=opts.pop("include_path", None))
        allowed = set(inspect.signature(cls.__init__).parameters) - {"self", "tasks"}
        unknown = sorted(set(opts) - allowed)
        if unknown:
            raise ExmeError(f"options {unknown} do not apply to lm-eval tasks; use {sorted(allowed)}")
        evaluator = cls(spec.tasks, include_path=[str(p) for p in spec.include_path] or None, **opts)
        evaluator.check_tasks()
        evaluator.split_indices()
        return evaluator

    def check_tasks(self) -> None:
        """Every named task, group or tag is known to lm-eval (built-in or under ``include_path``)."""
        known = set(self.task_manager().all_tasks)
        missing = [name for name in self.task_names if name not in known]
        if missing:
            where = f"built-in tasks and {', '.join(self.include_path)}" if self.include_path else "built-in tasks (no include path given)"
            close = sorted({m for name in missing for m in difflib.get_close_matches(name, known, n=3)})
            hint = f"; close names: {', '.join(close)}" if close else ""
            raise ExmeError(
                f"lm-eval has no task {', '.join(repr(m) for m in missing)} (looked in {where}){hint}; "
                "check the name, or give the folder of your task YAML with --include-path"
            )

    def check_backend(self, backend: str) -> None:
        """Every task can be served by ``backend`` (one line naming the first that cannot), before any engine
        starts; once it passed, later calls (every evaluation asks) return at once."""
        if backend in self._served:
            return
        self.split_indices()
        for name, (output_type, gen_kwargs) in self._requests.items():
            why = unservable(output_type, gen_kwargs, backend)
            if why is not None:
                raise ExmeError(f"lm-eval task {name!r} cannot run on backend {backend}: {why}; use backend hf for it")
        self._served.add(backend)

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
            offline = hub_offline()
            _datasets_bars()
            try:
                with _offline_mode() if offline else contextlib.nullcontext():
                    if hasattr(manager, "load"):  # lm-eval >= 0.4.10: flat dict of leaf tasks
                        leaves = dict(manager.load(list(self.task_names))["tasks"])
                    else:
                        from lm_eval.tasks import get_task_dict

                        leaves = _leaf_tasks(get_task_dict(self.task_names, manager))
            except (KeyError, ValueError) as err:
                raise ExmeError(f"lm-eval could not load tasks {self.task_names}: {err}; check names and include_path") from None
            except Exception as err:
                if not _is_fetch_error(err):
                    raise
                dataset = re.search(r"'([^'\s]+)'", str(err))
                what = f"data set {dataset.group(1)!r}" if dataset else "its data set"
                reason = "the Hugging Face Hub is unreachable or offline mode is on" if offline else str(err)
                raise ExmeError(
                    f"lm-eval task(s) {', '.join(self.task_names)}: {what} could not be fetched ({reason}) and is not "
                    f"in the local cache; {LOCAL_DATA_HINT}"
                ) from None
            indices: dict[str, dict[str, list[int]]] = {"dev": {}, "test": {}}
            for name, task in leaves.items():
                config = getattr(task, "config", None)
                self._requests[name] = (
                    str(getattr(task, "OUTPUT_TYPE", None) or getattr(config, "output_type", "")),
                    dict(getattr(config, "generation_kwargs", None) or {}),
                )
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

    def evaluate(self, model, tokenizer, split: str, limit: int | None = None,
                 items: dict[str, list[int]] | None = None) -> Scores:
        """lm-eval scores of the live ``model`` on the ``split`` documents (first ``limit`` of each task).

        ``items`` restricts a task to those positions of its split (as :class:`SuiteEvaluator` does);
        each document's primary metric is returned in ``Scores.per_item`` under its position.
        """
        from exme.evaluate.evaluator import check_split

        check_split(split)
        import lm_eval

        from exme.evaluate.backends import Backend

        indices = self.split_indices()
        # "all": every document (dev then test order does not matter to lm-eval), as published full-set numbers.
        by_task = indices[split] if split != "all" else {t: sorted(ix + indices["test"][t]) for t, ix in indices["dev"].items()}
        positions = {t: list((items or {}).get(t, range(len(ix)))) for t, ix in by_task.items()}
        positions = {t: pos[:limit] if limit else pos for t, pos in positions.items()}
        samples = {t: [by_task[t][i] for i in pos] for t, pos in positions.items()}
        engine = model if isinstance(model, Backend) and model.name != "hf" else None
        module = model.module if isinstance(model, Backend) and engine is None else model
        was_training = engine is None and getattr(module, "training", False)
        if engine is None:
            module.eval()
        logging.getLogger("lm_eval").setLevel(logging.WARNING)
        try:
            if engine is None:
                from lm_eval.models.huggingface import HFLM

                lm = HFLM(pretrained=module, tokenizer=tokenizer, batch_size=self.batch_size)
            else:
                self.check_backend(engine.name)
                lm = backend_lm(engine, tokenizer)
            output = lm_eval.simple_evaluate(
                model=lm,
                tasks=self.task_names,
                num_fewshot=self.num_fewshot,
                batch_size=self.batch_size,
                samples=samples,
                task_manager=self.task_manager(),
                log_samples=True,  # per-document scores, for paired comparisons
                bootstrap_iters=0,
                apply_chat_template=self.apply_chat_template,
                verbosity="WARNING",
            )
        finally:
            if was_training:
                module.train()
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
        per_item = {}
        for name, pos in positions.items():
            scores = _per_document(output.get("samples", {}).get(name, []), details[name]["metric"])
            doc_to_pos = dict(zip(samples[name], pos))
            if scores and set(scores) <= set(doc_to_pos):
                per_item[name] = {str(doc_to_pos[d]): v for d, v in scores.items()}
        return Scores.from_tasks(tasks, split=split, n_items=n_items, weights=self.weights, details=details,
                                 per_item=per_item)


def _per_document(logged: list[dict[str, Any]], metric: str) -> dict[int, float]:
    """``{doc_id: value}`` of the primary metric from lm-eval's logged samples (its filter's entries);
    empty when the samples do not carry it as a number (then no per-item scores are claimed)."""
    name, _, filt = metric.partition(",")
    out: dict[int, float] = {}
    for sample in logged:
        if sample.get("filter", "none") != (filt or "none"):
            continue
        value = sample.get(name)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return {}
        out[int(sample["doc_id"])] = float(value)
    return out
