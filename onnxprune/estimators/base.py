"""The estimator interface and its registry.

An estimator answers two questions for each target weight: which entries to drop (`scores`,
higher = keep; on a scale comparable across tensors so a global threshold is meaningful) and how
to change the survivors to make up for it (`compensate`; just zeroing for magnitude).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, ClassVar, Sequence

import torch
from torch import Tensor

from ..registry import Registry

if TYPE_CHECKING:
    from ..bridge.bindings import PrunableTensor
    from ..bridge.convert import TorchModel
    from ..data import Dataset


class Estimator(ABC):
    """Scores weights for pruning and compensates the survivors."""

    name: ClassVar[str]
    summary: ClassVar[str]
    # Whether `prepare` reads calibration data; data-free estimators skip loading it.
    needs_calibration: ClassVar[bool] = False

    def prepare(self, model: TorchModel, targets: Sequence[PrunableTensor], calibration: Dataset | None) -> None:
        """Collect what `scores`/`compensate` need (gradients, activations). Default: nothing."""

    @abstractmethod
    def scores(self, name: str, weight: Tensor) -> Tensor:
        """Saliency of each entry of `weight` (same shape); higher means keep."""

    def compensate(self, name: str, weight: Tensor, keep: Tensor) -> Tensor:
        """New values for `weight` given the keep-mask; pruned entries must be exactly zero."""
        return torch.where(keep, weight, torch.zeros_like(weight))


ESTIMATORS: Registry[type[Estimator]] = Registry("estimator")


def register(cls: type[Estimator]) -> type[Estimator]:
    """Class decorator: add an estimator to the registry under its `name`."""
    return ESTIMATORS.register(cls.name)(cls)
