"""Merge methods (pure tensor math in :mod:`exme.merge.methods`) and the streaming merge engine."""
