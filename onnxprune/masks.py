"""Pure functions from scores to keep-masks (True = keep). Higher score = more worth keeping.

Counts are exact: pruning `s` of `n` entries removes round(s·n) of them (half rounds up), ties in
score broken by position so the result is deterministic.
"""

from __future__ import annotations

import functools
import math
from typing import Mapping

import torch
from torch import Tensor


def prune_count(numel: int, sparsity: float) -> int:
    """How many of `numel` entries to prune for `sparsity`, to the nearest element."""
    return min(numel, max(0, math.floor(numel * sparsity + 0.5)))


def keep_lowest_pruned(scores: Tensor, n_prune: int) -> Tensor:
    """A keep-mask shaped like `scores` with exactly `n_prune` False entries at the lowest scores.

    Among equal scores the earliest positions (row-major) are pruned first.
    """
    flat = scores.reshape(-1)
    if not bool(torch.isfinite(flat).all()):
        raise ValueError("scores must be finite")
    if n_prune <= 0:
        return torch.ones_like(scores, dtype=torch.bool)
    if n_prune >= flat.numel():
        return torch.zeros_like(scores, dtype=torch.bool)
    threshold = torch.kthvalue(flat, n_prune).values
    pruned = flat < threshold
    missing = n_prune - int(pruned.sum())
    ties = torch.nonzero(flat == threshold).reshape(-1)[:missing]
    pruned[ties] = True
    return (~pruned).reshape(scores.shape)


def layer_masks(scores: Mapping[str, Tensor], sparsity: float) -> dict[str, Tensor]:
    """Each tensor pruned to `sparsity` on its own."""
    return {name: keep_lowest_pruned(s, prune_count(s.numel(), sparsity)) for name, s in scores.items()}


def global_masks(scores: Mapping[str, Tensor], sparsity: float) -> dict[str, Tensor]:
    """One threshold over all tensors: `sparsity` of all entries together, split by score."""
    if not scores:
        return {}
    names = list(scores)
    dtype = functools.reduce(torch.promote_types, (scores[n].dtype for n in names))
    flat = torch.cat([scores[n].detach().reshape(-1).to(dtype) for n in names])
    keep = keep_lowest_pruned(flat, prune_count(flat.numel(), sparsity))
    masks, start = {}, 0
    for name in names:
        size = scores[name].numel()
        masks[name] = keep[start : start + size].reshape(scores[name].shape)
        start += size
    return masks


SCOPES = {"global": global_masks, "layer": layer_masks}
