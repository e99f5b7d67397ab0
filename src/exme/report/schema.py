"""The shape of ``results.json``: what a pipeline run found, in one validated document.

The pipeline fills it stage by stage; the report renders it; ``exme report RUN_DIR`` re-renders it
later. Keeping it a typed model (not a loose dict) means a report can never silently miss a field the
pipeline forgot to write, and old run folders are checked when they are read back.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SplitScores(_Strict):
    """Scores of one model on one split: the weighted mean over tasks and each task's score."""

    overall: float
    tasks: dict[str, float]
    n_items: dict[str, int] = Field(default_factory=dict)
    # Optional per-item scores (task -> one score per item, in item order). When two models both
    # have them, the report's noise estimate is paired (same items), which is tighter and more
    # honest than treating the two accuracies as independent.
    per_item: dict[str, list[float]] = Field(default_factory=dict)


class RankedCheckpoint(_Strict):
    """One SFT checkpoint of the rank stage."""

    name: str
    path: str
    step: int | None = None
    dev: SplitScores
    kept: bool = False


class Trial(_Strict):
    """One evaluated candidate of a search: its parameters and its dev scores."""

    params: dict[str, float]
    dev: SplitScores
    pruned: bool = False


class SearchResult(_Strict):
    """A search over one space (α for one checkpoint, β, a joint space, or a baseline's own)."""

    name: str
    # For an α search: the ranked checkpoint it extrapolates (its dev score is the dashed SFT level
    # of the α plot). When absent the report matches ``name`` against the ranking.
    checkpoint: str | None = None
    space: dict[str, Any]
    trials: list[Trial]
    best_params: dict[str, float]
    best_dev: float


class FinalRow(_Strict):
    """A model of the final table: base, SFT-k, EXPO-k, ExMe, or a baseline."""

    name: str
    kind: str  # "base" | "sft" | "expo" | "exme" | "baseline"
    method: str | None = None  # merge method for exme/expo/baselines
    params: dict[str, Any] = Field(default_factory=dict)
    dev: SplitScores | None = None
    test: SplitScores


class RunResults(_Strict):
    """Everything ``report.md`` and the plots are made from."""

    exme_version: str
    created: str
    config: dict[str, Any]
    suite: dict[str, Any]  # task names, weights, split rule and seed, item counts per split
    ranking: list[RankedCheckpoint]
    alpha_search: list[SearchResult] = Field(default_factory=list)  # one per kept checkpoint
    beta_search: SearchResult | None = None
    joint_search: SearchResult | None = None
    baseline_search: list[SearchResult] = Field(default_factory=list)
    final: list[FinalRow] = Field(default_factory=list)
    final_model: str | None = None
    timings: dict[str, float] = Field(default_factory=dict)  # seconds per stage
    notes: list[str] = Field(default_factory=list)
