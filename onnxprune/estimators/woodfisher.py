"""WoodFisher: block-diagonal inverse Fisher by the Woodbury recursion, OBS scores and updates.

Each tensor (in canonical order, so a block holds consecutive weights of the same output unit) is
cut into blocks of `block_size` entries; each block's F⁻¹ = (λI + (1/N) Σ g gᵀ)⁻¹ is built from
the gradient rows without inverting a matrix (`obs.woodbury_inverse`). λ is `damp` times the mean
of diag F over the tensor (relative damping: the right absolute value differs by orders of
magnitude between layers and models). Scores are OBS saliencies w²/(2[F⁻¹]_qq); the survivors of
each block get the exact joint OBS update for the set pruned in that block (or, for comparison,
the original WoodFisher sum of single-weight updates).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from torch import Tensor

from ..obs import (
    from_blocks,
    obs_group_saliency,
    obs_joint_update,
    obs_saliency,
    obs_summed_update,
    to_blocks,
    woodbury_inverse,
)
from .base import Estimator, MemoryNeed, register, relative_damp

# Gradients folded in per Woodbury step: the same result as Sherman-Morrison (chunk 1), and each
# step reads the whole inverse once, so fewer steps are faster (64 measured ~2x faster than 32 on
# MiniLM-sized layers; beyond that the r×r Cholesky grows).
WOODBURY_CHUNK = 64


class GradientRows:
    """The gradient rows of one tensor, kept until its block inverse is built, then dropped.
    The inverse can be spilled to a file and is then memory-mapped back when needed."""

    def __init__(self, numel: int):
        self.numel = numel
        self.parts: list[Tensor] = []
        self.count = 0
        self.inverse: Tensor | None = None
        self.damping: float | None = None
        self.spilled: Path | None = None

    def spill(self, folder: Path) -> None:
        """Move the inverse to a file in `folder`, freeing its memory."""
        if self.inverse is None:
            return
        self.spilled = Path(tempfile.mkstemp(suffix=".pt", dir=folder)[1])
        torch.save(self.inverse.cpu(), self.spilled)
        self.inverse = None

    def update(self, grads: Tensor, keep: Tensor | None = None) -> None:
        if self.inverse is not None:
            raise RuntimeError("statistics already finalised")
        self.parts.append(grads.detach().float())
        self.count += len(grads)

    def matrix(self) -> Tensor:
        return torch.cat(self.parts) if self.parts else torch.zeros(0, self.numel)


def relative_damping(grads: Tensor, damp: float) -> float:
    """λ = damp · mean(diag F), with diag F the mean squared gradient; `damp` itself when the
    tensor gets no gradient at all."""
    mean_diagonal = float((grads.double() ** 2).mean()) if grads.numel() else 0.0
    return damp * mean_diagonal if mean_diagonal > 0 else damp


@register
class WoodFisher(Estimator):
    name = "woodfisher"
    summary = "OBS with a block-diagonal inverse Fisher built by the Woodbury recursion; joint block update"
    needs_gradients = True
    uses_damping = True
    spills = True

    reads = ("damp", "block_size", "obs_update")

    def __init__(self, config=None):
        super().__init__(config)
        self.block_size = self.settings.block_size
        self.damp = relative_damp(self.settings.damp)
        self.update = self.settings.obs_update
        self.compensates = self.update != "none"

    def statistics(self, name: str, shape: tuple[int, int]) -> GradientRows:
        return GradientRows(shape[0] * shape[1])

    def memory(self, shape: tuple[int, int], count: int) -> MemoryNeed:
        numel = shape[0] * shape[1]
        c = self.block_size
        blocks = -(-numel // c)
        inverse = 8 * blocks * c * c
        rows = 4 * numel * count + 8 * blocks * c * count  # float32 rows + their float64 blocked copy
        return MemoryNeed(peak=rows + 2 * inverse, kept=inverse)

    def describe(self) -> dict:
        return {"block_size": self.block_size, "damp": self.damp, "update": self.update}

    def inverse(self, stats: GradientRows) -> Tensor:
        """The block inverses [B, c, c] (float64), built once; the rows are released after."""
        if stats.inverse is None and stats.spilled is not None:
            return torch.load(stats.spilled, mmap=True, weights_only=True)
        if stats.inverse is None:
            grads = stats.matrix()
            stats.damping = relative_damping(grads, self.damp)
            blocked = to_blocks(grads.double(), self.block_size)
            stats.inverse = woodbury_inverse(blocked, stats.damping, count=max(1, stats.count), chunk=WOODBURY_CHUNK)
            stats.parts = []
        return stats.inverse

    def scores(self, weight: Tensor, stats: GradientRows) -> Tensor:
        finv = self.inverse(stats)
        w = to_blocks(weight.to(device=finv.device, dtype=torch.float64), self.block_size)
        return from_blocks(obs_saliency(w, finv), weight.numel())

    def group_scores(self, weight: Tensor, stats: GradientRows, groups: list[Tensor]) -> Tensor:
        finv = self.inverse(stats)
        w = to_blocks(weight.to(device=finv.device, dtype=torch.float64), self.block_size)
        return obs_group_saliency(w, finv, groups)

    def compensate(self, weight: Tensor, keep: Tensor, stats: GradientRows) -> Tensor:
        if self.update == "none":
            return super().compensate(weight, keep, stats)
        finv = self.inverse(stats)
        w = to_blocks(weight.to(device=finv.device, dtype=torch.float64), self.block_size)
        prune = to_blocks(~keep.to(finv.device), self.block_size)
        update = obs_joint_update if self.update == "joint" else obs_summed_update
        return from_blocks(update(w, finv, prune), weight.numel()).to(weight.dtype)
