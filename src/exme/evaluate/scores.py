"""What an evaluation returns: one score per task, their weighted mean, and how many items each used."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class Scores(BaseModel):
    """Scores of one model on one split.

    ``tasks`` holds each task's primary score (higher is better), ``overall`` their weighted mean,
    ``n_items`` how many items each task scored (after ``limit``). ``details`` keeps, per task, the
    secondary metrics (e.g. ``acc_norm``, ``perplexity``) under ``"metrics"`` and, when asked for,
    per-item records under ``"items"``, so a report can show more than the number that was optimised.
    """

    model_config = ConfigDict(extra="forbid")

    split: str = "dev"
    tasks: dict[str, float]
    overall: float
    n_items: dict[str, int] = Field(default_factory=dict)
    weights: dict[str, float] = Field(default_factory=dict)
    details: dict[str, dict[str, Any]] = Field(default_factory=dict)
    # Each item's primary score by item id (task -> {id: score}); their mean is the task's score.
    # Paired comparisons between models need them; an evaluator that cannot give them leaves it empty.
    per_item: dict[str, dict[str, float]] = Field(default_factory=dict)

    @classmethod
    def from_tasks(
        cls,
        tasks: dict[str, float],
        *,
        split: str,
        n_items: dict[str, int] | None = None,
        weights: dict[str, float] | None = None,
        details: dict[str, dict[str, Any]] | None = None,
        per_item: dict[str, dict[str, float]] | None = None,
    ) -> "Scores":
        """Build scores with ``overall`` as the weighted mean of ``tasks`` (weight 1 where unset)."""
        weights = {name: float((weights or {}).get(name, 1.0)) for name in tasks}
        return cls(
            split=split,
            tasks={k: float(v) for k, v in tasks.items()},
            overall=weighted_mean(tasks, weights),
            n_items=dict(n_items or {}),
            weights=weights,
            details=dict(details or {}),
            per_item={t: {str(k): float(v) for k, v in items.items()} for t, items in (per_item or {}).items()},
        )

    def metrics(self, task: str) -> dict[str, float]:
        """Every metric computed for ``task`` (the primary one included)."""
        return dict(self.details.get(task, {}).get("metrics", {}))

    def generation(self) -> dict[str, dict[str, float]]:
        """Per generative task, the generation statistics the evaluator recorded (collapse detection)."""
        return {t: dict(d["generation"]) for t, d in self.details.items() if isinstance(d.get("generation"), dict)}

    def summary(self) -> dict[str, Any]:
        """Overall, task scores and item counts (the per-item scores are in ``per_item``)."""
        return {"overall": self.overall, "tasks": dict(self.tasks), "n_items": dict(self.n_items)}


def weighted_mean(values: dict[str, float], weights: dict[str, float]) -> float:
    """Σ wᵢ·vᵢ / Σ wᵢ over the keys of ``values``; NaN when there is nothing to average."""
    total = sum(weights.get(k, 1.0) for k in values)
    if not values or total <= 0:
        return float("nan")
    return float(sum(weights.get(k, 1.0) * float(v) for k, v in values.items()) / total)
