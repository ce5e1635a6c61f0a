"""Sensitivity allocation: per-tensor sparsities from measured loss curves (see allocation.py)."""

from __future__ import annotations

import math
import time

import torch
from torch import Tensor

from ..allocation import GRID, choose_sparsities, exact_counts
from ..masks import keep_lowest_pruned, prune_count
from .base import Allocator, register


@register
class Sensitivity(Allocator):
    name = "sensitivity"
    summary = (
        "per-tensor sparsities minimising the measured loss increase (each tensor pruned alone at several "
        "sparsities, the model run on held-out calibration samples)"
    )
    needs_evaluation = True
    reads_statistics = True

    def masks(self, pruner, scored, sparsity, timer) -> dict[int, Tensor]:
        """Each tensor alone is pruned at the grid's sparsities by the estimator (with its update
        when the statistics are at hand) and the model run on held-out calibration samples; the
        per-tensor counts minimise the summed loss increase."""
        started = time.perf_counter()
        base = pruner.evaluate()
        numels = [view.numel for view in pruner.views]
        already = [int((~keep).sum()) for keep in scored.keep]
        curves = []
        with pruner.progress.task(f"sensitivity, {scored.label}", len(pruner.views), "tensors") as task:
            for i in range(len(pruner.views)):
                curves.append(loss_curve(pruner, scored, i, already[i], base))
                task.advance()
        fractions = choose_sparsities(curves, numels, sparsity)
        counts = exact_counts(numels, fractions, prune_count(sum(numels), sparsity), lower=already)
        timer["estimator"] += time.perf_counter() - started
        return {i: keep_lowest_pruned(scored.scores[i], counts[i]) for i in range(len(pruner.views))}


def loss_curve(pruner, scored, i: int, already: int, base: float) -> list[float]:
    """Tensor i's loss increase at each GRID sparsity, pruned alone (its weights put back after)."""
    view, estimator = pruner.views[i], pruner.estimator
    original = view.read().clone()
    stats = scored.stats.get(i)
    curve = []
    for fraction in GRID:
        count = prune_count(view.numel, fraction)
        if count <= already:
            curve.append(0.0 if count == already else math.inf)
            continue
        keep = keep_lowest_pruned(scored.scores[i], count) & scored.keep[i]
        new = original
        if stats is not None or not estimator.compensates:
            new, keep = estimator.prune(original, keep, stats, ~scored.keep[i])
        view.write(torch.where(keep.to(new.device), new.float(), 0.0))
        curve.append(pruner.evaluate() - base)
    view.write(original)
    return curve
