"""WoodFisher: block-diagonal inverse Fisher, OBS scores and updates.

Each tensor (in canonical order, so a block holds consecutive weights of the same output unit) is
cut into blocks of `block_size` entries. The gradients stream in: every FOLD_ROWS rows are folded
into each block's Gram matrix Σ g gᵀ (float32) and dropped, so the N rows are never held; at the
end each block's F = λI + (1/N) Σ g gᵀ is inverted by Cholesky in float64 and the inverse stored
in float32 in the Gram's place (the same F⁻¹ as the Woodbury recursion of the WoodFisher paper,
`obs.woodbury_inverse`, at a quarter of the memory: no rows, no float64 copy). λ is `damp` times
the mean of diag F over the tensor (relative damping: the right absolute value differs by orders
of magnitude between layers and models). Scores are OBS saliencies w²/(2[F⁻¹]_qq); the survivors
of each block get the exact joint OBS update for the set pruned in that block (or, for comparison,
the original WoodFisher sum of single-weight updates). The OBS solves run in float64 on chunks of
blocks.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from ..obs import (
    from_blocks,
    obs_group_saliency,
    obs_joint_update,
    obs_saliency,
    obs_summed_update,
    ordered_factor,
    prefix_update,
    saliency_order,
    to_blocks,
    unordered_inverse,
)
from .base import Estimator, MemoryNeed, register, relative_damp

# Gradient rows buffered per tensor before they are folded into the Gram matrices: each fold reads
# and writes every block once, so fewer folds are faster; the buffers of all tensors of a group
# are held together (16 rows of MiniLM's 10.6M weights: 0.7 GB).
FOLD_ROWS = 16
# Blocks converted to float64 at a time for the inversion and the OBS solves.
CHUNK_BYTES = 1 << 26


class BlockGram:
    """One tensor's statistics: the running Σ g gᵀ of each block (float32, [B, c, c]), then, once
    finalised, each block's inverse Fisher in the same memory. The inverse can be spilled to a
    file and is then memory-mapped back when needed."""

    def __init__(self, numel: int, block_size: int):
        self.numel, self.block_size = numel, block_size
        self.pending: list[Tensor] = []
        self.pending_rows = 0
        self.count = 0
        self.gram: Tensor | None = None
        self.inverse: Tensor | None = None
        self.damping: float | None = None
        self.spilled: Path | None = None
        # the inverse replaced by its Cholesky factor in each block's saliency order (`factor`)
        self.factor: Tensor | None = None
        self.order: Tensor | None = None

    def update(self, grads: Tensor, keep: Tensor | None = None) -> None:
        if self.inverse is not None or self.spilled is not None:
            raise RuntimeError("statistics already finalised")
        self.pending.append(grads.detach().float())
        self.pending_rows += len(grads)
        self.count += len(grads)
        if self.pending_rows >= FOLD_ROWS:
            self.fold()

    def fold(self) -> None:
        """Add the buffered rows' outer products to the Gram matrices."""
        if not self.pending:
            return
        rows = to_blocks(torch.cat(self.pending), self.block_size).transpose(0, 1)  # [B, r, c]
        self.pending, self.pending_rows = [], 0
        if self.gram is None:
            blocks = rows.shape[0]
            self.gram = rows.new_zeros(blocks, self.block_size, self.block_size)
        self.gram.baddbmm_(rows.transpose(1, 2), rows)

    def _folded(self) -> Tensor:
        """The Gram matrices with every buffered row added (zeros where no row came: a tensor the
        loss does not reach)."""
        self.fold()
        if self.gram is None:
            blocks = -(-self.numel // self.block_size)
            self.gram = torch.zeros(blocks, self.block_size, self.block_size)
        return self.gram

    def finalise(self, damp: float) -> Tensor:
        """F⁻¹ per block (float32), λ = damp · mean(diag F); the Gram matrices are overwritten."""
        gram = self._folded()
        count = max(1, self.count)
        diagonal = gram.diagonal(dim1=1, dim2=2).sum(dtype=torch.float64).item()
        self.damping = damping_of(diagonal / (count * self.numel) if self.numel else 0.0, damp)
        for part in chunks(gram):
            fisher = part.double() / count
            fisher.diagonal(dim1=1, dim2=2).add_(self.damping)
            part.copy_(torch.cholesky_inverse(torch.linalg.cholesky(fisher)))
        self.inverse, self.gram = gram, None
        return gram

    def to_ordered_factor(self, order: Tensor) -> None:
        """Replace the inverse, in its own memory, by the Cholesky factor of each block's inverse
        in `order` (obs.ordered_factor): several updates from one factorisation."""
        finv = self.inverse
        if finv is None:
            raise RuntimeError("statistics not finalised, or spilled")
        for part, part_order in zip(chunks(finv), chunks_like(order, finv)):
            part.copy_(ordered_factor(part, part_order))
        self.factor, self.inverse = finv, None
        self.order = order.to(torch.int16 if self.block_size < 2**15 else torch.int32)

    def to_inverse(self) -> Tensor:
        """The inverse back from the ordered factor (in place; equal to float rounding)."""
        factor, order = self.factor, self.order
        if factor is None or order is None:
            raise RuntimeError("statistics not factored")
        for part, part_order in zip(chunks(factor), chunks_like(order, factor)):
            part.copy_(unordered_inverse(part, part_order.long()))
        self.inverse, self.factor, self.order = factor, None, None
        return factor

    def spill(self, folder: Path) -> None:
        """Move the inverse to a file in `folder`, freeing its memory."""
        if self.inverse is None:
            return
        self.spilled = Path(tempfile.mkstemp(suffix=".pt", dir=folder)[1])
        torch.save(self.inverse.cpu(), self.spilled)
        self.inverse = None


def relative_damping(grads: Tensor, damp: float) -> float:
    """λ = damp · mean(diag F), with diag F the mean squared gradient; `damp` itself when the
    tensor gets no gradient at all."""
    return damping_of(float((grads.double() ** 2).mean()) if grads.numel() else 0.0, damp)


def damping_of(mean_diagonal: float, damp: float) -> float:
    """λ = damp · mean(diag F); `damp` itself when the tensor gets no gradient at all."""
    return damp * mean_diagonal if mean_diagonal > 0 else damp


def chunk_blocks(size: int) -> int:
    """How many c×c blocks (c = `size`) make about CHUNK_BYTES in float64."""
    return max(1, CHUNK_BYTES // (8 * size * size))


def chunks(blocked: Tensor) -> list[Tensor]:
    """Views of consecutive blocks of `blocked` [B, c, c], each about CHUNK_BYTES in float64."""
    step = chunk_blocks(blocked.shape[-1])
    return [blocked[start : start + step] for start in range(0, blocked.shape[0], step)]


def chunks_like(rows: Tensor, blocked: Tensor) -> list[Tensor]:
    """`rows` [B, ...] cut as `chunks(blocked)` cuts its blocks (as int64 where it is an index)."""
    step = chunk_blocks(blocked.shape[-1])
    return [rows[start : start + step].long() for start in range(0, blocked.shape[0], step)]


def blockwise(function: Callable[..., Tensor], w: Tensor, finv: Tensor, *extra: Tensor) -> Tensor:
    """`function(w, finv, *extra)` over chunks of blocks, so that its float64 temporaries stay
    about CHUNK_BYTES (results concatenated)."""
    step = chunk_blocks(finv.shape[-1])
    parts = []
    for start in range(0, w.shape[0], step):
        end = start + step
        parts.append(function(w[start:end], finv[start:end], *(e[start:end] for e in extra)))
    return torch.cat(parts) if parts else w.new_zeros(w.shape)


def ordered_update(w: Tensor, factor: Tensor, order: Tensor, prune: Tensor) -> Tensor:
    """`obs.prefix_update`, with the blocks whose pruned set is not a prefix of their order (ties
    in the saliencies cut differently) solved from the inverse rebuilt for them alone."""
    new, ok = prefix_update(w, factor, order.long(), prune)
    if not bool(ok.all()):
        odd = ~ok
        finv = unordered_inverse(factor[odd], order[odd].long())
        new[odd] = obs_joint_update(w[odd], finv, prune[odd])
    return new


@register
class WoodFisher(Estimator):
    name = "woodfisher"
    summary = "OBS with a block-diagonal inverse Fisher from streamed block Gram matrices; joint block update"
    needs_gradients = True
    uses_damping = True
    spills = True
    streams_gradients = True
    splits_over_ranks = True

    reads = ("damp", "block_size", "obs_update")

    def __init__(self, config=None):
        super().__init__(config)
        self.block_size = self.settings.block_size
        self.damp = relative_damp(self.settings.damp)
        self.update = self.settings.obs_update
        self.compensates = self.update != "none"

    def statistics(self, name: str, shape: tuple[int, int]) -> BlockGram:
        return BlockGram(shape[0] * shape[1], self.block_size)

    def memory(self, shape: tuple[int, int], count: int) -> MemoryNeed:
        numel = shape[0] * shape[1]
        c = self.block_size
        blocks = -(-numel // c)
        inverse = 4 * blocks * c * c  # the Gram matrices, inverted in place
        # the buffered rows and their blocked copy while they stream in; one float64 chunk of
        # blocks, its Cholesky factor and inverse while the tensor is finalised
        rows = 4 * numel * FOLD_ROWS + 4 * blocks * c * FOLD_ROWS
        return MemoryNeed(peak=inverse + rows, kept=inverse, scratch=3 * min(CHUNK_BYTES, 2 * inverse))

    def describe(self) -> dict:
        return {"block_size": self.block_size, "damp": self.damp, "update": self.update}

    def inverse(self, stats: BlockGram) -> Tensor:
        """The block inverses [B, c, c] (float32), built once."""
        if stats.inverse is None and stats.spilled is not None:
            return torch.load(stats.spilled, mmap=True, weights_only=True)
        if stats.factor is not None:
            return stats.to_inverse()
        return stats.inverse if stats.inverse is not None else stats.finalise(self.damp)

    def _blocked(self, weight: Tensor, finv: Tensor) -> Tensor:
        return to_blocks(weight.to(device=finv.device, dtype=torch.float64), self.block_size)

    def scores(self, weight: Tensor, stats: BlockGram) -> Tensor:
        finv = self.inverse(stats)
        return from_blocks(blockwise(obs_saliency, self._blocked(weight, finv), finv), weight.numel())

    def group_scores(self, weight: Tensor, stats: BlockGram, groups: list[Tensor]) -> Tensor:
        finv = self.inverse(stats)
        return obs_group_saliency(self._blocked(weight, finv), finv, groups)

    def compensate(self, weight: Tensor, keep: Tensor, stats: BlockGram) -> Tensor:
        if self.update == "none":
            return super().compensate(weight, keep, stats)
        ordered = self.update == "joint" and (self.shared_statistics or stats.factor is not None)
        if ordered and stats.spilled is None:
            return self._compensate_ordered(weight, keep, stats)
        finv = self.inverse(stats)
        prune = to_blocks(~keep.to(finv.device), self.block_size)
        update = obs_joint_update if self.update == "joint" else obs_summed_update
        new = blockwise(update, self._blocked(weight, finv), finv, prune)
        return from_blocks(new, weight.numel()).to(weight.dtype)

    def _compensate_ordered(self, weight: Tensor, keep: Tensor, stats: BlockGram) -> Tensor:
        """The joint update of statistics that several trials compensate (the allocation search's
        candidates, whose pruned sets are thresholds on the same saliencies): the first call
        factors each block once in saliency order, every call then solves its prefix."""
        w = None
        if stats.factor is None:
            finv = self.inverse(stats)
            w = self._blocked(weight, finv)
            stats.to_ordered_factor(blockwise(saliency_order, w, finv))
        factor, order = stats.factor, stats.order
        if factor is None or order is None:
            raise RuntimeError("the ordered factor was not built")
        w = self._blocked(weight, factor) if w is None else w  # blocked once, for the order and the update
        prune = to_blocks(~keep.to(factor.device), self.block_size)
        new = blockwise(ordered_update, w, factor, order, prune)
        return from_blocks(new, weight.numel()).to(weight.dtype)
