"""Checkpoints in and out: lazy tensor-by-tensor reading of HF model folders, atomic streaming writes."""

from exme.io.checkpoint import Checkpoint, TensorSpec

__all__ = ["Checkpoint", "TensorSpec"]
