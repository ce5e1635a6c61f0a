"""Contract tests over every registered estimator, each estimator by hand, the registry."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from onnxprune.config import PruneConfig
from onnxprune.errors import UsageError
from onnxprune.estimators import ESTIMATORS
from onnxprune.masks import global_masks, layer_masks, prune_count
from onnxprune.registry import Registry

GEN = torch.Generator().manual_seed(0)
WEIGHTS = {"conv": torch.randn(4 * 3 * 3 * 3, generator=GEN), "fc": torch.randn(10 * 12, generator=GEN)}
SHAPES = {"conv": (4, 27), "fc": (10, 12)}
GRADS = {name: torch.randn(40, w.numel(), generator=GEN) for name, w in WEIGHTS.items()}
# calibration input rows of each layer, for the layer-wise estimators (Wanda, SparseGPT)
INPUTS = {name: torch.randn(40, SHAPES[name][1], generator=GEN) for name in WEIGHTS}
# the task loss's Fisher of each output unit of each layer, for the combined estimator
SENSITIVITY = {name: torch.rand(SHAPES[name][0], generator=GEN, dtype=torch.float64) + 0.1 for name in WEIGHTS}


def make(name: str, **options):
    config = PruneConfig(
        input="in.onnx",
        output="out.onnx",
        sparsity=0.5,
        method=name,
        block_size=16,
        damp=0.1,
        fishleg_damp=0.1,
        **options,
    )
    estimator = ESTIMATORS.get(name)(config)
    if estimator.needs_output_gradients:
        estimator.set_sensitivity(SENSITIVITY)
    return estimator


def statistics(estimator, name: str, splits=(40,)):
    stats = estimator.statistics(name, SHAPES[name])
    start = 0
    for size in splits:
        if stats is not None and estimator.needs_activations:
            stats.update(INPUTS[name][start : start + size].unsqueeze(0))
        elif stats is not None:
            stats.update(GRADS[name][start : start + size])
        start += size
    return stats


def hand_scores(method: str, w: torch.Tensor, g: torch.Tensor, x: torch.Tensor, name: str) -> torch.Tensor:
    """Each estimator's saliency from the mean statistics, computed directly (float64); `g` are
    gradient rows, `x` input rows of the layer."""
    w, g, x = w.double(), g.double(), x.double()
    if method == "combined":  # SparseGPT's, row i weighted by (1 − α) + α s_i / mean s (α = 0.5)
        mean = torch.cat(list(SENSITIVITY.values())).mean()
        rows = 0.5 + 0.5 * SENSITIVITY[name] / mean
        return (hand_scores("sparsegpt", w, g, x, name).reshape(len(rows), -1) * rows[:, None]).reshape(-1)
    if method == "wanda":  # |W_ij| · ‖X_j‖
        return (w.reshape(-1, x.shape[1]).abs() * x.norm(dim=0)).reshape(-1)
    if method == "sparsegpt":  # w² / (2 [H⁻¹]_jj), H = mean xxᵀ + λI, λ = damp · mean diag
        hessian = x.T @ x / len(x)
        hessian = hessian + 0.1 * hessian.diagonal().mean() * torch.eye(x.shape[1], dtype=torch.float64)
        inverse = torch.linalg.inv(hessian).diagonal()
        return (w.reshape(-1, x.shape[1]) ** 2 / (2 * inverse)).reshape(-1)
    if method == "magnitude":
        return w.abs()
    if method == "diagonal-fisher":  # damped: diag F + damp · mean(diag F)
        diagonal = (g * g).mean(0)
        return w * w * (diagonal + 0.1 * diagonal.mean()) / 2
    if method == "fishleg":  # the warm start: Q = diag(1 / (mean g² + γ)), γ = damp · mean(g²)
        diagonal = (g * g).mean(0)
        return w * w * (diagonal + 0.1 * diagonal.mean()) / 2
    if method == "woodfisher":  # dense inverse of λI + mean g gᵀ per block of 16
        damp = 0.1 * float((g * g).mean())
        out = torch.empty_like(w)
        for start in range(0, len(w), 16):
            block = g[:, start : start + 16]
            fisher = damp * torch.eye(block.shape[1], dtype=torch.float64) + block.T @ block / len(g)
            out[start : start + 16] = w[start : start + 16] ** 2 / (2 * torch.linalg.inv(fisher).diagonal())
        return out
    raise AssertionError(f"no hand computation for {method}; add one")


@pytest.fixture(params=ESTIMATORS.names())
def method(request):
    return request.param


def test_accumulation_over_several_batches_equals_the_hand_computed_mean(method):
    # FishLeg: its diagonal warm start, before any auxiliary training (the Kronecker warm start's
    # Q is checked against its dense formula in test_fishleg.py)
    options = {"fishleg_steps": 0, "fishleg_init": "diagonal"}
    for name, w in WEIGHTS.items():
        reference = hand_scores(method, w, GRADS[name], INPUTS[name], name)
        one = make(method, **options).scores(w.clone(), statistics(make(method, **options), name))
        np.testing.assert_allclose(one.double().numpy(), reference.numpy(), rtol=1e-5, atol=1e-12)
        if make(method).online:
            continue  # online learners take one update per pruning step, by design
        splits = (1,) * 40 if make(method).streams_gradients else (7, 20, 13)  # streamed: row by row
        split = make(method).scores(w.clone(), statistics(make(method), name, splits=splits))
        np.testing.assert_allclose(split.double().numpy(), reference.numpy(), rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("scope", [global_masks, layer_masks])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9])
def test_contract_shapes_exact_sparsity_and_zeroed_entries(method, scope, sparsity):
    estimator = make(method)
    stats = {name: statistics(estimator, name) for name in WEIGHTS}
    scores = {name: estimator.scores(w.clone(), stats[name]) for name, w in WEIGHTS.items()}
    for name, s in scores.items():
        assert s.shape == WEIGHTS[name].shape and bool(torch.isfinite(s).all()) and bool((s >= 0).all())
    masks = scope(scores, sparsity)
    total = sum(w.numel() for w in WEIGHTS.values())
    if scope is global_masks:
        assert sum(int((~m).sum()) for m in masks.values()) == prune_count(total, sparsity)
    for name, w in WEIGHTS.items():
        forced = torch.zeros_like(masks[name])
        new, keep = estimator.prune(w.clone(), masks[name], stats[name], forced)
        assert new.shape == w.shape and keep.shape == w.shape and bool(torch.isfinite(new).all())
        assert bool(torch.all(new[~keep] == 0))
        assert int((~keep).sum()) == int((~masks[name]).sum())  # an estimator may move the mask, not the count
        if scope is layer_masks:
            assert int((~keep).sum()) == prune_count(w.numel(), sparsity)
        if sparsity == 0.0:  # nothing pruned: nothing to compensate
            torch.testing.assert_close(new.float(), w, rtol=0, atol=1e-6)


def test_memory_needs_are_declared_for_data_driven_estimators(method):
    estimator = make(method)
    need = estimator.memory((100, 100), 64)
    if estimator.needs_gradients and estimator.streams_gradients:
        # one row at a time: sums (of squares, or of outer products per block), independent of the
        # number of rows, and less than holding them once there are many
        assert need.peak >= 8 * 10_000 and need == estimator.memory((100, 100), 1024)
        assert need.peak < 4 * 10_000 * 1024
    elif estimator.needs_gradients:
        assert need.peak >= 4 * 10_000 * 64  # at least the gradient rows
    if estimator.compensates:
        assert need.kept > 0


def test_magnitude_by_hand():
    est = make("magnitude")
    w = torch.tensor([0.5, -2.0, 0.1, -0.3])
    assert torch.equal(est.scores(w, None), torch.tensor([0.5, 2.0, 0.1, 0.3]))
    keep = layer_masks({"w": est.scores(w, None)}, 0.5)["w"]
    assert torch.equal(est.compensate(w, keep, None), torch.tensor([0.5, -2.0, 0.0, 0.0]))


def test_diagonal_fisher_by_hand():
    est = make("diagonal-fisher")
    stats = est.statistics("w", (1, 2))
    stats.update(torch.tensor([[1.0, 2.0], [3.0, 0.0]]))
    # diag F = mean g² = [5, 2], damped by 0.1 · mean = 0.35: [5.35, 2.35]; ρ = w² (F + λ) / 2
    assert est.scores(torch.tensor([2.0, 1.0]), stats).tolist() == pytest.approx([10.7, 1.175])


def test_woodfisher_joint_update_differs_from_summed_when_pruned_weights_interact():
    base = dict(input="i.onnx", output="o.onnx", sparsity=0.5, method="woodfisher", block_size=4, damp=0.01)
    joint = ESTIMATORS.get("woodfisher")(PruneConfig(**base, obs_update="joint"))
    summed = ESTIMATORS.get("woodfisher")(PruneConfig(**base, obs_update="summed"))
    g = torch.randn(30, 4, generator=torch.Generator().manual_seed(3))
    g[:, 1] = g[:, 0] + 0.1 * g[:, 1]  # strongly correlated pair
    w = torch.tensor([1.0, -0.8, 0.5, 0.3])
    keep = torch.tensor([False, False, True, True])
    one, two = joint.statistics("w", (1, 4)), summed.statistics("w", (1, 4))
    one.update(g)
    two.update(g)
    a, b = joint.compensate(w, keep, one), summed.compensate(w, keep, two)
    assert a[:2].tolist() == [0.0, 0.0] == b[:2].tolist()
    assert not torch.allclose(a, b)


def test_registry_refuses_duplicates_and_lists_valid_names():
    reg: Registry[int] = Registry("widget")
    reg.register("a")(1)
    reg.register("b")(2)
    with pytest.raises(ValueError, match="already registered"):
        reg.register("a")(3)
    with pytest.raises(UsageError, match="unknown widget 'c'; valid: a, b"):
        reg.get("c")
    assert reg.names() == ("a", "b")


def test_estimator_registry_lists_all_methods():
    assert {"magnitude", "diagonal-fisher", "woodfisher", "fishleg", "wanda", "sparsegpt"} <= set(ESTIMATORS.names())
    with pytest.raises(UsageError, match="valid: .*woodfisher"):
        ESTIMATORS.get("nope")
