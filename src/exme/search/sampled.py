"""Strategies that suggest points one at a time from the history: an Optuna sampler behind ask and tell.

Where a grid strategy (:mod:`exme.search.strategy`) is handed a finite list of points, a sampled
strategy searches a box of continuous parameters: it asks its sampler for a point, has it scored,
tells the score, and repeats until the study holds ``n_trials`` finished trials. The history the
sampler reads is the study's (every worker's trials, and those of a run that was interrupted),
and the seed of each suggestion comes from :meth:`exme.search.study.StudyTrials.seed` (the seed
mixed with the number of finished trials), so the search is a pure function of its history:
resumed or not, the same inputs give the same suggestions.

Claims, heartbeats, recording and reading back live in :class:`~exme.search.study.StudyTrials`;
a sampled strategy only says which sampler draws the points (:meth:`Sampled.sampler`), so a new
one is one subclass in one file: :class:`exme.search.tpe.TPE`, :class:`exme.search.cmaes.CmaEs`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Protocol

import optuna

from exme.search.strategy import Outcome
from exme.search.study import Point, Record


class Trials(Protocol):
    """What a sampled strategy needs from the study (:class:`exme.search.study.StudyTrials`)."""

    def start(self, params: dict[str, float]) -> None: ...
    def sync(self) -> tuple[int, int]: ...
    def seed(self, seed: int) -> int: ...
    def wait(self) -> None: ...
    def ask(self, sampler: optuna.samplers.BaseSampler,
            distributions: dict[str, optuna.distributions.BaseDistribution]) -> optuna.trial.Trial: ...
    def tell(self, trial: optuna.trial.Trial, point: Point) -> Record: ...
    def records(self) -> list[Record]: ...


@dataclass(frozen=True)
class Sampled:
    """Points drawn by :meth:`sampler` until the study holds ``n_trials`` finished trials.

    ``distributions``: the box searched; ``to_params``: a drawn point as the candidate reads it (fixed
    parameters added, say); ``start``: the first trial's parameters in a new study (a known good point,
    so the search never ends below it). Several workers may share the study; it may then end with up
    to one extra trial per worker (each asks while the count is below ``n_trials``), and their trials
    are not one worker's sequence (a worker asking while another evaluates is seeded apart from it;
    two asking at the same moment are given the same point, which one evaluates and the other reads).
    """

    distributions: Mapping[str, optuna.distributions.BaseDistribution]
    n_trials: int
    seed: int
    to_params: Callable[[dict[str, float]], dict[str, Any]] = dict
    start: dict[str, float] | None = None

    #: The name a configuration gives this strategy (``alpha.sampler``), and the one the report prints.
    name = "sampled"
    title = "sampled"

    def sampler(self, seed: int) -> optuna.samplers.BaseSampler:
        """The sampler of one suggestion, seeded by the study's rule."""
        raise NotImplementedError

    @classmethod
    def missing(cls) -> str | None:
        """What must be installed before this strategy can run (said when a configuration names it), or ``None``."""
        return None

    def run(self, trials: Trials) -> Outcome:
        if self.start is not None:
            trials.start(self.start)
        while True:
            finished, running = trials.sync()
            if finished >= self.n_trials:
                break
            if finished + running >= self.n_trials:  # other workers hold the last trials: wait for them
                trials.wait()
                continue
            trial = trials.ask(self.sampler(trials.seed(self.seed)), dict(self.distributions))
            trials.tell(trial, Point(self.to_params(dict(trial.params))))
        return Outcome(trials.records())


def sampled_strategies() -> dict[str, type[Sampled]]:
    """The sampled strategies a configuration can name (``alpha.sampler``): a new one is added here."""
    from exme.search.cmaes import CmaEs
    from exme.search.tpe import TPE

    return {s.name: s for s in (TPE, CmaEs)}
