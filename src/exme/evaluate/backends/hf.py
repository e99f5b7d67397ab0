"""The ``transformers`` backend: batched ``generate`` and forward passes on the live module itself."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch

from exme.evaluate.lm import (
    Continuation,
    Generation,
    continuation_logprobs,
    greedy_generations,
    token_nll,
)


class HFBackend:
    """Runs a ``transformers`` causal LM in place. The live model writes candidates straight into
    this module, so ``load_weights`` is only needed when the weights come from elsewhere."""

    name = "hf"

    def __init__(self, model, tokenizer, *, batch_size: int = 16, mc_batch_size: int = 32):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.mc_batch_size = mc_batch_size

    @property
    def module(self):
        """The ``transformers`` module holding the weights (for evaluators that need one)."""
        return self.model

    def _pad_id(self) -> int:
        for value in (self.tokenizer.pad_token_id, self.tokenizer.eos_token_id):
            if value is not None:
                return int(value)
        return 0

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        max_new_tokens: int,
        stop: Sequence[str] = (),
        progress: Callable[[int], None] | None = None,
    ) -> list[Generation]:
        return greedy_generations(
            self.model, self.tokenizer, prompts, max_new_tokens=max_new_tokens, stop=stop,
            batch_size=self.batch_size, progress=progress,
        )

    def loglikelihood(
        self, requests: Sequence[Continuation], *, progress: Callable[[int], None] | None = None
    ) -> list[tuple[float, bool]]:
        return continuation_logprobs(
            self.model, requests, batch_size=self.mc_batch_size, pad_id=self._pad_id(), progress=progress
        )

    def token_nll(
        self, documents: Sequence[Sequence[int]], *, progress: Callable[[int], None] | None = None
    ) -> list[tuple[float, int]]:
        return token_nll(self.model, documents, batch_size=self.mc_batch_size, pad_id=self._pad_id(), progress=progress)

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        params = dict(self.model.named_parameters())
        for name, tensor in weights:
            if params[name].data_ptr() != tensor.data_ptr():
                params[name].copy_(tensor)
