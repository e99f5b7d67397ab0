"""A synthetic objective with a known optimum, for testing searches without a benchmark.

The score of a model θ is minus a weighted squared distance to a hidden θ* = θ_b + p₁Δ₁ + p₂Δ₂,
measured in the coordinates of θ − θ_b along Δ₁ and Δ₂ (least squares, float64) plus the part of
θ − θ_b outside their span:

    score(θ) = −[w₁(t₁ − p₁)² + w₂(t₂ − p₂)² + ‖r‖² / ‖Δ₁‖²],   θ − θ_b = t₁Δ₁ + t₂Δ₂ + r.

Why weights: along the pipeline's stages the optimum is then known in closed form. Extrapolating
checkpoint i alone gives θ = θ_b + (1+α)Δᵢ, best at 1 + α = pᵢ; merging the two extrapolated
checkpoints gives t = (β p₁, (1 − β) p₂), best at β = w₁p₁² / (w₁p₁² + w₂p₂²).
"""

from __future__ import annotations

from pathlib import Path

import torch

from exme.evaluate import Scores
from exme.io import Checkpoint


def flat(path: Path, names: list[str]) -> torch.Tensor:
    ckpt = Checkpoint.open(path)
    return torch.cat([ckpt.get(n).double().reshape(-1) for n in names])


class SyntheticEvaluator:
    """``evaluate(model, tokenizer, split, limit)`` → the score above (one task, ``distance``)."""

    def __init__(self, base: Path, sft1: Path, sft2: Path, p1: float, p2: float, w1: float = 1.0, w2: float = 1.0):
        self.names = sorted(Checkpoint.open(base).names)
        self.base = flat(base, self.names)
        self.d1 = flat(sft1, self.names) - self.base
        self.d2 = flat(sft2, self.names) - self.base
        self.p = torch.tensor([p1, p2], dtype=torch.float64)
        self.w = torch.tensor([w1, w2], dtype=torch.float64)
        basis = torch.stack([self.d1, self.d2], dim=1)
        self.basis = basis
        self.gram_inv = torch.linalg.inv(basis.T @ basis)
        self.calls: list[tuple[str, int | None]] = []

    @staticmethod
    def best_beta(p1: float, p2: float, w1: float = 1.0, w2: float = 1.0) -> float:
        return w1 * p1**2 / (w1 * p1**2 + w2 * p2**2)

    def score_vector(self, theta: torch.Tensor) -> float:
        x = theta - self.base
        t = self.gram_inv @ (self.basis.T @ x)
        r = x - self.basis @ t
        return float(-(self.w * (t - self.p) ** 2).sum() - (r @ r) / (self.d1 @ self.d1))

    def evaluate(self, model, tokenizer, split: str, limit: int | None = None) -> Scores:
        self.calls.append((split, limit))
        params = dict(model.named_parameters())
        theta = torch.cat([params[n].detach().double().reshape(-1) if n in params else _tied(model, n) for n in self.names])
        n = 100 if limit is None else min(limit, 100)
        return Scores.from_tasks({"distance": self.score_vector(theta)}, split=split, n_items={"distance": n})


def _tied(model, name: str) -> torch.Tensor:
    return model.state_dict()[name].detach().double().reshape(-1)
