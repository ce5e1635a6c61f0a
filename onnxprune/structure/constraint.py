"""Structured masks inside a Pruner: the estimator's entry saliencies summed per class of
channels, the classes chosen by the allocation, the keep-masks covering every entry of every
removed class (so the torch model computes what the physically smaller graph computes)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from ..allocators.base import Allocator
from .latency import LatencyTable, choose_for_latency
from .remove import class_totals, keep_masks
from .select import choose_classes, removed_classes
from .trace import ChannelGraph

# With --target-speedup the schedule runs towards this nominal sparsity, and a step at sparsity
# s aims at the speed-up 1 + (s / SPEED_SCHEDULE_END) · (target − 1).
SPEED_SCHEDULE_END = 0.9
# rounds of timing a whole choice and tightening the prediction when it falls short
SPEED_ROUNDS = 3

if TYPE_CHECKING:
    from ..oneshot import Pruner, Scored


class ChannelConstraint(Allocator):
    """Removes whole classes of channels; `allocation` splits them across layers (select.py)."""

    name = "channels"
    summary = "whole channels, by class"

    def __init__(
        self, graph: ChannelGraph, allocation: str, latency: LatencyTable | None = None, speedup: float | None = None
    ):
        self.graph, self.allocation = graph, allocation
        self.latency, self.speedup = latency, speedup
        self.removed: set[int] = set()
        self.rounds: list[dict] = []  # with --target-speedup: each timed choice

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
        if self.latency is not None and self.speedup is not None:
            goal = 1.0 + min(1.0, sparsity / SPEED_SCHEDULE_END) * (self.speedup - 1.0)
            self.removed = self._for_speedup(self.latency, totals, goal, already)
        else:
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

    def _for_speedup(
        self, table: LatencyTable, totals: dict[int, float], goal: float, already: frozenset[int]
    ) -> set[int]:
        """The least salient classes whose removal is measured at least `goal` times faster: the
        latency table's choice, timed as a whole and the prediction tightened by the shortfall
        (SPEED_ROUNDS times at most; the last choice stands and the report shows its speed-up)."""
        target_ms = table.dense_ms / goal
        removed: set[int] = set(already)
        for _ in range(SPEED_ROUNDS):
            removed, predicted = choose_for_latency(self.graph, totals, table, target_ms, already)
            measured = table.speedup_of(removed)
            self.rounds.append(
                {
                    "goal": round(goal, 4),
                    "predicted": round(table.dense_ms / max(predicted, 1e-9), 4),
                    "measured": round(measured, 4),
                    "classes": len(removed),
                }
            )
            if measured >= goal:
                break
            target_ms *= measured / goal
        return removed
