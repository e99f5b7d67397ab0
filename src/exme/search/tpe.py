"""TPE (Optuna's Tree-structured Parzen Estimator, multivariate) as a sampled search strategy."""

from __future__ import annotations

from dataclasses import dataclass

import optuna

from exme.search.sampled import Sampled


@dataclass(frozen=True)
class TPE(Sampled):
    """A multivariate TPE search: a model of good and bad regions of the box, refit on every finished
    trial, so it suits the small budgets of a joint (α, weights) search and of per-module α."""

    name = "tpe"
    title = "TPE"

    def sampler(self, seed: int) -> optuna.samplers.BaseSampler:
        return optuna.samplers.TPESampler(seed=seed, multivariate=True)
