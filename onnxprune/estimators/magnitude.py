"""Magnitude pruning: drop the smallest |w|. The baseline every comparison must show."""

from __future__ import annotations

from torch import Tensor

from .base import Estimator, Statistics, register


@register
class Magnitude(Estimator):
    name = "magnitude"
    summary = "drop the entries of smallest absolute value; no data, no compensation"

    def scores(self, weight: Tensor, stats: Statistics | None) -> Tensor:
        return weight.abs()
