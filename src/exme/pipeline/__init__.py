"""The ExMe pipeline: rank SFT checkpoints, extrapolate, merge, evaluate on test, write the model and report.

``PipelineConfig.from_yaml(path)`` validates a ``PIPELINE.yaml``; ``run_pipeline(config)`` runs it
and returns the :class:`~exme.report.schema.RunResults` it wrote to ``<output>/results.json``.
"""

from exme.pipeline.config import PipelineConfig
from exme.pipeline.run import rank_checkpoints, run_pipeline
from exme.pipeline.stages import exme_coefficients

__all__ = [
    "PipelineConfig",
    "exme_coefficients",
    "rank_checkpoints",
    "run_pipeline",
]
