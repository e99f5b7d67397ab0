"""exme: Extrapolation Merging (ExMe, Lin et al. 2025, arXiv 2503.04834).

A base model θ_b and SFT checkpoints θ_i (task vectors Δ_i = θ_i − θ_b) become

    θ* = θ_b + β(1+α₁)Δ₁ + (1−β)(1+α₂)Δ₂

with α (extrapolation) and β (merge weight) chosen by evaluation on a dev split.
"""

from exme.errors import ExmeError

__all__ = ["ExmeError", "__version__"]
__version__ = "0.1.0"
