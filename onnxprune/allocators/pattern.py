"""N:M sparsity as a constraint around any allocation."""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor

from ..masks import pattern_masks
from .base import Allocator


class PatternConstraint:
    """At most n non-zeros in every m consecutive inputs of an output unit. The last step prunes
    the m−n lowest of every group; an earlier step (lower sparsity) prunes, by the allocation,
    only among those, so that every group can still end with exactly n. N:M is the same in every
    tensor, so the allocation is its uniform variant (Allocator.uniform)."""

    def __init__(self, allocator: Allocator, n: int, m: int):
        self.allocator, self.n, self.m = allocator.uniform(), n, m

    def masks(self, pruner, scored, sparsity: float, timer: dict[str, float], last: bool) -> dict[int, Tensor]:
        """Keep-masks for this step: the pattern itself at the last step."""
        views = pruner.views
        allowed = {
            i: pattern_masks(s, views[i].shape[0], self.n, self.m, kernel=views[i].kernel)
            for i, s in scored.scores.items()
        }
        if last:
            return allowed
        top = max(float(s.max()) for s in scored.scores.values()) + 1.0
        restricted = {i: torch.where(allowed[i], torch.full_like(s, top), s) for i, s in scored.scores.items()}
        return self.allocator.masks(pruner, replace(scored, scores=restricted), sparsity, timer)
