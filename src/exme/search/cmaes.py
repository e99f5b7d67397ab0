"""CMA-ES (Optuna's ``CmaEsSampler`` on the ``cmaes`` package) as a sampled search strategy."""

from __future__ import annotations

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
