"""onnxprune: ONNX-to-ONNX pruning with second-order estimators, validated in onnxruntime.

Public API: `prune(...) -> Report` (a PruneConfig, or the command line's arguments as keywords),
`plan(...)` (the dry run), `sweep(SweepConfig(...))`, the estimator registry, and the error types.
"""

__version__ = "0.1.0"

from .config import PruneConfig  # noqa: E402
from .dryrun import plan  # noqa: E402
from .errors import (  # noqa: E402
    CalibrationDataError,
    InvalidModelError,
    NonFiniteError,
    OnnxPruneError,
    UnsupportedOperatorError,
    UsageError,
    WriteError,
)
from .estimators import ESTIMATORS, Estimator  # noqa: E402
from .pipeline import prune  # noqa: E402
from .report import Report  # noqa: E402
from .sweeps import SweepConfig, sweep  # noqa: E402

__all__ = [
    "prune",
    "plan",
    "sweep",
    "SweepConfig",
    "PruneConfig",
    "Report",
    "ESTIMATORS",
    "Estimator",
    "OnnxPruneError",
    "UsageError",
    "InvalidModelError",
    "UnsupportedOperatorError",
    "CalibrationDataError",
    "NonFiniteError",
    "WriteError",
]
