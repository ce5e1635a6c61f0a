"""Structured masks inside a Pruner: the estimator's saliency of each class of channels (its
OBS group saliency where the estimator has one, else its entry saliencies summed per class),
the classes chosen by the allocation, the keep-masks covering every entry of every removed
class (so the torch model computes what the physically smaller graph computes)."""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import TYPE_CHECKING, Callable, Mapping

import numpy as np
import torch
from torch import Tensor

from ..allocators.base import Allocator
from .graph import ChannelGraph
from .latency import LatencyTable, choose_by_losses, choose_for_latency, least_salient
from .remove import class_totals, keep_masks
from .select import choose_classes, removed_classes

# With --target-speedup the schedule runs towards this nominal sparsity, and a step at sparsity
# s aims at the speed-up 1 + (s / SPEED_SCHEDULE_END) · (target − 1).
SPEED_SCHEDULE_END = 0.9
# timings of a whole choice in the search for the shallowest one that meets the goal
SPEED_ROUNDS = 4

log = logging.getLogger("onnxprune")

if TYPE_CHECKING:
    from ..oneshot import Pruner, Scored


# a target latency in ms -> (the classes to remove, their predicted latency)
Chooser = Callable[[float], tuple[set[int], float]]


def step_goal(sparsity: float, speedup: float) -> float:
    """The speed-up a schedule step at `sparsity` aims at, towards the target `speedup`."""
    return 1.0 + min(1.0, sparsity / SPEED_SCHEDULE_END) * (speedup - 1.0)


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
        self.rankings: list[dict] = []  # per step: group or summed saliencies, by held-out loss

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
        # where the estimator scores whole groups (OBS group saliency) those replace the sums
        grouped = {views[i].target.name for i in scored.groups}
        totals = class_totals(self.graph, {n: v for n, v in values.items() if n not in grouped})
        for group_totals in scored.groups.values():
            for root, value in group_totals.items():
                totals[root] += value
        if self.latency is not None and self.speedup is not None:
            goal = step_goal(sparsity, self.speedup)
            table = self.latency
            # each group's widths measured on held-out samples where the pruner can evaluate
            losses = group_losses(pruner, self.graph, table, totals, shapes, already) if pruner.evaluate else None

            def choose(target_ms: float) -> tuple[set[int], float]:
                if losses is None:
                    return choose_for_latency(self.graph, totals, table, target_ms, already)
                return choose_by_losses(self.graph, totals, table, losses, target_ms, already)

            self.removed = self._for_speedup(table, choose, goal, already)
        else:
            self.removed = choose_classes(self.graph, totals, shapes, sparsity, self.allocation, already)
            if scored.groups and pruner.evaluate is not None:
                summed = class_totals(self.graph, values)
                other = choose_classes(self.graph, summed, shapes, sparsity, self.allocation, already)
                self.removed = self._ranking(pruner, scored, shapes, self.removed, other)
        return dict(enumerate(canonical_keeps(self.graph, views, shapes, self.removed)))

    def _ranking(
        self, pruner: Pruner, scored: Scored, shapes: Mapping[str, tuple[int, ...]], group: set[int], summed: set[int]
    ) -> set[int]:
        """Of the classes chosen by group saliency and by summed entry saliencies, those whose
        removal leaves the smaller held-out loss (masks only; ties: group saliency). Neither
        ranks better everywhere: group saliency kept the CNN at 0.956 with 75% of its removable
        parameters gone where the sums kept 0.947, but halving MiniLM's FFNs kept cosine 0.901
        where the sums kept 0.941."""
        if group == summed:
            losses = None
        else:
            with masked_losses(pruner, self.graph, shapes) as loss_without:
                losses = (loss_without(group), loss_without(summed))
        chosen = "summed" if losses is not None and losses[1] < losses[0] else "group"
        record = {"step": scored.number, "chosen": chosen, "same": losses is None}
        if losses is not None:
            record["losses"] = {"group": round(losses[0], 8), "summed": round(losses[1], 8)}
        self.rankings.append(record)
        log.info("step %d: classes ranked by %s saliency (held-out loss: %s)", scored.number, chosen, losses)
        return summed if chosen == "summed" else group

    def _for_speedup(
        self,
        table: LatencyTable,
        choose: Chooser,
        goal: float,
        already: frozenset[int],
    ) -> set[int]:
        """The least salient classes whose removal is measured at least `goal` times faster. The
        latency table predicts additively, which is only a model (a convolution's cost falls with
        both its input and its output channels), so each choice is timed as a whole and the
        predicted-latency target searched: deeper by the shortfall while no choice has met the
        goal, shallower by the margin while every one has, then halfway between the deepest
        target that fell short and the shallowest that met it (SPEED_ROUNDS timings). The
        shallowest choice that met the goal stands, else the deepest tried."""
        target_ms = table.dense_ms / goal
        met: tuple[float, set[int]] | None = None  # (target, choice) that met the goal, shallowest
        short: float | None = None  # the deepest target whose choice fell short
        deepest: set[int] = set(already)
        for _ in range(SPEED_ROUNDS):
            removed, predicted = choose(target_ms)
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
                if met is None or target_ms > met[0]:
                    met = (target_ms, removed)
            else:
                short = target_ms if short is None else min(short, target_ms)
                deepest = removed if len(removed) >= len(deepest) else deepest
            if met is not None and short is not None:
                target_ms = (met[0] + short) / 2
            else:
                target_ms *= measured / goal
        return met[1] if met is not None else deepest


def group_losses(
    pruner: Pruner,
    graph: ChannelGraph,
    table: LatencyTable,
    totals: Mapping[int, float],
    shapes: Mapping[str, tuple[int, ...]],
    already: frozenset[int],
) -> list[dict[int, float]]:
    """Per latency group, its measured loss increase on held-out calibration samples with each
    of the table's counts of its classes gone (its least salient first, the other groups as
    before this step; masks only, the weights put back after)."""
    gone = {graph.find(r) for r in already}
    curves = []
    with masked_losses(pruner, graph, shapes) as loss_without:
        base = loss_without(set(gone))
        with pruner.progress.task("latency choice: loss of each group's widths", len(table.groups), "groups") as task:
            for group in table.groups:
                order = least_salient(group.classes, totals, gone)
                done = len(group.classes) - len(order)
                curve = {n: loss_without(gone | set(order[: n - done])) - base for n in group.counts if n > done}
                curves.append(curve)
                task.advance()
    return curves


@contextmanager
def masked_losses(pruner: Pruner, graph: ChannelGraph, shapes: Mapping[str, tuple[int, ...]]):
    """A function giving the held-out loss with a set of classes removed (masks only, from the
    weights as they are now), the weights put back on exit, even when an evaluation fails."""
    views = pruner.views
    originals = [view.read().clone() for view in views]

    def loss_without(removed: set[int]) -> float:
        for view, original, keep in zip(views, originals, canonical_keeps(graph, views, shapes, removed)):
            view.write(torch.where(keep.to(original.device), original, 0.0))
        return pruner.evaluate()  # type: ignore[misc]

    try:
        yield loss_without
    finally:
        for view, original in zip(views, originals):
            view.write(original)


def class_entries(graph: ChannelGraph, view) -> dict[int, Tensor]:
    """Per removable class, the canonical flat indices of the entries of `view`'s tensor its
    removal deletes (rows, columns or slices along any axis an edit cuts; each entry once)."""
    classes = graph.classes()
    numel, shape = view.numel, view.onnx_shape
    # canonical position -> ONNX flat index, inverted: ONNX flat index -> canonical position
    to_canonical = torch.empty(numel, dtype=torch.long)
    to_canonical[view.to_canonical(torch.arange(numel))] = torch.arange(numel)
    grid = np.arange(numel).reshape(shape)
    parts: dict[int, list[np.ndarray]] = {}
    for edit in graph.edits:
        if edit.initializer != view.target.name:
            continue
        for position, element in enumerate(edit.labels):
            root = graph.find(element)
            if root in classes:
                parts.setdefault(root, []).append(np.take(grid, position, axis=edit.axis).reshape(-1))
    return {root: to_canonical[torch.from_numpy(np.unique(np.concatenate(p)))] for root, p in parts.items()}


def canonical_keeps(graph: ChannelGraph, views, shapes: Mapping[str, tuple[int, ...]], removed) -> list[Tensor]:
    """Each view's keep-mask (canonical layout, flat) with the `removed` classes gone."""
    masks = keep_masks(graph, shapes, removed)
    keeps = []
    for view in views:
        mask = masks.get(view.target.name)
        if mask is None:
            keeps.append(torch.ones(view.numel, dtype=torch.bool))
        else:
            keeps.append(view.to_canonical(torch.from_numpy(np.ascontiguousarray(mask)).reshape(-1)))
    return keeps
