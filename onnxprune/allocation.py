"""How many entries each tensor loses: pure functions from per-tensor loss curves to counts.

`sensitivity` allocation measures, for every tensor alone, the loss increase at several sparsities
(the estimator's own pruning and update, the model run on held-out calibration samples), then
picks one sparsity per tensor so that the total estimated loss is smallest with at least the
target number of entries pruned (a multiple-choice knapsack, solved by dynamic programming over a
discretised budget). The counts are then made to sum exactly to the target, to the element.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

# Sparsities at which each tensor's loss curve is measured.
GRID = (0.0, 0.2, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98)
# Budget units of the knapsack: the target is met to 1/UNITS of the weights, then exactly by counts.
UNITS = 2000


def exact_counts(
    numels: Sequence[int], fractions: Sequence[float], total: int, lower: Sequence[int] | None = None
) -> list[int]:
    """Per-tensor prune counts near `fractions`·`numels` that sum to exactly `total`, each within
    [lower, numel] (`lower`: entries already pruned). Rounding goes by largest remainder."""
    limits = np.array(numels, dtype=np.int64)
    floor = np.zeros_like(limits) if lower is None else np.array(lower, dtype=np.int64)
    if not int(floor.sum()) <= total <= int(limits.sum()):
        raise ValueError(f"cannot prune {total} entries: between {int(floor.sum())} and {int(limits.sum())} possible")
    wanted = np.array([f * n for f, n in zip(fractions, numels)], dtype=np.float64)
    scale = total / wanted.sum() if wanted.sum() > 0 else 0.0
    target = np.clip(wanted * scale if scale > 0 else limits * (total / max(1, limits.sum())), floor, limits)
    counts = np.clip(np.floor(target).astype(np.int64), floor, limits)
    while int(counts.sum()) != total:
        short = total - int(counts.sum())
        if short > 0:  # add where the remainder is largest and there is room
            room = counts < limits
            key = np.where(room, target - counts, -np.inf)
            order = np.argsort(-key, kind="stable")[: min(short, int(room.sum()))]
            counts[order] += 1
        else:  # take back where the remainder is smallest and above the floor
            room = counts > floor
            key = np.where(room, target - counts, np.inf)
            order = np.argsort(key, kind="stable")[: min(-short, int(room.sum()))]
            counts[order] -= 1
    return [int(c) for c in counts]


def choose_sparsities(
    curves: Sequence[Sequence[float]], numels: Sequence[int], target: float, grid: Sequence[float] = GRID
) -> list[float]:
    """One grid sparsity per tensor minimising the summed loss increase, with at least `target`
    of all entries pruned. `curves[i][k]` is tensor i's loss increase at `grid[k]`."""
    total = float(sum(numels))
    need = math.ceil(target * UNITS - 1e-9)
    # costs[i][k] in budget units: the entries tensor i prunes at grid[k]
    units = [[int(math.floor(g * n / total * UNITS + 1e-9)) for g in grid] for n in numels]
    best = np.full(need + 1, np.inf)
    best[0] = 0.0
    choice = []
    for i, curve in enumerate(curves):
        new = np.full(need + 1, np.inf)
        picked = np.zeros(need + 1, dtype=np.int64)
        for k, loss in enumerate(curve):
            # reaching at least b units with this choice: from b − u units (or none) before
            candidate = best[np.maximum(0, np.arange(need + 1) - units[i][k])] + float(loss)
            better = candidate < new
            new[better], picked[better] = candidate[better], k
        best = new
        choice.append(picked)
    if not np.isfinite(best[need]):
        raise ValueError(f"the grid cannot reach sparsity {target}")
    # walk back
    picks, b = [], need
    for i in reversed(range(len(curves))):
        k = int(choice[i][b])
        picks.append(grid[k])
        b = max(0, b - units[i][k])
    return list(reversed(picks))


def output_loss(dense: Tensor, current: Tensor, kind: str) -> float:
    """How far the current model's headline output is from the dense model's on the same
    samples: KL(dense ‖ current) for class scores, else the squared error relative to the dense
    output's variance."""
    dense, current = dense.double(), current.double()
    if kind in ("logits", "probabilities"):
        if kind == "probabilities":
            dense, current = dense.clamp_min(1e-12).log(), current.clamp_min(1e-12).log()
        p = torch.log_softmax(dense, dim=1)
        q = torch.log_softmax(current, dim=1)
        return float((p.exp() * (p - q)).sum(1).mean())
    return float(((current - dense) ** 2).mean() / dense.var().clamp_min(1e-12))
