"""Reconstruction after pruning: pure functions on one layer's calibration moments.

A pruned weight W [rows, cols] (canonical order; batched over a leading axis of groups for grouped
convolutions: [g, rows, cols]) sees input rows X_p from the pruned model, where the dense weight
W₀ saw X_d from the dense model on the same samples. Its reconstruction error is

    E(W) = ‖X_p Wᵀ − X_d W₀ᵀ‖²  =  Σ_i  w_iᵀ P w_i − 2 w_iᵀ C w₀ᵢ + const,

with P = X_pᵀX_p and C = X_pᵀX_d (sums over rows; `Moments`). Three things are done with it:

- `refine_masks`: DSnoT-style swaps inside each row — revive a pruned weight at its dense value and
  prune a kept one — accepted only when they lower E, so E never increases and every row keeps
  its count of zeros.
- `solve_masked`: the optimal surviving weights for a fixed mask, the least-squares solution of
  min ‖X_p w_S − X_d w₀‖² + λ‖w_S − w_cur,S‖² per row (λ = 0: `numpy.linalg.lstsq`).
- `affine_correction`: per output channel, a scale and shift that give the pruned layer's output
  the dense output's mean (and variance) on the calibration rows (statistics correction).

`scaled_update` (a fraction of an estimator's update of the survivors) is the one function here
that works on whole flat tensors rather than a layer's moments.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Moments:
    """Sums over the calibration input rows of one weight's layer, per group: P = X_pᵀX_p,
    C = X_pᵀX_d, D = X_dᵀX_d [g, cols, cols], the row sums of X_p and X_d [g, cols], and the row
    count (per group)."""

    pp: Tensor
    pd: Tensor
    dd: Tensor
    sum_p: Tensor
    sum_d: Tensor
    count: int

    @staticmethod
    def empty(groups: int, cols: int, device: torch.device | str = "cpu") -> Moments:
        zeros = torch.zeros(groups, cols, cols, dtype=torch.float64, device=device)
        vector = torch.zeros(groups, cols, dtype=torch.float64, device=device)
        return Moments(zeros, zeros.clone(), zeros.clone(), vector, vector.clone(), 0)

    def add(self, pruned: Tensor, dense: Tensor, dense_gram: bool = True) -> None:
        """Add paired rows [g, n, cols] of the pruned and the dense model (same samples). The
        products run in the rows' precision (float32 BLAS is twice as fast on the large unfolded
        convolution inputs) and are summed in float64; `dense_gram` False leaves D alone (it does
        not change between passes over the same samples)."""
        pt = pruned.transpose(1, 2)
        self.pp += (pt @ pruned).double()
        self.pd += (pt @ dense).double()
        if dense_gram:
            self.dd += (dense.transpose(1, 2) @ dense).double()
        self.sum_p += pruned.sum(1, dtype=torch.float64)
        self.sum_d += dense.sum(1, dtype=torch.float64)
        self.count += pruned.shape[1]


def reconstruction_error(weight: Tensor, dense: Tensor, moments: Moments) -> Tensor:
    """E(W) per group [g] up to the constant ‖X_d W₀ᵀ‖² (weights [g, rows, cols])."""
    w, w0 = weight.to(torch.float64), dense.to(torch.float64)
    quadratic = ((w @ moments.pp) * w).sum((1, 2))
    cross = ((w @ moments.pd) * w0).sum((1, 2))
    return quadratic - 2.0 * cross


def refine_masks(
    weight: Tensor, dense: Tensor, keep: Tensor, revivable: Tensor, moments: Moments, cycles: int
) -> tuple[Tensor, Tensor, int]:
    """Swap pruned and kept weights within each row while that lowers the reconstruction error.

    Each cycle, every row considers reviving its best `revivable` pruned entry j at its dense value
    (the largest single decrease of E) together with pruning the kept entry k that makes the pair
    cheapest; the swap is made where the pair lowers E. Rows keep their number of zeros. Returns
    the new weights, keep-mask and the number of swaps made (all shapes [g, rows, cols])."""
    w = weight.to(torch.float64).clone()
    w0 = dense.to(torch.float64)
    keep, revivable = keep.clone(), revivable & ~keep
    pp = moments.pp
    diag = pp.diagonal(dim1=1, dim2=2).unsqueeze(1)  # [g, 1, cols]
    residual = w @ pp - w0 @ moments.pd.transpose(1, 2)  # ∇E/2 per row: P w − C w₀
    swaps = 0
    inf = torch.tensor(float("inf"), dtype=w.dtype, device=w.device)
    for _ in range(cycles):
        grow = w0  # a revived weight takes its dense value
        gain = torch.where(revivable, 2.0 * grow * residual + grow * grow * diag, inf)
        best_gain, j = gain.min(2)  # [g, rows]
        candidate = torch.isfinite(best_gain) & (best_gain < 0)
        if not bool(candidate.any()):
            break
        delta_j = grow.gather(2, j.unsqueeze(2)).squeeze(2)  # [g, rows]
        pp_j = torch.gather(pp, 1, j.unsqueeze(2).expand(-1, -1, pp.shape[2]))  # rows P[j, :] [g, rows, cols]
        # pruning k (δ_k = −w_k) after the revival: E changes by the pair's joint amount
        after = residual + delta_j.unsqueeze(2) * pp_j  # the residual once j is revived
        loss_k = torch.where(keep, -2.0 * w * after + w * w * diag, inf)
        best_k, k = loss_k.min(2)
        total = best_gain + best_k
        accept = candidate & torch.isfinite(best_k) & (total < -1e-12 * (1.0 + best_gain.abs()))
        if not bool(accept.any()):
            break
        rows = accept.nonzero(as_tuple=True)
        jj, kk = j[rows], k[rows]
        wk = w[rows[0], rows[1], kk]
        dj = delta_j[rows]
        w[rows[0], rows[1], jj] = w0[rows[0], rows[1], jj]
        w[rows[0], rows[1], kk] = 0.0
        keep[rows[0], rows[1], jj] = True
        keep[rows[0], rows[1], kk] = False
        revivable[rows[0], rows[1], jj] = False
        # the residual moves by P[:, j] δ_j + P[:, k] δ_k
        residual[rows] += dj.unsqueeze(1) * pp[rows[0], jj] - wk.unsqueeze(1) * pp[rows[0], kk]
        swaps += int(accept.sum())
    return w, keep, swaps


def solve_masked(
    weight: Tensor, dense: Tensor, keep: Tensor, moments: Moments, damp: float, chunk_bytes: int = 1 << 27
) -> Tensor:
    """Per row i, the surviving weights minimising ‖X_p w − X_d w₀ᵢ‖² + λ‖w − wᵢ‖² over the
    entries `keep` allows (the others exactly 0), with λ = damp · mean(diag P) per group: the
    least-squares solution for a fixed mask, pulled towards the current weights when the
    calibration rows do not determine it. Shapes [g, rows, cols]; float64 out."""
    w = weight.to(torch.float64)
    w0 = dense.to(torch.float64)
    groups, rows, cols = w.shape
    out = torch.zeros_like(w)
    for g in range(groups):
        pp = moments.pp[g]
        lam = damp * float(pp.diagonal().mean()) if pp.numel() else 0.0
        target = w0[g] @ moments.pd[g].T + lam * w[g]  # (C w₀ + λ w) per row [rows, cols]
        sizes = keep[g].sum(1)
        width = max(1, int(sizes.max()) if rows else 1)
        per_chunk = max(1, chunk_bytes // (8 * 3 * width * width))
        for start in range(0, rows, per_chunk):
            stop = min(start + per_chunk, rows)
            # each row's kept columns first (in order), padded to the chunk's widest support
            k = keep[g, start:stop]
            order = torch.sort((~k).to(torch.int8), dim=1, stable=True).indices[:, :width]
            valid = k.gather(1, order).to(torch.float64)  # [r, m]
            system = pp[order.unsqueeze(2), order.unsqueeze(1)] * valid.unsqueeze(2) * valid.unsqueeze(1)
            # padding decouples (identity) and solves to zero, so supports of any size batch together
            system.diagonal(dim1=1, dim2=2).add_(lam * valid + (1.0 - valid))
            rhs = (target[start:stop].gather(1, order) * valid).unsqueeze(2)
            factor, info = torch.linalg.cholesky_ex(system)
            if bool((info == 0).all()):
                solved = torch.cholesky_solve(rhs, factor)
            else:  # singular without damping: the minimum-norm least-squares solution
                solved = torch.linalg.lstsq(system, rhs, driver="gelsd").solution
            out[g, start:stop].scatter_(1, order, solved.squeeze(2) * valid)
    return out


def output_moments(weight: Tensor, row_sum: Tensor, gram: Tensor, count: int) -> tuple[Tensor, Tensor]:
    """Mean and variance over the calibration rows of each output unit of X Wᵀ [g, rows]."""
    w = weight.to(torch.float64)
    n = max(1, count)
    mean_x = row_sum / n  # [g, cols]
    covariance = gram / n - mean_x.unsqueeze(2) * mean_x.unsqueeze(1)
    mean = (w @ mean_x.unsqueeze(2)).squeeze(2)
    variance = ((w @ covariance) * w).sum(2).clamp_min(0.0)
    return mean, variance


def affine_correction(
    dense_mean: Tensor, dense_var: Tensor, mean: Tensor, var: Tensor, variance: bool
) -> tuple[Tensor, Tensor]:
    """(scale, shift) per output unit so that scale·y + shift has the dense output's mean, and with
    `variance` also its variance. A unit whose pruned output barely varies (a removed or dead
    row) keeps scale 1: rescaling it would only amplify what is left of it."""
    scale = torch.ones_like(mean)
    if variance:
        usable = (var > 1e-6 * dense_var) & (var > 0) & (dense_var > 0)
        scale = torch.where(usable, (dense_var / var.clamp_min(1e-300)).sqrt(), scale)
    return scale, dense_mean - scale * mean


def scaled_update(values: Tensor, update: Tensor, scale: float) -> Tensor:
    """`values` (an estimator's result: the survivors with its whole `update` added) with only
    `scale` of the update; pruned entries, where the update is 0, stay 0."""
    return values - (1.0 - scale) * update
