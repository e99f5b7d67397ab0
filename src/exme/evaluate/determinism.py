"""How stable per-item scores are when the same model is scored again in another batch composition.

Paired statistics compare two models item by item and treat each item's score as a property of the
model. On a GPU that is not quite true: kernels choose reduction orders by batch shape, so a greedy
near-tie can flip when an item's batch neighbours change (lm-eval reports Qwen2-7B HumanEval 0.4756
at batch 1 vs 0.5061 at batch 32). :func:`rescore_sample` scores a seeded sample of one split's items
again on their own (so every batch holds other neighbours than in the full pass) and counts the items
whose score changed: the noise floor under the paired intervals, shown in the report.
"""

from __future__ import annotations

import random
from typing import Any

from pydantic import BaseModel, Field


class Rescore(BaseModel):
    """Items of one model scored twice: in the full pass and again within a sample."""

    model: str
    split: str
    sampled: dict[str, int] = Field(default_factory=dict)  # items re-scored per task
    changed: dict[str, int] = Field(default_factory=dict)  # of those, items whose score differs
    backend: str = "hf"
    batch_invariant: bool = False  # the engine ran with batch-invariant kernels

    @property
    def total_changed(self) -> int:
        return sum(self.changed.values())

    @property
    def total_sampled(self) -> int:
        return sum(self.sampled.values())


def sample_items(per_item: dict[str, dict[str, float]], n: int, seed: int) -> dict[str, list[int]]:
    """Up to ``n`` item ids per task, drawn by a seeded rule (the same items on every run)."""
    out = {}
    for task, scores in sorted(per_item.items()):
        ids = sorted(int(i) for i in scores)
        rng = random.Random(f"{seed}:{task}")
        out[task] = sorted(rng.sample(ids, min(n, len(ids))))
    return out


def rescore_sample(
    evaluator: Any,
    target: Any,
    tokenizer: Any,
    per_item: dict[str, dict[str, float]],
    *,
    model: str,
    split: str = "test",
    n: int = 32,
    seed: int = 0,
    backend: str = "hf",
    batch_invariant: bool = False,
    tol: float = 1e-6,
) -> Rescore:
    """Score a seeded sample of ``per_item``'s items again, alone, and count the changed ones.

    ``target`` must serve the same model that produced ``per_item``. A score counts as changed when
    it differs by more than ``tol`` (accuracies flip by 1; perplexities drift by float noise).
    """
    chosen = sample_items(per_item, n, seed)
    again = evaluator.evaluate(target, tokenizer, split, items=chosen).per_item
    sampled, changed = {}, {}
    for task, ids in chosen.items():
        before, after = per_item[task], again.get(task, {})
        sampled[task] = len(ids)
        changed[task] = sum(abs(float(before[str(i)]) - float(after.get(str(i), float("nan")))) > tol
                            or str(i) not in after for i in ids)
    return Rescore(model=model, split=split, sampled=sampled, changed=changed, backend=backend,
                   batch_invariant=batch_invariant)
