"""Estimators, one module each, all registered in ESTIMATORS on import."""

from . import magnitude  # noqa: F401  (registers)
from .base import ESTIMATORS, Estimator, register

DEFAULT_METHOD = "magnitude"

__all__ = ["ESTIMATORS", "Estimator", "register", "DEFAULT_METHOD"]
