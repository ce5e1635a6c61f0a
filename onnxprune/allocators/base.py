"""The allocation interface and its registry.

An allocator turns one step's scores (one tensor of saliencies per pruned weight, higher = keep,
entries pruned before at -1) into keep-masks with exactly the step's share of the weights pruned:
it decides how many entries each tensor loses; the scores decide which.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, ClassVar

from torch import Tensor

from ..registry import Registry

if TYPE_CHECKING:
    from ..oneshot import Pruner, Scored


class Allocator(ABC):
    """Splits a step's sparsity across tensors."""

    name: ClassVar[str]
    summary: ClassVar[str]
    # Whether --allocation auto compares it (on held-out calibration samples).
    auto_candidate: ClassVar[bool] = False
    # Whether it measures the model's loss (Pruner.evaluate) while choosing.
    needs_evaluation: ClassVar[bool] = False
    # Whether the statistics are kept for the masks (not only for the update).
    reads_statistics: ClassVar[bool] = False

    def tensor_mask(self, scores: Tensor, sparsity: float) -> Tensor | None:
        """The keep-mask of one tensor from its scores alone, where this allocation looks at one
        tensor at a time (None: it needs every tensor's scores). The pruner then chooses each
        mask as soon as the tensor is scored and never holds all the scores (a large model's
        float scores would otherwise take as much memory as its weights)."""
        return None

    @abstractmethod
    def masks(self, pruner: Pruner, scored: Scored, sparsity: float, timer: dict[str, float]) -> dict[int, Tensor]:
        """Keep-masks by tensor index, `sparsity` of all entries pruned (those pruned before stay
        pruned); time spent measuring is added to timer["estimator"]."""

    def uniform(self) -> Allocator:
        """The allocator used under an N:M pattern, which is the same in every tensor: the
        per-tensor split unless this one is the global threshold."""
        return ALLOCATORS.get("layer")()


ALLOCATORS: Registry[type[Allocator]] = Registry("allocation")


def register(cls: type[Allocator]) -> type[Allocator]:
    """Class decorator: add an allocator to the registry under its `name`."""
    return ALLOCATORS.register(cls.name)(cls)
