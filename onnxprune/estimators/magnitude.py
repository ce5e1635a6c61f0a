"""Magnitude pruning: drop the smallest |w|. The baseline every comparison must show."""

from __future__ import annotations

from torch import Tensor

from .base import Estimator, register


@register
class Magnitude(Estimator):
    name = "magnitude"
    summary = "drop the entries of smallest absolute value; no data, no compensation"

    def scores(self, name: str, weight: Tensor) -> Tensor:
        return weight.abs()
