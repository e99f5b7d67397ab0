"""Batched forward passes over a live causal LM: greedy generation and continuation log-likelihoods.

The model object is whatever the caller holds (its weights may change between calls), so nothing
here caches anything computed *from the weights*; callers cache token ids instead. Everything runs
under ``torch.inference_mode()``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch


def model_device(model) -> torch.device:
    """The device of the model's first parameter (where inputs must go)."""
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


def max_context(model, default: int = 2048) -> int:
    """The longest sequence the model accepts (``max_position_embeddings`` when the config has it)."""
    config = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return default


def _pad_left(rows: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
            mask[i, width - len(row) :] = 1
    return ids.to(device), mask.to(device)


class _StopOnStrings:
    """Per-sequence stopping criterion: a row is done once its generated text contains a stop string.

    Only the last few tokens of each row are decoded at each step (enough to hold the longest stop
    string), so the check costs O(batch) small decodes per step rather than re-decoding everything.
    """

    def __init__(self, tokenizer, stops: Sequence[str], prompt_width: int):
        self.tokenizer = tokenizer
        self.stops = [s for s in stops if s]
        self.prompt_width = prompt_width
        self.window = max((len(s) for s in self.stops), default=0) + 8

    def __call__(self, input_ids: torch.Tensor, scores=None, **kwargs) -> torch.Tensor:
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        if not self.stops:
            return done
        generated = input_ids[:, self.prompt_width :]
        tail = generated[:, -self.window :].tolist()
        for i, row in enumerate(tail):
            text = self.tokenizer.decode(row, skip_special_tokens=True)
            done[i] = any(s in text for s in self.stops)
        return done


@dataclass(frozen=True)
class Generation:
    """One greedy completion: its text (cut before the first stop string), how many tokens were
    generated (an ending EOS and the tokens that spelled a stop string included, as vLLM counts
    them), and why it ended: ``"eos"``, ``"stop"`` (a stop string) or ``"length"`` (the token
    limit, with neither). A model pushed too far stops emitting EOS; these fields make it visible."""

    text: str
    new_tokens: int
    finish: str


def _stop_tokens(tokenizer, new: Sequence[int], stops: Sequence[str]) -> int | None:
    """The fewest leading tokens of ``new`` whose text holds a stop string (None when none does).

    Binary search over prefixes: once a prefix's text holds a stop string every longer one does,
    so ~log2(n) decodes per row find the token at which generation stopped.
    """
    stops = [s for s in stops if s]
    if not stops or not any(s in tokenizer.decode(list(new), skip_special_tokens=True) for s in stops):
        return None
    lo, hi = 1, len(new)
    while lo < hi:
        mid = (lo + hi) // 2
        if any(s in tokenizer.decode(list(new[:mid]), skip_special_tokens=True) for s in stops):
            hi = mid
        else:
            lo = mid + 1
    return lo


def greedy_generate(
    model,
    tokenizer,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    stop: Sequence[str] = (),
    batch_size: int = 16,
    progress: Callable[[int], None] | None = None,
) -> list[str]:
    """Greedy completions (text after the prompt, cut at the first stop string) for token-id prompts."""
    rows = greedy_generations(
        model, tokenizer, prompts, max_new_tokens=max_new_tokens, stop=stop, batch_size=batch_size, progress=progress
    )
    return [g.text for g in rows]


def greedy_generations(
    model,
    tokenizer,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    stop: Sequence[str] = (),
    batch_size: int = 16,
    progress: Callable[[int], None] | None = None,
) -> list[Generation]:
    """Greedy :class:`Generation` rows for token-id prompts.

    Prompts are sorted by length and left-padded into batches so each batch needs little padding;
    ``model.generate`` carries the KV cache, stops each row at EOS, and ends a batch as soon as
    every row has hit EOS or a stop string.
    """
    from transformers import StoppingCriteriaList

    from exme.evaluate.extract import truncate_at_stop

    if not prompts:
        return []
    device = model_device(model)
    pad_id = tokenizer.pad_token_id
    eos_ids = eos_token_ids(model, tokenizer)
    if pad_id is None:
        pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    limit = max_context(model) - max_new_tokens
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    outputs: list[Generation] = [Generation("", 0, "length")] * len(prompts)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        rows = [list(prompts[i])[-limit:] if limit > 0 else list(prompts[i]) for i in chunk]
        ids, mask = _pad_left(rows, pad_id, device)
        criteria = StoppingCriteriaList([_StopOnStrings(tokenizer, stop, ids.shape[1])])
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                num_beams=1,
                temperature=None,
                top_p=None,
                top_k=None,
                pad_token_id=pad_id,
                eos_token_id=sorted(eos_ids) or None,
                stopping_criteria=criteria,
            )
        for row_index, item in enumerate(chunk):
            new = out[row_index, ids.shape[1] :].tolist()[:max_new_tokens]
            cut = next((k for k, t in enumerate(new) if t in eos_ids), len(new))
            text = tokenizer.decode(new[:cut], skip_special_tokens=True)
            at_stop = _stop_tokens(tokenizer, new[:cut], stop)
            if at_stop is not None:  # the row ended on a stop string (later tokens are padding)
                outputs[item] = Generation(truncate_at_stop(text, stop), at_stop, "stop")
            elif cut < len(new):
                outputs[item] = Generation(text, cut + 1, "eos")
            else:
                outputs[item] = Generation(text, len(new), "length")
        if progress is not None:
            progress(len(chunk))
    return outputs


def eos_token_ids(model, tokenizer) -> set[int]:
    """The tokenizer's EOS plus the generation config's (a chat model may end turns with several ids)."""
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    eos_id = tokenizer.eos_token_id
    return {int(i) for i in ([eos_id] + (list(gen_eos) if isinstance(gen_eos, (list, tuple)) else [gen_eos])) if i is not None}


@dataclass(frozen=True)
class Continuation:
    """A context and a continuation as token ids; its log-likelihood is Σ log p(cont | context)."""

    context: tuple[int, ...]
    continuation: tuple[int, ...]


def _accepts(model, name: str) -> bool:
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError, AttributeError):
        return False


def _vocab_size(model) -> int:
    size = getattr(getattr(model, "config", None), "vocab_size", None)
    return int(size) if isinstance(size, int) and size > 0 else 32_000


def continuation_logprobs(
    model,
    requests: Sequence[Continuation],
    *,
    batch_size: int = 32,
    pad_id: int = 0,
    logits_budget: int = 2**28,
    progress: Callable[[int], None] | None = None,
) -> list[tuple[float, bool]]:
    """For each request: (Σ log p of the continuation tokens, whether each was the greedy argmax).

    All requests are scored in right-padded batches sorted by length, so a multiple-choice task
    with k choices costs about ⌈n·k / batch_size⌉ forward passes. Only the positions that predict
    continuation tokens get logits (``logits_to_keep`` where the model supports it), and a batch
    also stops growing at ``logits_budget`` logit values (2**28 float32 = 1 GiB), so a 128k
    vocabulary or long perplexity windows do not exhaust memory. Log-softmax is taken in float32.
    A context longer than the model's window keeps its last tokens.
    """
    if not requests:
        return []
    device = model_device(model)
    window = max_context(model)
    vocab = _vocab_size(model)
    keep_arg = _accepts(model, "logits_to_keep")
    seqs: list[tuple[list[int], int]] = []  # (input ids, number of scored continuation tokens)
    for req in requests:
        full = list(req.context) + list(req.continuation)
        inputs = full[:-1][-window:]
        seqs.append((inputs, min(len(req.continuation), len(inputs))))
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i][0]))
    results: list[tuple[float, bool]] = [(0.0, True)] * len(seqs)
    start = 0
    while start < len(order):
        chunk = [order[start]]
        width = len(seqs[order[start]][0])
        first_needed = width - seqs[order[start]][1]
        for i in order[start + 1 : start + batch_size]:
            needed = min(first_needed, len(seqs[i][0]) - seqs[i][1])
            if (len(chunk) + 1) * (width - needed) * vocab > logits_budget:
                break
            chunk.append(i)
            first_needed = needed
        start += len(chunk)
        keep = width - first_needed if keep_arg else width
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, i in enumerate(chunk):
            inputs = seqs[i][0]
            ids[row, : len(inputs)] = torch.tensor(inputs, dtype=torch.long)
            mask[row, : len(inputs)] = 1
        kwargs = {"logits_to_keep": keep} if keep_arg else {}
        with torch.inference_mode():
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs).logits
            offset = width - logits.shape[1]  # logits[:, j] predicts the token after position offset + j
            for row, i in enumerate(chunk):
                inputs, n_cont = seqs[i]
                if n_cont == 0:
                    results[i] = (0.0, True)
                    continue
                cont = list(requests[i].continuation)[-n_cont:]
                targets = torch.tensor(cont, dtype=torch.long, device=logits.device)
                end = len(inputs) - offset
                step_logits = logits[row, end - n_cont : end].float()
                logp = torch.log_softmax(step_logits, dim=-1)
                total = logp.gather(-1, targets[:, None]).sum().item()
                greedy = bool((step_logits.argmax(-1) == targets).all().item())
                results[i] = (float(total), greedy)
        if progress is not None:
            progress(len(chunk))
    return results


def token_nll(
    model,
    documents: Sequence[Sequence[int]],
    *,
    batch_size: int = 8,
    pad_id: int = 0,
    progress: Callable[[int], None] | None = None,
) -> list[tuple[float, int]]:
    """For each document: (Σ −log p(tᵢ | t₀..tᵢ₋₁) over tokens 1..n−1, number of predicted tokens).

    A document longer than the model's window is cut into consecutive windows (see
    :func:`windowed_nll`).
    """
    return windowed_nll(
        lambda requests: continuation_logprobs(model, requests, batch_size=batch_size, pad_id=pad_id),
        documents,
        max_context(model),
        progress=progress,
    )


def windowed_nll(
    score: Callable[[list[Continuation]], list[tuple[float, bool]]],
    documents: Sequence[Sequence[int]],
    window: int,
    *,
    progress: Callable[[int], None] | None = None,
) -> list[tuple[float, int]]:
    """Per-document (NLL, predicted tokens) from a continuation scorer, any backend's.

    Each window starts from the last token of the previous one, so every token after the first is
    predicted exactly once.
    """
    pieces: list[tuple[int, list[int]]] = []  # (document index, window ids)
    for doc_index, doc in enumerate(documents):
        doc = list(doc)
        start = 0
        while start < len(doc) - 1:
            piece = doc[start : start + window]
            pieces.append((doc_index, piece))
            start += window - 1
    totals = [[0.0, 0] for _ in documents]
    requests = [Continuation(context=(p[0],), continuation=tuple(p[1:])) for _, p in pieces]
    scored = score(requests)
    for (doc_index, piece), (logp, _) in zip(pieces, scored):
        totals[doc_index][0] += -logp
        totals[doc_index][1] += len(piece) - 1
    if progress is not None:
        progress(len(documents))
    return [(float(nll), int(n)) for nll, n in totals]
