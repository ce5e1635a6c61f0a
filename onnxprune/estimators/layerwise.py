"""Layer-wise estimators from calibration inputs (no gradients): Wanda and SparseGPT.

Both see each weight as [rows, cols] acting on input rows x (for a grouped convolution, each group
of output rows on its own inputs). Their scores are on a per-layer output-error scale: global
selection across layers compares layers by how much each weight moves its own layer's output.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from ..activations import InputStatistics
from ..layerwise_maths import damped, obs_column_saliency, sparsegpt, wanda_scores
from ..masks import pattern_order
from .base import Estimator, MemoryNeed, register, relative_damp


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

    reads: ClassVar[tuple[str, ...]] = ("damp", "block_size")

    def __init__(self, config=None):
        super().__init__(config)
        self.damp = relative_damp(self.settings.damp)
        self.block_size = self.settings.block_size

    def statistics(self, name: str, shape: tuple[int, int]) -> InputStatistics:
        return InputStatistics(shape[1], full=True)

    def memory(self, shape: tuple[int, int], count: int) -> MemoryNeed:
        return MemoryNeed(peak=3 * 8 * shape[1] ** 2, kept=8 * shape[1] ** 2)

    def describe(self) -> dict:
        return {"damp": self.damp, "column_block": self.block_size, "hessian": "mean XᵀX of the layer inputs"}

    def _row_weight(self, stats: InputStatistics, rows: int, group: int, groups: int) -> Tensor | None:
        """Each row's weight in the objective (None: all equal, SparseGPT)."""
        return None

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
                w[g][:, order],
                h,
                int((~keep_g[g]).sum()),
                forced_g[g][:, order],
                self.block_size,
                pattern,
                self._row_weight(stats, weight.numel() // cols, g, stats.groups),
            )
            restored_new, restored_keep = torch.empty_like(new), torch.empty_like(kept)
            restored_new[:, order], restored_keep[:, order] = new, kept
            new_parts.append(restored_new)
            keep_parts.append(restored_keep)
        return torch.stack(new_parts).reshape(-1).to(weight.dtype), torch.stack(keep_parts).reshape(-1)


# The weight of the task-loss term in the combined objective's automatic search (0: SparseGPT's
# reconstruction alone; 1: the Fisher term alone, on the loss scale).
MIX_GRID = (0.0, 0.5, 1.0)
DEFAULT_MIX = 0.5


@register
class Combined(SparseGPT):
    """Layer-wise OBS on a weighted sum of each layer's reconstruction Hessian and the task loss's
    Fisher. For a layer y = W x the Fisher of row i's weights is, in K-FAC form, s_i · H with
    H = mean x xᵀ over the layer's input rows and s_i = (1/N) Σ_n Σ_pos (∂ℓ_n/∂y_i)² the Fisher of
    that output unit; the objective of row i is r_i · Δwᵢᵀ H Δwᵢ with r_i = (1 − α) + α · s_i / s̄
    (s̄ the mean over every output unit of every pruned layer). α = 0 is SparseGPT (each layer's
    own output error); α = 1 weighs every row by how much the loss depends on it, so scores are
    loss increases comparable across layers. The survivors of a row get SparseGPT's OBS update
    (r_i scales the row's Hessian, so it moves masks between rows, not a row's update)."""

    name = "combined"
    summary = (
        "layer-wise OBS on (1−α)·XᵀX + α·(task-loss Fisher of each output unit)·XᵀX, α chosen on held-out "
        "samples; SparseGPT's update"
    )
    needs_output_gradients = True

    reads = ("damp", "block_size", "mix")

    def __init__(self, config=None):
        super().__init__(config)
        value = self.settings.mix
        self.mix = DEFAULT_MIX if value == "auto" else float(value)
        self.sensitivity: dict[str, Tensor] = {}

    def describe(self) -> dict:
        return {**super().describe(), "mix": self.mix, "fisher": "K-FAC: E[δᵢ²] per output unit × XᵀX"}

    def set_sensitivity(self, sensitivity: dict[str, Tensor]) -> None:
        """Each pruned layer's s_i, from the source at the weights of this step."""
        units = torch.cat([s.reshape(-1) for s in sensitivity.values()]) if sensitivity else torch.ones(1)
        mean = float(units.mean()) if units.numel() else 1.0
        scale = 1.0 / mean if mean > 0 else 0.0
        self.sensitivity = {name: s.double() * scale for name, s in sensitivity.items()}

    def statistics(self, name: str, shape: tuple[int, int]) -> InputStatistics:
        stats = InputStatistics(shape[1], full=True)
        stats.name = name
        return stats

    def row_weights(self, stats: InputStatistics, rows: int) -> Tensor:
        """r_i for the rows of the weight whose statistics these are ([rows])."""
        s = self.sensitivity.get(stats.name, None)
        if s is None or s.numel() != rows:
            return torch.ones(rows, dtype=torch.float64)
        return (1.0 - self.mix) + self.mix * s

    def scores(self, weight: Tensor, stats: InputStatistics) -> Tensor:
        rows = weight.numel() // stats.cols
        plain = super().scores(weight, stats).reshape(rows, -1)
        return (plain * self.row_weights(stats, rows).to(plain.device).unsqueeze(1)).reshape(-1)

    def _row_weight(self, stats: InputStatistics, rows: int, group: int, groups: int) -> Tensor | None:
        per_group = rows // groups
        return self.row_weights(stats, rows)[group * per_group : (group + 1) * per_group]
