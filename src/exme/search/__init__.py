"""Candidates applied in place on one live model, and the studies that record every evaluation."""

from exme.search.live import LiveModel
from exme.search.study import Point, Record, StudyStore, best, successive_halving

__all__ = ["LiveModel", "Point", "Record", "StudyStore", "best", "successive_halving"]
