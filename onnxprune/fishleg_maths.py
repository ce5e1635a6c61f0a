"""FishLeg maths: a structured approximation Q(θ) of the damped inverse Fisher, learned directly.

For a weight matrix W of shape m×n (output units × inputs, conv kernels flattened), Q acts on a
matrix V of the same shape as

    Q V = A ⊙ (RᵀR (A ⊙ V) L Lᵀ)

with R (m×m) and L (n×n) Kronecker factors, each block-diagonal (blocks of at most `block`
rows/columns, so large layers stay affordable), and A (m×n) an elementwise scale. Q is symmetric
positive definite whenever L, R are invertible and A has no zeros. θ = (L, R, A) is trained by
minimising the auxiliary loss

    𝒜(θ) = E_u[ ½ vᵀ(F + γI)v − uᵀv ],  v = Q(θ) u,

whose minimiser over all SPD Q is (F + γI)⁻¹. F v is estimated from gradients g as mean g (gᵀv).
All functions are pure: parameters and data in, tensors out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor


@dataclass
class KronFactors:
    """θ: block-diagonal R [rb, sr, sr] (rows), L [lb, sl, sl] (columns), A [m, n]."""

    R: Tensor
    L: Tensor
    A: Tensor

    def parameters(self) -> list[Tensor]:
        return [self.R, self.L, self.A]


def block_split(size: int, block: int) -> tuple[int, int]:
    """(number of blocks, block size) covering `size` with blocks of at most `block`."""
    count = -(-size // block)
    return count, -(-size // count)


def init_factors(diagonal: Tensor, gamma: float, block: int) -> KronFactors:
    """Warm start: Q = diag(1 / (diag F + γ)), i.e. L = I, R = I, A = (diag F + γ)^(-1/2)."""
    m, n = diagonal.shape
    rb, sr = block_split(m, block)
    lb, sl = block_split(n, block)

    def eye(count: int, size: int) -> Tensor:
        return torch.eye(size, dtype=diagonal.dtype, device=diagonal.device).expand(count, size, size).clone()

    return KronFactors(R=eye(rb, sr), L=eye(lb, sl), A=(diagonal + gamma).rsqrt())


def _block_inverse_sqrt(gram: Tensor, size: int, shift: float) -> Tensor:
    """(Ĝ + shift·I)^(-1/2) per diagonal block [count, s, s] of a Gram matrix of `size` rows,
    Ĝ scaled to mean eigenvalue 1 over those rows (zero padding rows get shift^(-1/2))."""
    mean = float(torch.diagonal(gram, dim1=-2, dim2=-1).sum()) / size
    scaled = gram / mean if mean > 0 else gram
    values, vectors = torch.linalg.eigh(scaled.double())
    values = values.clamp_min(0.0) + shift
    return (vectors * values.rsqrt().unsqueeze(-2)) @ vectors.transpose(-2, -1)


def kfac_factors(grads: Tensor, damp: float, block: int) -> KronFactors:
    """Warm start from the Kronecker structure of the gradients: F ≈ f̄ · Â ⊗ B̂ with
    Â ∝ mean G Gᵀ (rows) and B̂ ∝ mean Gᵀ G (columns), each scaled to mean eigenvalue 1, and
    f̄ = mean diag F. With relative damping δ (γ = δ f̄), F + γI ≈ f̄ (Â + √δ I) ⊗ (B̂ + √δ I),
    whose inverse is Q with RᵀR = (Â + √δ I)⁻¹, LLᵀ = (B̂ + √δ I)⁻¹, A = f̄^(-1/2).
    Factors are block-diagonal (diagonal blocks of Â, B̂) for layers larger than `block`."""
    count, m, n = grads.shape
    g = grads.double()
    rb, sr = block_split(m, block)
    lb, sl = block_split(n, block)
    padded = _pad(g, rb * sr, lb * sl)
    rows = padded.reshape(count, rb, sr, lb * sl)
    gram_rows = torch.einsum("kbic,kbjc->bij", rows, rows) / count
    cols = padded.reshape(count, rb * sr, lb, sl)
    gram_cols = torch.einsum("krbi,krbj->bij", cols, cols) / count
    shift = max(float(damp), 1e-12) ** 0.5
    mean_diagonal = float((g * g).mean())
    scale = mean_diagonal**-0.5 if mean_diagonal > 0 else 1.0
    R = _block_inverse_sqrt(gram_rows, m, shift).to(grads.dtype)
    L = _block_inverse_sqrt(gram_cols, n, shift).to(grads.dtype)
    return KronFactors(R=R, L=L, A=torch.full((m, n), scale, dtype=grads.dtype, device=grads.device))


def _pad(x: Tensor, rows: int, cols: int) -> Tensor:
    return torch.nn.functional.pad(x, (0, cols - x.shape[-1], 0, rows - x.shape[-2]))


def q_apply(theta: KronFactors, V: Tensor) -> Tensor:
    """Q V for V of shape [..., m, n]."""
    A, R, L = theta.A, theta.R, theta.L
    m, n = A.shape
    rb, sr = R.shape[0], R.shape[1]
    lb, sl = L.shape[0], L.shape[1]
    X = _pad(A * V, rb * sr, lb * sl)
    lead = X.shape[:-2]
    # rows: RᵀR per row block
    X = X.reshape(*lead, rb, sr, lb * sl)
    X = torch.einsum("bji,bjk,...bkc->...bic", R, R, X).reshape(*lead, rb * sr, lb, sl)
    # columns: L Lᵀ per column block
    X = torch.einsum("...rbj,bjk,bik->...rbi", X, L, L).reshape(*lead, rb * sr, lb * sl)
    return A * X[..., :m, :n]


def q_diagonal(theta: KronFactors) -> Tensor:
    """diag(Q) in closed form: Q_(i,j),(i,j) = A_ij² (RᵀR)_ii (LLᵀ)_jj."""
    m, n = theta.A.shape
    rtr = (theta.R * theta.R).sum(1).reshape(-1)[:m]  # diag(RᵀR): column norms of each block
    llt = (theta.L * theta.L).sum(2).reshape(-1)[:n]  # diag(LLᵀ): row norms
    return theta.A * theta.A * torch.outer(rtr, llt)


def q_dense(theta: KronFactors) -> Tensor:
    """Q as an explicit (m·n)×(m·n) matrix, row-major vec (for tests on small shapes)."""
    m, n = theta.A.shape
    basis = torch.eye(m * n, dtype=theta.A.dtype, device=theta.A.device).reshape(m * n, m, n)
    return q_apply(theta, basis).reshape(m * n, m * n)


def gradient_fvp(grads: Tensor) -> Callable[[Tensor], Tensor]:
    """F V ≈ mean_k g_k ⟨g_k, V⟩ from gradient rows [N, m, n]; V is [..., m, n]."""

    def fvp(V: Tensor) -> Tensor:
        dots = torch.einsum("kmn,...mn->...k", grads, V)
        return torch.einsum("...k,kmn->...mn", dots, grads) / len(grads)

    return fvp


def auxiliary_loss(
    theta: KronFactors,
    probes: Tensor,
    fvp: Callable[[Tensor], Tensor],
    gamma: float,
    mask: Tensor | None = None,
    precondition: bool = True,
) -> tuple[Tensor, Tensor]:
    """(surrogate to differentiate, value of 𝒜) for probe matrices u [p, m, n].

    Pruned coordinates (mask False) are removed from u and v, so Q learns the inverse of the
    Fisher restricted to the kept weights. With `precondition`, the residual r = (F+γI)v − u that
    drives the gradient is replaced by Q r: the same fixed point, with the curvature of F taken
    out of the step (the gradient of ⟨stop_grad(Q r), v(θ)⟩ is J_θᵀ Q r)."""
    if mask is not None:
        probes = probes * mask
    v = q_apply(theta, probes)
    if mask is not None:
        v = v * mask
    fv = fvp(v) + gamma * v
    value = (0.5 * (v * fv).sum((-2, -1)) - (probes * v).sum((-2, -1))).mean()
    if not precondition:
        return value, value.detach()
    residual = (fv - probes).detach()
    if mask is not None:
        residual = residual * mask
    with torch.no_grad():
        direction = q_apply(theta, residual)
        if mask is not None:
            direction = direction * mask
    surrogate = (direction * v).sum((-2, -1)).mean()
    return surrogate, value.detach()


def conjugate_gradient(
    operator: Callable[[Tensor], Tensor], rhs: Tensor, iterations: int = 100, tolerance: float = 1e-8
) -> Tensor:
    """Solve operator(x) = rhs for a symmetric positive definite operator (matrices in, out)."""
    x = torch.zeros_like(rhs)
    r = rhs.clone()
    p = r.clone()
    rs = (r * r).sum()
    bound = tolerance * tolerance * max(float(rs), 1e-300)
    for _ in range(iterations):
        if float(rs) <= bound:
            break
        q = operator(p)
        alpha = rs / (p * q).sum()
        x = x + alpha * p
        r = r - alpha * q
        new = (r * r).sum()
        p = r + (new / rs) * p
        rs = new
    return x


def joint_update(theta: KronFactors, w: Tensor, pruned: Tensor, support: Tensor) -> Tensor:
    """w − Q[:,P] (Q[P,P])⁻¹ w_P within the weights Q was learned on (`support`), by conjugate
    gradients on P = `pruned`; pruned entries exactly 0."""

    def restricted(x: Tensor) -> Tensor:
        return q_apply(theta, x * pruned) * pruned

    with torch.no_grad():
        z = conjugate_gradient(restricted, w * pruned)
        new = w - q_apply(theta, z) * support
    return torch.where(pruned | ~support, torch.zeros_like(new), new)


def summed_update(theta: KronFactors, w: Tensor, pruned: Tensor, support: Tensor) -> Tensor:
    """The sum of single-weight OBS updates −Σ_q Q e_q w_q / Q_qq; pruned entries exactly 0."""
    with torch.no_grad():
        z = torch.where(pruned, w / q_diagonal(theta), torch.zeros_like(w))
        new = w - q_apply(theta, z) * support
    return torch.where(pruned | ~support, torch.zeros_like(new), new)


def kron_parts(theta: KronFactors) -> tuple[Tensor, Tensor]:
    """The dense row and column factors P = RᵀR (m×m) and S = LLᵀ (n×n) of Q, so that
    Q_(i,j),(k,l) = A_ij A_kl P_ik S_jl (block-diagonal, padding cut off)."""
    m, n = theta.A.shape
    rows = torch.block_diag(*(theta.R.transpose(1, 2) @ theta.R))[:m, :m]
    cols = torch.block_diag(*(theta.L @ theta.L.transpose(1, 2)))[:n, :n]
    return rows, cols


def rectangle_saliency(w: Tensor, a: Tensor, rows: Tensor, cols: Tensor, row_factor, col_factor) -> Tensor:
    """OBS saliency of removing the rectangle R×C of W together, ½ w_Gᵀ (Q_GG)⁻¹ w_G with
    Q_GG = diag(a_G) (P_RR ⊗ S_CC) diag(a_G): ½ tr(P_RR⁻¹ Ṽ S_CC⁻¹ Ṽᵀ), Ṽ = (W / A)[R, C].
    `row_factor`, `col_factor`: Cholesky factors of P_RR and S_CC."""
    v = (w / a)[rows][:, cols]
    left = torch.cholesky_solve(v, row_factor)  # P_RR⁻¹ Ṽ
    both = torch.cholesky_solve(left.T, col_factor).T  # P_RR⁻¹ Ṽ S_CC⁻¹
    return 0.5 * (both * v).sum()


def entries_saliency(w: Tensor, a: Tensor, rows: Tensor, cols: Tensor, p: Tensor, s: Tensor) -> Tensor:
    """The same for any set of entries (row i_k, column j_k): Q_GG built explicitly."""
    scale = a[rows, cols]
    q = scale[:, None] * scale[None, :] * p[rows][:, rows] * s[cols][:, cols]
    x = w[rows, cols]
    return 0.5 * x @ torch.linalg.solve(q, x)


# a group that is not a rectangle of rows × columns is solved explicitly up to this many entries
# (its Q_GG then takes 128 MiB); beyond, its single-entry saliencies are summed
DENSE_GROUP_LIMIT = 4096


def q_group_saliency(theta: KronFactors, w: Tensor, groups: list[Tensor]) -> Tensor:
    """Per group of flat (row-major) entries of W [m, n], the OBS saliency of removing it
    together under Q: whole rows or columns (a channel's rows, its consumers' columns) in closed
    form through the Kronecker factors, each factor's Cholesky computed once per index set."""
    theta = KronFactors(R=theta.R.detach().double(), L=theta.L.detach().double(), A=theta.A.detach().double())
    w, a = w.double(), theta.A
    n = w.shape[1]
    p, s = kron_parts(theta)
    factors: dict[tuple[str, bytes], Tensor] = {}

    def factor(kind: str, matrix: Tensor, index: Tensor) -> Tensor:
        key = (kind, index.numpy().tobytes())
        if key not in factors:
            on = index.to(matrix.device)
            factors[key] = torch.linalg.cholesky(matrix[on][:, on])
        return factors[key]

    values = []
    for group in groups:
        index = group.reshape(-1).cpu()  # on the host: its bytes key the factor cache
        rows, cols = torch.unique(index // n), torch.unique(index % n)
        on = index.to(w.device)
        if index.numel() == 0:
            values.append(w.new_zeros(()))
        elif rows.numel() * cols.numel() == torch.unique(index).numel():
            row_factor, col_factor = factor("rows", p, rows), factor("cols", s, cols)
            values.append(rectangle_saliency(w, a, rows.to(w.device), cols.to(w.device), row_factor, col_factor))
        elif index.numel() <= DENSE_GROUP_LIMIT:
            values.append(entries_saliency(w, a, on // n, on % n, p, s))
        else:
            diagonal = a * a * torch.outer(p.diagonal(), s.diagonal())
            values.append((w * w / (2.0 * diagonal)).reshape(-1)[on].sum())
    return torch.stack(values) if values else w.new_zeros(0)
