"""Layer-wise pruning maths from calibration activations: pure functions on tensors.

A weight seen as a matrix W [rows, cols] (output units × inputs, canonical order) acts on input
rows x [cols]; the layer's output error of a change δW over the calibration inputs X [n, cols] is
‖δW Xᵀ‖², so each output row has the same Hessian H = 2XᵀX (here kept as the mean XᵀX/n; the
factor does not change which weights go or how the survivors move).

- Wanda: score |W_ij| · ‖X_j‖₂, no update.
- SparseGPT / OBC: columns are visited left to right; pruning entry (i, j) moves the entries of
  row i to the right of j by the OBS update computed with the inverse Hessian of the columns not
  yet visited. Row j of the upper Cholesky factor U of H⁻¹ holds exactly that inverse's column
  (scaled by 1/√[·]_jj), so the whole sweep needs one factorisation. Masks are chosen per block of
  columns from the saliency w²/U_jj² at the block's start (adaptive mask selection), and updates
  to the right of a block are applied once per block (lazy batch updates).
- Conv inputs are unfolded into patches (im2col), so a Conv's H is over (channel, kernel
  position) pairs, the layout of its canonical rows.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def gram(rows: Tensor) -> Tensor:
    """XᵀX (float64) of input rows [n, cols], or one per group for rows [groups, n, cols]."""
    x = rows.to(torch.float64)
    return x.transpose(-2, -1) @ x


def conv_patches(
    x: Tensor,
    kernel: tuple[int, ...],
    stride: tuple[int, ...],
    padding: tuple[int, ...],
    dilation: tuple[int, ...],
    groups: int,
) -> Tensor:
    """The input patches a 1-D or 2-D convolution multiplies its weight with: [groups, n·positions,
    channels/groups · kernel], channel-major within a patch like the weight's [out, in/g, *k]."""
    if x.dim() == 3:  # 1-D: a 2-D convolution of height 1
        x = x.unsqueeze(2)
        kernel, stride, padding, dilation = ((1, *kernel), (1, *stride), (0, *padding), (1, *dilation))
    if x.dim() != 4:
        raise ValueError(f"patches of {x.dim() - 2}-D convolutions are not supported")
    cols = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)  # [n, C·K, L]
    n, width, positions = cols.shape
    per_group = width // groups
    return cols.reshape(n, groups, per_group, positions).permute(1, 0, 3, 2).reshape(groups, n * positions, per_group)


def wanda_scores(weight: Tensor, column_norms: Tensor) -> Tensor:
    """|W_ij| · ‖X_j‖ for W [rows, cols] and the input columns' norms [cols], in float32 (the
    scores of every tensor are held together until the masks are chosen: float64 would double a
    large model's peak for no change in order beyond ties within float32's rounding)."""
    return weight.abs().to(torch.float32) * column_norms.to(torch.float32)


def damped(hessian: Tensor, damp: float) -> tuple[Tensor, float]:
    """H + λI with λ = damp · mean(diag H) (damp itself when H is all zero), and λ. Inputs that
    never fire (H_jj = 0) are left to the damping: their weights then look as unimportant as the
    calibration data says they are, and H stays invertible."""
    mean = float(hessian.diagonal().mean()) if hessian.numel() else 0.0
    lam = damp * mean if mean > 0 else damp
    out = hessian.to(torch.float64).clone()
    out.diagonal().add_(lam)
    return out, lam


def inverse_cholesky(hessian: Tensor) -> Tensor:
    """U upper triangular with UᵀU = H⁻¹ (H symmetric positive definite)."""
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(hessian))
    return torch.linalg.cholesky(inverse, upper=True)


def obs_column_saliency(weight: Tensor, hessian: Tensor) -> Tensor:
    """w_ij² / (2 [H⁻¹]_jj): the output error of removing one weight alone (H already damped)."""
    inverse_diagonal = torch.cholesky_inverse(torch.linalg.cholesky(hessian)).diagonal()
    w = weight.to(torch.float64)
    return w * w / (2.0 * inverse_diagonal)


def sparsegpt(
    weight: Tensor,
    hessian: Tensor,
    prune: int,
    forced: Tensor | None = None,
    block: int = 128,
    pattern: tuple[int, int] | None = None,
    row_weight: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Prune `prune` entries of W [rows, cols] given the damped Hessian H [cols, cols], updating
    the survivors (SparseGPT). `forced` [rows, cols] marks entries that must be pruned (already
    zero from an earlier step). With `pattern` (n, m) every m consecutive columns of a row keep at
    most n entries, and `prune` is ignored. `row_weight` [rows] scales each row's Hessian (row i's
    objective is r_i·ΔwᵢᵀHΔwᵢ): it moves the masks between rows, not any row's update. Returns
    the new W (float64) and its keep-mask."""
    rows, cols = weight.shape
    w = weight.to(torch.float64).clone()
    u = inverse_cholesky(hessian.to(torch.float64))
    forced = torch.zeros_like(w, dtype=torch.bool) if forced is None else forced.to(w.device)
    if pattern is not None and block % pattern[1]:
        block = max(pattern[1], block - block % pattern[1])
    pruned = torch.zeros_like(w, dtype=torch.bool)
    weight_of_row = torch.ones(rows, 1, dtype=w.dtype, device=w.device)
    if row_weight is not None:
        weight_of_row = row_weight.to(w.device, w.dtype).reshape(rows, 1)
    left = prune
    for start in range(0, cols, block):
        end = min(start + block, cols)
        ub = u[start:end, start:end]
        diag = ub.diagonal()
        wb = w[:, start:end]  # a view: updates land in w
        if pattern is None:
            count = _block_count(left, forced, start, end, cols, rows)
            chosen = _lowest(weight_of_row * wb * wb / (diag * diag), forced[:, start:end], count)
            pruned[:, start:end] = chosen
            left -= count
        errors = torch.zeros(rows, end - start, dtype=w.dtype, device=w.device)
        for j in range(end - start):
            if pattern is not None and j % pattern[1] == 0:
                group = slice(j, min(j + pattern[1], end - start))
                width = group.stop - group.start
                saliency = weight_of_row * wb[:, group] ** 2 / diag[group] ** 2
                pruned[:, start + group.start : start + group.stop] = _lowest_per_row(
                    saliency, forced[:, start + group.start : start + group.stop], max(0, width - pattern[0])
                )
            column = wb[:, j]
            target = torch.where(pruned[:, start + j], torch.zeros_like(column), column)
            error = (column - target) / diag[j]
            wb[:, j:] -= error[:, None] * ub[j, j:][None, :]
            wb[:, j] = target  # exactly zero where pruned
            errors[:, j] = error
        w[:, end:] -= errors @ u[start:end, end:]
    return w, ~pruned


def _block_count(left: int, forced: Tensor, start: int, end: int, cols: int, rows: int) -> int:
    """Entries to prune in columns [start, end): the remaining count spread in proportion to
    width, within what is feasible (every forced entry pruned, room left for what follows)."""
    width, remaining = end - start, cols - start
    share = math.floor(left * width / remaining + 0.5)
    lower = max(int(forced[:, start:end].sum()), left - rows * (remaining - width))
    upper = min(rows * width, left - int(forced[:, end:].sum()))
    return min(max(share, lower), upper)


def _lowest(saliency: Tensor, forced: Tensor, count: int) -> Tensor:
    """A mask of the `count` lowest saliencies, forced entries first, ties by position."""
    flat = torch.where(forced, torch.full_like(saliency, -math.inf), saliency).reshape(-1)
    order = torch.sort(flat, stable=True).indices[:count]
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask[order] = True
    return mask.reshape(saliency.shape)


def _lowest_per_row(saliency: Tensor, forced: Tensor, count: int) -> Tensor:
    """Per row, the `count` lowest saliencies (at least every forced entry)."""
    ranked = torch.where(forced, torch.full_like(saliency, -math.inf), saliency)
    order = torch.sort(ranked, dim=1, stable=True).indices
    mask = torch.zeros_like(saliency, dtype=torch.bool)
    mask.scatter_(1, order[:, :count], True)
    return mask | forced
