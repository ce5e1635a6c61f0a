"""OBS maths on tiny tensors against hand-computed values."""

from __future__ import annotations

import pytest
import torch

from onnxprune.obs import (
    block_fisher,
    from_blocks,
    obs_joint_update,
    obs_saliency,
    obs_summed_update,
    ordered_factor,
    prefix_update,
    saliency_order,
    to_blocks,
    unordered_inverse,
    woodbury_inverse,
)

F64 = torch.float64


@pytest.mark.parametrize("chunk", [1, 3, 32])
def test_woodbury_recursion_equals_the_dense_inverse(chunk):
    g = torch.randn(20, 3, 5, generator=torch.Generator().manual_seed(0), dtype=F64)
    damp = torch.tensor([0.1, 1.0, 1e-3], dtype=F64)
    finv = woodbury_inverse(g, damp, chunk=chunk)
    for b in range(3):
        dense = damp[b] * torch.eye(5, dtype=F64) + sum(torch.outer(g[k, b], g[k, b]) for k in range(20)) / 20
        torch.testing.assert_close(finv[b], torch.linalg.inv(dense), rtol=0, atol=1e-8)


def test_woodbury_with_more_gradients_than_block_and_large_blocks_matches_per_block_reference():
    # batched solves on 256-wide blocks: compare with a per-block Cholesky reference
    g = torch.randn(300, 2, 256, generator=torch.Generator().manual_seed(1), dtype=F64)
    finv = woodbury_inverse(g, 1e-2, chunk=32)
    fisher = block_fisher(g, 1e-2)
    for b in range(2):
        reference = torch.cholesky_inverse(torch.linalg.cholesky(fisher[b]))
        torch.testing.assert_close(finv[b], reference, rtol=1e-7, atol=1e-8)


def test_obs_on_a_2d_quadratic_equals_the_closed_form():
    # F = [[a, b], [b, d]]; removing w1 alone: saliency w1² / (2 [F⁻¹]_11) = w1² det / (2 d),
    # and the surviving weight moves to w2 + w1 b / d (the minimiser of the quadratic with w1 = 0)
    a, b, d = 2.0, 0.6, 1.5
    fisher = torch.tensor([[a, b], [b, d]], dtype=F64)
    finv = torch.linalg.inv(fisher).unsqueeze(0)
    w = torch.tensor([[0.7, -0.4]], dtype=F64)
    det = a * d - b * b
    saliency = obs_saliency(w, finv)
    assert saliency[0, 0].item() == pytest.approx(0.7**2 * det / (2 * d))
    prune = torch.tensor([[True, False]])
    for update in (obs_joint_update, obs_summed_update):  # identical for a single pruned weight
        new = update(w, finv, prune)
        assert new[0, 0].item() == 0.0
        assert new[0, 1].item() == pytest.approx(-0.4 + 0.7 * b / d)
    # the predicted loss increase ½ δᵀ F δ equals the saliency
    delta = (obs_joint_update(w, finv, prune) - w)[0]
    assert (0.5 * delta @ fisher @ delta).item() == pytest.approx(saliency[0, 0].item())


def test_joint_update_is_the_constrained_minimiser():
    gen = torch.Generator().manual_seed(2)
    a = torch.randn(6, 6, generator=gen, dtype=F64)
    fisher = a @ a.T + 0.5 * torch.eye(6, dtype=F64)
    w = torch.randn(1, 6, generator=gen, dtype=F64)
    prune = torch.tensor([[True, False, True, False, False, True]])
    new = obs_joint_update(w, torch.linalg.inv(fisher).unsqueeze(0), prune)
    # minimise ½ (v − w)ᵀ F (v − w) with v_Q = 0: F_RR (v_R − w_R) = F_RQ w_Q
    q, r = prune[0], ~prune[0]
    v_r = w[0, r] + torch.linalg.solve(fisher[r][:, r], fisher[r][:, q] @ w[0, q])
    torch.testing.assert_close(new[0, r], v_r, rtol=0, atol=1e-10)
    assert bool((new[0, q] == 0).all())


def test_blocks_with_different_numbers_of_pruned_entries_in_one_batch():
    gen = torch.Generator().manual_seed(3)
    g = torch.randn(40, 3, 4, generator=gen, dtype=F64)
    finv = woodbury_inverse(g, 0.1)
    w = torch.randn(3, 4, generator=gen, dtype=F64)
    prune = torch.tensor([[False] * 4, [True, False, False, False], [True] * 4])
    new = obs_joint_update(w, finv, prune)
    torch.testing.assert_close(new[0], w[0])  # nothing pruned: unchanged
    assert bool((new[2] == 0).all())  # everything pruned
    single = obs_joint_update(w[1:2], finv[1:2], prune[1:2])
    torch.testing.assert_close(new[1:2], single)


def test_blocking_pads_and_restores():
    flat = torch.arange(10.0)
    blocks = to_blocks(flat, 4)
    assert blocks.shape == (3, 4) and blocks[2].tolist() == [8.0, 9.0, 0.0, 0.0]
    assert torch.equal(from_blocks(blocks, 10), flat)
    mask = to_blocks(torch.ones(5, dtype=torch.bool), 4)
    assert mask.dtype == torch.bool and mask[1].tolist() == [True, False, False, False]


def test_one_ordered_factor_gives_the_joint_update_of_every_prefix_and_flags_other_sets():
    gen = torch.Generator().manual_seed(4)
    g = torch.randn(9, 3, 4, generator=gen, dtype=F64)
    finv = woodbury_inverse(g, 0.1)
    w = torch.randn(3, 4, generator=gen, dtype=F64)
    order = saliency_order(w, finv)
    # ascending w²/(2 F⁻¹_qq), by hand for the first block
    saliency = [(w[0, q] ** 2 / (2 * finv[0, q, q])).item() for q in range(4)]
    assert order[0].tolist() == sorted(range(4), key=lambda q: saliency[q])
    factor = ordered_factor(finv, order)
    torch.testing.assert_close(unordered_inverse(factor, order), finv, rtol=1e-12, atol=1e-12)
    rank = torch.argsort(order, dim=1)
    for k in range(5):  # nothing, ..., the whole block
        prune = rank < k
        new, ok = prefix_update(w, factor, order, prune)
        assert bool(ok.all())
        torch.testing.assert_close(new, obs_joint_update(w, finv, prune), rtol=0, atol=1e-12)
        assert bool((new[prune] == 0).all())
        # the factor as WoodFisher stores it (float32): solved in float32, w's dtype kept, within
        # float32 rounding of the float64 update
        new32, _ = prefix_update(w, factor.float(), order, prune)
        assert new32.dtype == F64 and bool((new32[prune] == 0).all())
        torch.testing.assert_close(new32, obs_joint_update(w, finv, prune), rtol=0, atol=1e-6)
    # the second-smallest alone is not a prefix: flagged, to be solved otherwise
    _, ok = prefix_update(w, factor, order, rank == 1)
    assert not bool(ok.any())
