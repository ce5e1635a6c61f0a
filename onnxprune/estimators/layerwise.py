"""Layer-wise estimators from calibration inputs (no gradients): Wanda and SparseGPT.

Both see each weight as [rows, cols] acting on input rows x (for a grouped convolution, each group
of output rows on its own inputs). Their scores are on a per-layer output-error scale: global
selection across layers compares layers by how much each weight moves its own layer's output.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..activations import InputStatistics
from ..layerwise import damped, obs_column_saliency, sparsegpt, wanda_scores
from ..masks import pattern_order
from .base import Estimator, MemoryNeed, damping, register


def _per_group(weight: Tensor, stats: InputStatistics) -> tuple[Tensor, int]:
    """The weight as [groups, rows per group, cols] and the column count."""
    return weight.reshape(stats.groups, -1, stats.cols), stats.cols


@register
class Wanda(Estimator):
    name = "wanda"
    summary = "|W_ij| · ‖X_j‖ from calibration inputs (Sun et al.); no compensation"
    needs_activations = True

    def statistics(self, name: str, shape: tuple[int, int]) -> InputStatistics:
        return InputStatistics(shape[1], full=False)

    def memory(self, shape: tuple[int, int], count: int) -> MemoryNeed:
        return MemoryNeed(peak=8 * shape[1], kept=8 * shape[1])

    def scores(self, weight: Tensor, stats: InputStatistics) -> Tensor:
        w, _ = _per_group(weight, stats)
        norms = stats.column_norms().to(w.device)
        return torch.cat([wanda_scores(w[g], norms[g]) for g in range(stats.groups)]).reshape(-1)


@register
class SparseGPT(Estimator):
    name = "sparsegpt"
    summary = "layer-wise OBS with H = 2XᵀX from calibration inputs, Cholesky sweep with adaptive masks (OBC/SparseGPT)"
    needs_activations = True
    compensates = True
    sequential = True
    uses_damping = True

    def __init__(self, config=None):
        super().__init__(config)
        self.damp = damping(config)
        self.block_size = getattr(config, "block_size", 128)

    def statistics(self, name: str, shape: tuple[int, int]) -> InputStatistics:
        return InputStatistics(shape[1], full=True)

    def memory(self, shape: tuple[int, int], count: int) -> MemoryNeed:
        return MemoryNeed(peak=3 * 8 * shape[1] ** 2, kept=8 * shape[1] ** 2)

    def describe(self) -> dict:
        return {"damp": self.damp, "column_block": self.block_size, "hessian": "mean XᵀX of the layer inputs"}

    def scores(self, weight: Tensor, stats: InputStatistics) -> Tensor:
        w, _ = _per_group(weight, stats)
        hessian = stats.hessian().to(w.device)
        parts = [obs_column_saliency(w[g], damped(hessian[g], self.damp)[0]) for g in range(stats.groups)]
        return torch.cat(parts).reshape(-1)

    def prune(
        self,
        weight: Tensor,
        keep: Tensor,
        stats: InputStatistics,
        forced: Tensor,
        pattern: tuple[int, int] | None = None,
    ) -> tuple[Tensor, Tensor]:
        w, cols = _per_group(weight, stats)
        keep_g = keep.reshape(w.shape).to(w.device)
        forced_g = forced.reshape(w.shape).to(w.device)
        hessian = stats.hessian().to(w.device)
        order = (pattern_order(cols, stats.kernel) if pattern is not None else torch.arange(cols)).to(w.device)
        new_parts, keep_parts = [], []
        for g in range(stats.groups):
            h = damped(hessian[g], self.damp)[0][order][:, order]
            new, kept = sparsegpt(
                w[g][:, order], h, int((~keep_g[g]).sum()), forced_g[g][:, order], self.block_size, pattern
            )
            restored_new, restored_keep = torch.empty_like(new), torch.empty_like(kept)
            restored_new[:, order], restored_keep[:, order] = new, kept
            new_parts.append(restored_new)
            keep_parts.append(restored_keep)
        return torch.stack(new_parts).reshape(-1).to(weight.dtype), torch.stack(keep_parts).reshape(-1)
