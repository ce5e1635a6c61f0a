"""Where the torch model runs and what a run may use: the device, a no-gradient runner, the
memory budget of the statistics, finite-value checks and stage timings."""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from . import distributed
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


@contextmanager
def reproducible(device: torch.device) -> Iterator[None]:
    """On CUDA, full float32 arithmetic (cuDNN's convolutions use TF32 by default, about 1e-3
    relative: the conversion check measured 5e-4 to 2e-3 on onnx's backend models) and cuDNN's
    deterministic algorithms (the same seed gives the same gradients, so the same masks); the
    settings are restored afterwards. Nothing changes on the CPU."""
    if device.type != "cuda":
        yield
        return
    cudnn = torch.backends.cudnn
    conv = getattr(cudnn, "conv", None)
    if conv is not None and not hasattr(conv, "fp32_precision"):
        conv = None  # before torch 2.9: the legacy flag
    saved = (conv.fp32_precision if conv is not None else cudnn.allow_tf32, cudnn.deterministic, cudnn.benchmark)
    matmul = torch.get_float32_matmul_precision()  # a caller's "high" would allow TF32 in products
    torch.set_float32_matmul_precision("highest")
    if conv is not None:
        conv.fp32_precision = "ieee"
    else:
        cudnn.allow_tf32 = False
    cudnn.deterministic, cudnn.benchmark = True, False
    try:
        yield
    finally:
        if conv is not None:
            conv.fp32_precision = saved[0]
        else:
            cudnn.allow_tf32 = saved[0]
        cudnn.deterministic, cudnn.benchmark = saved[1], saved[2]
        torch.set_float32_matmul_precision(matmul)


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
    """Bytes the estimator's statistics may use in this process: --max-memory, else 80% of what is
    available, shared between the torchrun ranks on this machine. Under torchrun every rank gets
    the smallest rank's budget: the memory plan's groups decide which gradients are exchanged
    together, so they must be the same on every rank."""
    if config.max_memory is not None:
        budget = int(config.max_memory * GIB)
    else:
        budget = int(0.8 * available_bytes()) // distributed.local_ranks()
    return distributed.least(budget)


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
