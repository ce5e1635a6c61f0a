"""Where the torch model runs and what a run may use: the device, a no-gradient runner, the
memory budget of the statistics, finite-value checks and stage timings."""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from .bridge.convert import TorchModel
from .config import PruneConfig
from .errors import NonFiniteError, UsageError
from .memory import GIB, available_bytes

Runner = Callable[[dict[str, np.ndarray]], list[np.ndarray]]


def resolve_device(requested: str) -> torch.device:
    """'auto' → CUDA when usable, else CPU; 'cuda' without a usable GPU is an error, not a CPU run."""
    if requested == "cpu":
        return torch.device("cpu")
    available = torch.cuda.is_available()
    if requested == "cuda" and not available:
        raise UsageError("--device cuda was asked for, but torch sees no usable CUDA device; use --device cpu or auto")
    return torch.device("cuda" if available else "cpu")


def torch_runner(torch_model: TorchModel, device: torch.device) -> Runner:
    """A feeds → outputs function running the torch model without gradients. A failure inside
    the converted model is reported as exit 4, naming the ONNX node that failed."""

    def run(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        inputs = torch_model.inputs(feeds, device)
        try:
            with torch.no_grad():
                outputs = torch_model(*inputs)
        except Exception as exc:
            located = torch_model.locate_failure(*inputs)
            raise (located or exc) from None
        return [o.detach().cpu().numpy() if isinstance(o, torch.Tensor) else np.asarray(o) for o in outputs]

    return run


def memory_budget(config: PruneConfig) -> int:
    """Bytes the estimator's statistics may use: --max-memory, else 80% of what is available."""
    if config.max_memory is not None:
        return int(config.max_memory * GIB)
    return int(0.8 * available_bytes())


def non_finite_output(outputs: Sequence[np.ndarray], names: Sequence[str]) -> str | None:
    """The name of the first float output holding NaN or infinity, if any."""
    for name, out in zip(names, outputs):
        if np.issubdtype(out.dtype, np.floating) and not np.isfinite(out).all():
            return name
    return None


def require_finite(tensor: torch.Tensor, what: str) -> None:
    """NonFiniteError naming `what` when the tensor holds NaN or infinity."""
    if not bool(torch.isfinite(tensor).all()):
        raise NonFiniteError(f"{what} contain NaN or infinite values; nothing was written")


@contextmanager
def timed(timings: dict[str, float], stage: str) -> Iterator[None]:
    """Record in `timings[stage]` the seconds the block took."""
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[stage] = time.perf_counter() - start
