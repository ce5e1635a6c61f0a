"""Errors the tool raises on purpose, each with the process exit code it maps to.

Everything else that escapes is a bug and exits with code 1.
"""

from __future__ import annotations


class OnnxPruneError(Exception):
    """Base class: a failure we understand and can explain to the user."""

    exit_code = 1


class UsageError(OnnxPruneError, ValueError):
    """The options do not make sense together (exit 2)."""

    exit_code = 2


class InvalidModelError(OnnxPruneError):
    """The input is not a valid or not a safe ONNX model (exit 3)."""

    exit_code = 3


class UnsupportedOperatorError(OnnxPruneError):
    """The model uses operators the torch bridge cannot convert (exit 4)."""

    exit_code = 4

    def __init__(self, message: str, missing: list[dict] | None = None):
        super().__init__(message)
        self.missing = missing or []


class CalibrationDataError(OnnxPruneError):
    """Calibration or evaluation data cannot be used with this model (exit 5)."""

    exit_code = 5


class NonFiniteError(OnnxPruneError):
    """A weight, gradient or score is NaN or infinite (exit 7)."""

    exit_code = 7


class MemoryBudgetError(OnnxPruneError):
    """The estimator would need more memory than allowed (exit 8); nothing is written."""

    exit_code = 8


# Exit code 6 is not an exception: the run succeeds, writes its output and report, and the
# caller turns a failed accuracy gate into the exit code (see Report.gate_failed).
EXIT_OK = 0
EXIT_GATE_FAILED = 6


class WriteError(OnnxPruneError):
    """A file could not be written (disk full, permissions); no partial file is left (exit 9)."""

    exit_code = 9


class StructureError(OnnxPruneError):
    """The model with whole channels removed does not compute what the pruned torch model
    computes (a dependency the channel trace missed); nothing is written (exit 10)."""

    exit_code = 10


class BrokenOutputError(OnnxPruneError):
    """The written model fails in onnxruntime on data the original ran: a bug in onnxprune
    (exit 1, as any bug, but with a message saying so); nothing is written."""

    exit_code = 1


class SpeedTargetError(OnnxPruneError):
    """--target-speedup cannot be reached: removing every removable channel is measured slower
    than the target; nothing is written (exit 11)."""

    exit_code = 11
