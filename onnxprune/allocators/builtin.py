"""The allocations that need nothing but the scores: one global threshold, the same sparsity in
every tensor, and the per-tensor counts of global magnitude pruning."""

from __future__ import annotations

import torch
from torch import Tensor

from ..masks import global_masks, layer_masks, profile_masks
from .base import Allocator, register


@register
class Global(Allocator):
    name = "global"
    summary = "one threshold over all weights on the estimator's scale: layers that matter less lose more"
    auto_candidate = True

    def masks(self, pruner, scored, sparsity, timer) -> dict[int, Tensor]:
        return global_masks(scored.scores, sparsity)

    def uniform(self) -> Allocator:
        return self


@register
class Layer(Allocator):
    name = "layer"
    summary = "every tensor to the same sparsity (uniform)"
    auto_candidate = True

    def masks(self, pruner, scored, sparsity, timer) -> dict[int, Tensor]:
        return layer_masks(scored.scores, sparsity)

    def tensor_mask(self, scores: Tensor, sparsity: float) -> Tensor:
        return layer_masks({0: scores}, sparsity)[0]


@register
class Magnitude(Allocator):
    name = "magnitude"
    summary = (
        "each tensor to the sparsity global magnitude pruning gives it, the entries within it chosen by the "
        "estimator (a split that does not depend on the estimator's scale)"
    )
    auto_candidate = True

    def masks(self, pruner, scored, sparsity, timer) -> dict[int, Tensor]:
        # entries pruned before come first (their magnitude is 0)
        profile = {i: torch.where(scored.keep[i], pruner.views[i].read().abs(), -1.0) for i in scored.scores}
        return profile_masks(scored.scores, sparsity, profile)
