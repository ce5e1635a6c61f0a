"""Estimators, one module each, all registered in ESTIMATORS on import."""

from . import diagonal, fishleg, layerwise, magnitude, woodfisher  # noqa: F401  (register)
from .base import ESTIMATORS, Estimator, MemoryNeed, Statistics, register

DEFAULT_METHOD = "woodfisher"
# --method auto: every estimator that fits is tried on held-out calibration samples (searches.resolve_method)
METHOD_AUTO = "auto"

__all__ = ["ESTIMATORS", "Estimator", "MemoryNeed", "Statistics", "register", "DEFAULT_METHOD", "METHOD_AUTO"]
