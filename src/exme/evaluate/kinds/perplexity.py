"""``perplexity``: the pooled negative log-likelihood per token of documents (JSONL records or plain text)."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from exme.errors import ExmeError
from exme.evaluate.kinds.base import TaskKind


class Perplexity(TaskKind):
    name = "perplexity"
    required = ("text",)
    metrics = ("neg_log_perplexity",)
    generative = False
    prompt = "{text}"
    fewshot = False
    items_independent = False  # a document's share is normalised by the tokens of all documents scored with it

    def required_fields(self, spec) -> tuple[str, ...]:
        return (spec.text_field,)

    def read_text(self, path: Path, spec, limit: int | None) -> list[dict[str, Any]] | None:
        """A file that is not JSON: one document per blank-line-separated block."""
        if path.suffix.lower() in (".jsonl", ".json"):
            return None
        text = path.read_text(encoding="utf-8")
        docs = [block.strip() for block in re.split(r"\n\s*\n", text) if block.strip()]
        if not docs:
            raise ExmeError(f"data file {path} is empty; it needs at least one paragraph of text")
        return [{spec.text_field: d} for d in docs[:limit]]

    def prepare(self, task, records, tokenizer):
        field = task.spec.text_field
        docs = [list(tokenizer(str(r[field]), add_special_tokens=True)["input_ids"]) for r in records]
        n_bytes = [len(str(r[field]).encode("utf-8")) for r in records]
        return {"records": records, "docs": docs, "bytes": n_bytes}

    def score(self, task, prep, n, engine, ctx):
        per_doc = engine.token_nll(prep["docs"][:n], progress=ctx.bar(n, f"{task.name}: perplexity"))
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
        return metrics, [{"nll": nll, "tokens": k} for nll, k in per_doc], None

    def item_scores(self, task, items):
        """Each document's share of the pooled score, ``−nllᵢ · n / Σ tokens``, whose mean is
        ``−Σ nll / Σ tokens`` (the task's neg_log_perplexity)."""
        total = sum(it["tokens"] for it in items)
        return [-float(it["nll"]) * len(items) / total if total else 0.0 for it in items]
