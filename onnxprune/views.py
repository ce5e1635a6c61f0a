"""The pieces a pruning step is made of: views of the pruned tensors in their canonical order,
one step's scores and statistics (`Scored`), the record of a step, and the memory plan of the
statistics with its exit-8 message."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from .activations import ActivationSource
from .bridge.bindings import PrunableTensor
from .errors import MemoryBudgetError
from .estimators.base import Estimator, Statistics
from .gradients import GradientSource
from .memory import DoesNotFit, MemoryPlan, human, plan_memory


@dataclass(frozen=True)
class StepRecord:
    step: int
    sparsity: float
    gradient_seconds: float
    estimator_seconds: float
    collections: int  # gradient collections this step (groups, twice when statistics are re-collected)


@dataclass
class OneShotResult:
    arrays: dict[str, np.ndarray]
    steps: list[StepRecord] = field(default_factory=list)
    plan: MemoryPlan | None = None


@dataclass
class Scored:
    """One step's scores (and the statistics the update needs), taken at fixed weights and masks."""

    number: int
    label: str
    source: Source
    keep: list[Tensor]  # the masks the statistics were collected with
    scores: dict[int, Tensor] = field(default_factory=dict)
    stats: dict[int, Statistics | None] = field(default_factory=dict)
    # whole channels, where the estimator scores groups: per tensor, each class's saliency
    groups: dict[int, dict[int, float]] = field(default_factory=dict)
    timer: dict[str, float] = field(default_factory=lambda: {"gradients": 0.0, "estimator": 0.0})
    collections: int = 0
    shared: str | None = None  # the reuse key, where these statistics are shared (reuse.py)
    # where each mask was chosen as its tensor was scored (Allocator.tensor_mask): the masks at
    # that sparsity, by tensor; their scores are not kept
    selected: dict[int, Tensor] = field(default_factory=dict)
    selected_at: float | None = None


Source = GradientSource | ActivationSource | None


def activation_source(source: Source) -> ActivationSource:
    """The source of an estimator that reads layer inputs (an internal error otherwise)."""
    if not isinstance(source, ActivationSource):
        raise TypeError(f"the estimator reads layer inputs; its source is a {type(source).__name__}")
    return source


def gradient_source(source: Source) -> GradientSource:
    """The source of an estimator that reads gradients (an internal error otherwise)."""
    if not isinstance(source, GradientSource):
        raise TypeError(f"the estimator reads gradients; its source is a {type(source).__name__}")
    return source


class TensorView:
    """A model weight seen flat in canonical order."""

    def __init__(self, target: PrunableTensor, param: Tensor):
        self.target, self.param = target, param
        # canonical = the ONNX layout with its first two axes swapped (no index arrays: for a
        # 1 GiB tensor they would take 2 GiB each)
        self.swapped = target.swapped
        self.onnx_shape = tuple(param.shape)
        self.canonical_shape = (self.onnx_shape[1], self.onnx_shape[0], *self.onnx_shape[2:]) if self.swapped else None
        self.numel = param.numel()
        self.shape = target.matrix_shape()
        self.kernel = target.kernel  # N:M groups run across input channels at each kernel position

    def to_canonical(self, flat: Tensor) -> Tensor:
        """ONNX-flat → canonical (works on [..., numel] rows too)."""
        return self._swap(flat, self.onnx_shape) if self.swapped else flat

    def to_onnx(self, flat: Tensor) -> Tensor:
        return self._swap(flat, self.canonical_shape) if self.canonical_shape is not None else flat

    @staticmethod
    def _swap(flat: Tensor, shape: tuple[int, ...]) -> Tensor:
        lead = flat.shape[:-1]
        return flat.reshape(*lead, *shape).transpose(len(lead), len(lead) + 1).reshape(*lead, -1)

    def read(self) -> Tensor:
        return self.to_canonical(self.param.detach().reshape(-1).float())

    def write(self, flat: Tensor) -> None:
        with torch.no_grad():
            self.param.copy_(self.to_onnx(flat.to(self.param.device)).reshape(self.param.shape).to(self.param.dtype))


def plan_statistics(
    views: Sequence[TensorView],
    estimator: Estimator,
    count: int,
    budget: int,
    disk_free: int,
    owners: Sequence[int] | None = None,
) -> MemoryPlan:
    """The statistics' memory plan for `count` gradients (`owners`: the rank that builds each
    tensor's statistics under torchrun's tensor split, see memory.plan_memory); MemoryBudgetError,
    with a setting that fits, when a tensor cannot."""
    needs = [estimator.memory(v.shape, count) for v in views]
    try:
        return plan_memory(needs, budget, estimator.compensates, disk_free, owners)
    except DoesNotFit as failure:
        view = views[failure.index]
        raise MemoryBudgetError(
            f"{estimator.name} needs about {human(failure.need)} for tensor {view.target.name!r} "
            f"({view.numel:,} weights, {count} gradients), more than the {human(budget)} allowed "
            f"(--max-memory); {_suggestion(estimator, view.shape, count, budget)}"
        ) from None


def _suggestion(estimator: Estimator, shape: tuple[int, int], count: int, budget: int) -> str:
    if "block_size" in estimator.reads:  # WoodFisher, SparseGPT: try smaller blocks
        blocked: Any = estimator
        size = blocked.block_size
        original = size
        while size > 8:
            size //= 2
            blocked.block_size = size
            fits = estimator.memory(shape, count).alone <= budget
            blocked.block_size = original
            if fits:
                return f"try --block-size {size}"
    for fewer in (count // 2, count // 4, count // 8):
        if fewer >= 8 and estimator.memory(shape, fewer).alone <= budget:
            return f"try --num-grads {fewer}"
    return "raise --max-memory or exclude the largest tensors with --exclude"
