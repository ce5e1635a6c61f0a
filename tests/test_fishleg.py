"""FishLeg maths against explicit matrices, and the online learner."""

from __future__ import annotations

import pytest
import torch

from onnxprune.config import PruneConfig
from onnxprune.estimators import ESTIMATORS
from onnxprune.fishleg_maths import (
    KronFactors,
    auxiliary_loss,
    block_split,
    init_factors,
    joint_update,
    kfac_factors,
    q_dense,
    q_diagonal,
    summed_update,
)

F64 = torch.float64


def random_factors(m: int, n: int, row_block: int, col_block: int, seed: int) -> KronFactors:
    gen = torch.Generator().manual_seed(seed)
    rows, cols = -(-m // row_block), -(-n // col_block)
    eye = lambda count, size: torch.eye(size, dtype=F64).expand(count, size, size)  # noqa: E731
    return KronFactors(
        R=eye(rows, row_block) + 0.3 * torch.randn(rows, row_block, row_block, generator=gen, dtype=F64),
        L=eye(cols, col_block) + 0.3 * torch.randn(cols, col_block, col_block, generator=gen, dtype=F64),
        A=torch.rand(m, n, generator=gen, dtype=F64) + 0.5,
    )


def test_q_is_symmetric_positive_definite_and_its_diagonal_has_a_closed_form():
    theta = random_factors(3, 5, 2, 3, seed=0)  # both sides padded to whole blocks
    q = q_dense(theta)
    torch.testing.assert_close(q, q.T, rtol=0, atol=1e-12)
    assert float(torch.linalg.eigvalsh(q).min()) > 0
    torch.testing.assert_close(q_diagonal(theta), torch.diagonal(q).reshape(3, 5), rtol=0, atol=1e-12)


@pytest.mark.parametrize("precondition", [True, False])
@pytest.mark.parametrize("seed", [1, 7])
def test_q_trained_on_exact_fisher_vector_products_converges_to_the_damped_inverse(precondition, seed):
    """F is chosen so that (F + γI)⁻¹ lies in Q's family; after 3,000 Adam steps (cosine
    learning-rate decay, as the estimator trains) from the diagonal warm start, Q is within 1e-10
    (relative Frobenius norm) of it. Without the decay Adam reaches ~1e-16 and then jitters back
    to ~1e-3 once the gradient vanishes."""
    m, n, gamma = 3, 5, 0.05
    target = q_dense(random_factors(m, n, 3, 5, seed=seed))
    fisher = torch.linalg.inv(target) - gamma * torch.eye(m * n, dtype=F64)
    assert float(torch.linalg.eigvalsh(fisher).min()) > 0  # a valid Fisher

    def fvp(v):
        return (v.reshape(-1, m * n) @ fisher).reshape(v.shape)

    theta = init_factors(torch.diagonal(fisher).reshape(m, n).clone(), gamma, block=8)
    for p in theta.parameters():
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(theta.parameters(), lr=1e-2)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, 3000)
    gen = torch.Generator().manual_seed(2)
    values = []
    for _ in range(3000):
        surrogate, value = auxiliary_loss(
            theta, torch.randn(16, m, n, generator=gen, dtype=F64), fvp, gamma, precondition=precondition
        )
        optimizer.zero_grad()
        surrogate.backward()
        optimizer.step()
        schedule.step()
        values.append(float(value))
    error = float((q_dense(theta).detach() - target).norm() / target.norm())
    assert error < 1e-10
    assert values[-1] < values[0]


def test_warm_start_is_the_damped_inverse_diagonal():
    diagonal = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=F64)
    theta = init_factors(diagonal, gamma=0.5, block=4)
    torch.testing.assert_close(q_dense(theta), torch.diag(1.0 / (diagonal.reshape(-1) + 0.5)))


def test_joint_and_summed_updates_equal_the_dense_obs_formulas():
    theta = random_factors(4, 3, 2, 3, seed=3)
    q = q_dense(theta)
    gen = torch.Generator().manual_seed(4)
    w = torch.randn(4, 3, generator=gen, dtype=F64)
    pruned = torch.zeros(4, 3, dtype=torch.bool)
    pruned[0, 1] = pruned[2, 0] = pruned[3, 2] = True
    support = torch.ones(4, 3, dtype=torch.bool)
    p = pruned.reshape(-1)
    flat = w.reshape(-1)
    joint = flat - q[:, p] @ torch.linalg.solve(q[p][:, p], flat[p])
    joint[p] = 0
    torch.testing.assert_close(joint_update(theta, w, pruned, support).reshape(-1), joint, rtol=0, atol=1e-8)
    summed = flat - q[:, p] @ (flat[p] / torch.diagonal(q)[p])
    summed[p] = 0
    torch.testing.assert_close(summed_update(theta, w, pruned, support).reshape(-1), summed, rtol=0, atol=1e-10)


def test_the_online_learner_continues_with_few_steps_and_records_its_curve():
    config = PruneConfig(
        input="i", output="o", sparsity=0.5, method="fishleg", fishleg_steps=30, fishleg_online_steps=5
    )
    estimator = ESTIMATORS.get("fishleg")(config)
    learner = estimator.statistics("w", (4, 6))
    assert estimator.statistics("w", (4, 6)) is learner  # the same learner at every step
    grads = torch.randn(40, 24, generator=torch.Generator().manual_seed(5))
    learner.update(grads)
    keep = torch.ones(24, dtype=torch.bool)
    keep[:8] = False
    learner.update(grads * keep, keep=keep)
    assert [len(c) for c in learner.curve] == [30, 5]
    assert len(estimator.curve()) == 35
    assert learner.keep.reshape(-1).tolist() == keep.tolist()
    new = estimator.compensate(torch.randn(24), keep & (torch.arange(24) < 20), learner)
    assert bool((new[~(keep & (torch.arange(24) < 20))] == 0).all())


@pytest.mark.parametrize("block", [256, 2])
def test_kfac_warm_start_is_the_damped_inverse_of_the_kronecker_factored_fisher(block):
    """F ≈ f̄ Â⊗B̂ from gradient rows G_k = δ_k x_kᵀ: Â ∝ mean G Gᵀ, B̂ ∝ mean Gᵀ G (mean
    eigenvalue 1), f̄ = mean diag F; Q = (1/f̄)(Â + √δ I)⁻¹ ⊗ (B̂ + √δ I)⁻¹, block-diagonal
    factors keeping the diagonal blocks when the layer is larger than `block`."""
    generator = torch.Generator().manual_seed(3)
    m, n, count, damp = 3, 5, 40, 0.1
    delta = torch.randn(count, m, generator=generator, dtype=torch.float64)
    x = torch.randn(count, n, generator=generator, dtype=torch.float64)
    grads = delta[:, :, None] * x[:, None, :]
    theta = kfac_factors(grads, damp, block)

    rows = torch.einsum("kij,klj->il", grads, grads) / count
    cols = torch.einsum("kji,kjl->il", grads, grads) / count
    a_hat, b_hat = rows / (torch.trace(rows) / m), cols / (torch.trace(cols) / n)
    mean_diagonal = (grads**2).mean()

    def blockwise_inverse(matrix: torch.Tensor, size: int) -> torch.Tensor:
        out = torch.zeros_like(matrix)
        width = block_split(len(matrix), size)[1]
        for start in range(0, len(matrix), width):
            part = slice(start, start + width)
            out[part, part] = torch.linalg.inv(matrix[part, part])
        return out

    eye = lambda k: torch.eye(k, dtype=torch.float64)  # noqa: E731
    expected = (
        torch.kron(
            blockwise_inverse(a_hat + damp**0.5 * eye(m), block), blockwise_inverse(b_hat + damp**0.5 * eye(n), block)
        )
        / mean_diagonal
    )
    torch.testing.assert_close(q_dense(theta), expected, rtol=1e-10, atol=0)
    if block == 2:  # the factors really are block-diagonal: entries across blocks are zero
        assert float(expected[0, 2 * n]) == 0.0 and float(q_dense(theta)[0, 2 * n]) == 0.0
