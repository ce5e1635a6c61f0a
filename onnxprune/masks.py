"""Pure functions from scores to keep-masks (True = keep). Higher score = more worth keeping.

Counts are exact: pruning `s` of `n` entries removes round(s·n) of them (half rounds up), ties in
score broken by position so the result is deterministic.
"""

from __future__ import annotations

import functools
import math
from typing import Hashable, Mapping, TypeVar

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


K = TypeVar("K", bound=Hashable)  # tensors by name or by index


def layer_masks(scores: Mapping[K, Tensor], sparsity: float) -> dict[K, Tensor]:
    """Each tensor pruned to `sparsity` on its own."""
    return {name: keep_lowest_pruned(s, prune_count(s.numel(), sparsity)) for name, s in scores.items()}


def global_masks(scores: Mapping[K, Tensor], sparsity: float) -> dict[K, Tensor]:
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


def profile_masks(scores: Mapping[K, Tensor], sparsity: float, profile: Mapping[K, Tensor]) -> dict[K, Tensor]:
    """Each tensor pruned to the count one global threshold over `profile` (e.g. the weights'
    magnitudes) would give it, the entries chosen within it by `scores`."""
    counts = {name: int((~keep).sum()) for name, keep in global_masks(profile, sparsity).items()}
    return {name: keep_lowest_pruned(s, counts[name]) for name, s in scores.items()}


# ------------------------------------------------------------------------------ N:M patterns


def parse_pattern(text: str | None) -> tuple[int, int] | None:
    """'2:4' → (2, 4): at most N non-zeros in every M consecutive inputs; None/'' → None."""
    if not text:
        return None
    try:
        n, m = (int(part) for part in str(text).split(":"))
    except ValueError:
        raise ValueError(f"a pattern is N:M with whole numbers, like 2:4; got {text!r}") from None
    if not 0 < n < m:
        raise ValueError(f"pattern N:M needs 0 < N < M, got {text!r}")
    return n, m


def pattern_order(cols: int, kernel: int) -> Tensor:
    """Column order in which the N:M groups are consecutive: canonical columns are (input,
    kernel position) pairs, input-major; the groups run along the inputs at each kernel position."""
    return torch.arange(cols).reshape(cols // kernel, kernel).T.reshape(-1)


def pattern_masks(scores: Tensor, rows: int, n: int, m: int, kernel: int = 1) -> Tensor:
    """Keep-mask for flat canonical `scores` of a [rows, cols] matrix: in every group of m inputs
    (at one kernel position) the m−n lowest scores are pruned; a last, shorter group keeps at most
    n. Already-pruned entries (score −1) go first; ties by position."""
    cols = scores.numel() // rows
    order = pattern_order(cols, kernel).to(scores.device)
    grouped = scores.reshape(rows, cols)[:, order]
    width = grouped.shape[1]
    pad = (-(cols // kernel)) % m
    # per kernel position the inputs form one run; pad each run to a multiple of m with entries
    # that count as pruned (so a short group prunes only what it must)
    runs = grouped.reshape(rows, kernel, cols // kernel)
    if pad:
        filler = torch.full((rows, kernel, pad), -math.inf, dtype=scores.dtype, device=scores.device)
        runs = torch.cat([runs, filler], dim=2)
    groups = runs.reshape(rows, kernel, -1, m)
    ranks = torch.sort(groups, dim=3, stable=True).indices
    pruned = torch.zeros_like(groups, dtype=torch.bool)
    pruned.scatter_(3, ranks[..., : m - n], True)
    pruned = pruned.reshape(rows, kernel, -1)[:, :, : cols // kernel].reshape(rows, width)
    keep = torch.empty_like(pruned)
    keep[:, order] = ~pruned
    return keep.reshape(scores.shape)


def pattern_violations(matrix: Tensor, n: int, m: int, kernel: int = 1) -> int:
    """Groups of m inputs (at one kernel position) of a canonical [rows, cols] matrix with more
    than n non-zeros."""
    rows, cols = matrix.shape
    grouped = (matrix != 0)[:, pattern_order(cols, kernel).to(matrix.device)].reshape(rows, kernel, cols // kernel)
    pad = (-(cols // kernel)) % m
    if pad:
        grouped = torch.cat([grouped, torch.zeros(rows, kernel, pad, dtype=torch.bool, device=matrix.device)], dim=2)
    return int((grouped.reshape(rows, kernel, -1, m).sum(3) > n).sum())
