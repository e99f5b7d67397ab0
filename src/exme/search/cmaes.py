"""CMA-ES (Optuna's ``CmaEsSampler`` on the ``cmaes`` package) as a sampled search strategy."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import optuna

from exme.search.sampled import Sampled


@dataclass(frozen=True)
class CmaEs(Sampled):
    """CMA-ES: a Gaussian around a mean that moves toward the better points of each generation.

    Its mean starts at ``start`` (the global optimum, for per-module α) rather than the box's centre,
    so the search refines the point the earlier stages found; Optuna keeps the optimizer's state in
    the study's trials, so a resumed search or a second worker carries on the same generations.
    """

    name = "cmaes"
    title = "CMA-ES"

    @classmethod
    def missing(cls) -> str | None:
        try:
            import cmaes  # noqa: F401  (Optuna's CmaEsSampler imports it only when it first samples)
        except ImportError:
            return "needs the cmaes package: pip install cmaes"
        return None

    def sampler(self, seed: int) -> optuna.samplers.BaseSampler:
        start = {k: v for k, v in (self.start or {}).items() if k in self.distributions} or None
        with warnings.catch_warnings():
            # Optuna 4.9 deprecates x0 (to be removed in 6.0) without a replacement that starts the mean at
            # a chosen point; until then it is what makes the search start from the global optimum.
            warnings.simplefilter("ignore", FutureWarning)
            try:
                return optuna.samplers.CmaEsSampler(x0=start, seed=seed)
            except TypeError:  # an Optuna without x0: the mean starts at the box's centre
                return optuna.samplers.CmaEsSampler(seed=seed)


def generation_size(n_params: int) -> int:
    """Trials per CMA-ES generation for ``n_params`` searched values: the ``cmaes`` package's default
    population, 4 + ⌊3 ln d⌋, which Optuna's sampler uses when no ``popsize`` is given."""
    return 4 + math.floor(3 * math.log(max(1, n_params)))


def generation_note(sampler: str, n_trials: int, n_params: int) -> str | None:
    """A note for the report when a CMA-ES search has fewer trials than one generation: its mean then
    never moves, so the search is a Gaussian sample around its start, not an optimization; ``None``
    otherwise (and for every other sampler)."""
    if sampler != CmaEs.name:
        return None
    size = generation_size(n_params)
    if n_trials >= size + 1:  # the start point, then one whole generation, so the mean moves at least once
        return None
    return (f"alpha.n_trials {n_trials} is fewer than one CMA-ES generation ({size} trials for {n_params} α, "
            f"after the start point): its mean never moved, so the per-module α are a Gaussian sample around "
            f"the global optimum; raise alpha.n_trials to a few generations ({3 * size + 1} moves it three times)")
