"""Structured masks inside a Pruner: the estimator's entry saliencies summed per class of
channels, the classes chosen by the allocation, the keep-masks covering every entry of every
removed class (so the torch model computes what the physically smaller graph computes)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from ..allocators.base import Allocator
from .remove import class_totals, keep_masks
from .select import choose_classes, removed_classes
from .trace import ChannelGraph

if TYPE_CHECKING:
    from ..oneshot import Pruner, Scored


class ChannelConstraint(Allocator):
    """Removes whole classes of channels; `allocation` splits them across layers (select.py)."""

    name = "channels"
    summary = "whole channels, by class"

    def __init__(self, graph: ChannelGraph, allocation: str):
        self.graph, self.allocation = graph, allocation
        self.removed: set[int] = set()

    def masks(self, pruner: Pruner, scored: Scored, sparsity: float, timer: dict[str, float]) -> dict[int, Tensor]:
        views = pruner.views
        shapes = {v.target.name: v.onnx_shape for v in views}
        # entries pruned before score -1: they count as 0 towards their class
        values = {
            views[i].target.name: views[i].to_onnx(s.clamp(min=0)).reshape(views[i].onnx_shape).cpu().numpy()
            for i, s in scored.scores.items()
        }
        before = {name: mask.cpu().numpy() for name, mask in pruner.masks().items()}
        already = frozenset(removed_classes(self.graph, before))
        totals = class_totals(self.graph, values)
        self.removed = choose_classes(self.graph, totals, shapes, sparsity, self.allocation, already)
        masks = keep_masks(self.graph, shapes, self.removed)
        out = {}
        for i, view in enumerate(views):
            mask = masks.get(view.target.name)
            if mask is None:
                out[i] = torch.ones(view.numel, dtype=torch.bool)
            else:
                out[i] = view.to_canonical(torch.from_numpy(np.ascontiguousarray(mask)).reshape(-1))
        return out
