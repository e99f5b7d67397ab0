"""The shape of ``results.json``: what a pipeline run found, in one validated document.

The pipeline fills it stage by stage; the report renders it; ``exme report RUN_DIR`` re-renders it
later. Keeping it a typed model (not a loose dict) means a report can never silently miss a field the
pipeline forgot to write, and old run folders are checked when they are read back.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SplitScores(_Strict):
    """Scores of one model on one split: the weighted mean over tasks and each task's score."""

    overall: float
    tasks: dict[str, float]
    n_items: dict[str, int] = Field(default_factory=dict)
    # Each item's score by task and item id (task -> {id: score}); empty when the evaluator cannot
    # give them. When two models both have them, comparisons are paired (same items), which is
    # tighter and more honest than treating the two accuracies as independent. A list (results of
    # an older version) is read as ids 0, 1, ...
    per_item: dict[str, dict[str, float]] = Field(default_factory=dict)
    # Per generative task: mean_new_tokens, hit_limit, no_stop (shares), n (collapse detection).
    generation: dict[str, dict[str, float]] = Field(default_factory=dict)

    @field_validator("per_item", mode="before")
    @classmethod
    def _ids(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return {t: ({str(i): v for i, v in enumerate(items)} if isinstance(items, list) else items)
                    for t, items in value.items()}
        return value


class RankedCheckpoint(_Strict):
    """One SFT checkpoint of the rank stage."""

    name: str
    path: str
    step: int | None = None
    dev: SplitScores
    kept: bool = False
    stopped_early: bool = False  # raced out: ``dev`` holds only the chunks of search items it was scored on


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
    dev: SplitScores | None = None  # the search part of dev (all of dev without a confirm split)
    test: SplitScores
    confirm: SplitScores | None = None  # scored once, after every choice was made
    collapsed: bool = False  # generations hit the token limit far more often than the best SFT's
    failed: str | None = None  # why the candidate could not be scored (e.g. non-finite weights)


class Comparison(_Strict):
    """``a − b`` on one split, paired over items (``task`` is ``"overall"`` for the weighted score)."""

    a: str
    b: str
    split: str  # "test" | "confirm"
    task: str
    n: int
    diff: float
    se: float
    ci_low: float
    ci_high: float
    p_value: float
    test: str = "sign-flip"  # "mcnemar" | "sign-flip"
    mdd: float | None = None  # smallest difference detectable with 80% power on these items (None: undefined)
    verdict: str = "no detectable difference"
    # Holm-adjusted p across the family this comparison belongs to (ExMe vs every reference on the same
    # split and task) and that family's size; the verdict reads the adjusted p. None in older results.
    p_holm: float | None = None
    family: int | None = None
    n_disagree: int | None = None  # items on which the two models' scores differ (0: nothing tells them apart)


class Recommendation(_Strict):
    """The model to use: the best confirm score (ExMe only if its paired confirm gain is positive)."""

    name: str
    path: str | None = None
    reason: str


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
    module_search: SearchResult | None = None  # α per group of tensors (alpha.granularity module or layers:N)
    final: list[FinalRow] = Field(default_factory=list)
    final_model: str | None = None
    timings: dict[str, float] = Field(default_factory=dict)  # seconds per stage
    notes: list[str] = Field(default_factory=list)
    comparisons: list[Comparison] = Field(default_factory=list)
    recommended: Recommendation | None = None
    # The search/confirm division of dev: rule (seed, fraction) and the item ids of each part.
    dev_split: dict[str, Any] = Field(default_factory=dict)
    collapse: dict[str, Any] = Field(default_factory=dict)  # margin, flagged rows, evaluations saved
    threads: int | None = None  # torch threads the run used
    # Evaluations run (``evaluations``), candidates that read an equal model's score (``shared``), and
    # items scored per purpose (``items``: search, confirm, test), over every worker and resume.
    evaluations: dict[str, Any] = Field(default_factory=dict)
    rescore: dict[str, Any] | None = None  # exme.evaluate.determinism.Rescore: items changed when re-scored
