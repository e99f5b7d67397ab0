"""The cost of a run, said up front: candidates and item evaluations left, and the time they will take.

On a real model every candidate costs minutes, so a user should learn after the first evaluation,
not at the end, whether a configuration runs for ten minutes or ten hours. The plan is the most
each stage can evaluate (its grid or trial count, times the items it scores); pruning, racing,
stopping on collapse and candidates equal to a model already scored only make it smaller, so the
projection is an upper bound. The rate is measured: seconds per item over this run's evaluations.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from exme.progress import format_seconds


@dataclass
class StagePlan:
    """At most ``candidates`` evaluations of ``items`` items each (``None``: the evaluator does not say)."""

    name: str
    candidates: int
    items: int | None


@dataclass
class CostProjection:
    """Counts evaluations as they finish and states what is left (``say`` prints one line)."""

    stages: list[StagePlan]
    say: Callable[[str], None]
    seconds: float = 0.0
    items: int = 0
    evaluations: int = 0
    done: set[str] = field(default_factory=set)
    first_line: str | None = None
    _in_stage: tuple[int, int] = (0, 0)  # evaluations and items since the last finished stage

    def _count(self, items: int) -> None:
        self._in_stage = (self._in_stage[0] + 1, self._in_stage[1] + items)

    def add(self, scores: dict, seconds: float) -> None:
        """One evaluation just finished (``scores`` as a trial stores them); the first one triggers the projection."""
        self.evaluations += 1
        self.seconds += seconds
        n = int(scores["scored"]) if scores.get("scored") is not None else int(sum((scores.get("n_items") or {}).values()))
        self.items += n
        self._count(n)
        if self.evaluations == 1:
            self.first_line = self.line("after the first evaluation")
            self.say(self.first_line)

    def stage_done(self, name: str) -> None:
        """A stage finished: its plan no longer counts; say what is left."""
        self.done.add(name)
        self._in_stage = (0, 0)
        if self.evaluations and any(s.name not in self.done for s in self.stages):
            self.say(self.line(f"after {name}"))

    def remaining(self) -> tuple[int, int | None]:
        """(candidates, item evaluations) at most left; items ``None`` when some stage's count is unknown."""
        left = [s for s in self.stages if s.name not in self.done]
        candidates = max(0, sum(s.candidates for s in left) - self._in_stage[0])
        if any(s.items is None for s in left):
            return candidates, None
        return candidates, max(0, sum(s.candidates * (s.items or 0) for s in left) - self._in_stage[1])

    def line(self, when: str) -> str:
        candidates, items = self.remaining()
        if items is not None and self.items > 0:
            eta = items * self.seconds / self.items
            what = f"at most {candidates} candidates and {items} item evaluations left"
        else:
            eta = candidates * self.seconds / max(1, self.evaluations)
            what = f"at most {candidates} candidates left"
        rate = f"{self.items / self.seconds:.1f} items/s" if self.seconds > 0 and self.items else \
            f"{self.seconds / max(1, self.evaluations):.1f} s per evaluation"
        return f"cost {when}: {what}, about {format_seconds(eta)} at the measured {rate}"


def pipeline_plan(config, n_checkpoints: int, counts: dict[str, int | None]) -> list[StagePlan]:
    """The most each stage of :func:`exme.pipeline.run.run_pipeline` can evaluate.

    ``counts`` holds the items of one evaluation per purpose: ``search``, ``confirm``, ``test``
    (``None`` when unknown; ``confirm`` 0 without a confirm split).
    """
    k = config.top_k
    search, test, confirm = counts.get("search"), counts.get("test"), counts.get("confirm")
    alpha = len(config.alpha.grid) + (8 if config.alpha.refine and len(config.alpha.grid) > 1 else 0)
    merge = (len(config.beta.grid) if config.search.mode == "grid" else config.search.n_trials) if k > 1 else 0
    from exme.merge.registry import baseline_space

    baselines = 0
    for method in config.baselines:
        size = 1
        for values in baseline_space(method, k).values():
            size *= len(values)
        baselines += size
    rows = 1 + 2 * k + 1 + len(config.baselines)
    plan = [
        StagePlan("rank", 1 + n_checkpoints, search),
        StagePlan("extrapolate", k * alpha, search),
        StagePlan("merge", merge, search),
        StagePlan("baselines", baselines, search),
        StagePlan("test", rows, test),
    ]
    if confirm:
        plan.append(StagePlan("confirm", rows, confirm))
    return plan
