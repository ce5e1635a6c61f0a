"""Contract tests over every registered estimator, the magnitude estimator by hand, the registry."""

from __future__ import annotations

import pytest
import torch

from onnxprune.errors import UsageError
from onnxprune.estimators import ESTIMATORS
from onnxprune.masks import global_masks, layer_masks, prune_count
from onnxprune.registry import Registry

WEIGHTS = {
    "conv": torch.randn(4, 3, 3, 3, generator=torch.Generator().manual_seed(0)),
    "fc": torch.randn(10, 12, generator=torch.Generator().manual_seed(1)),
}


@pytest.fixture(params=ESTIMATORS.names())
def estimator(request):
    est = ESTIMATORS.get(request.param)()
    if est.needs_calibration:
        pytest.skip("data-driven estimators have their own contract test with a model")
    return est


@pytest.mark.parametrize("scope", [global_masks, layer_masks])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9])
def test_contract_shapes_exact_sparsity_and_zeroed_entries(estimator, scope, sparsity):
    scores = {name: estimator.scores(name, w.clone()) for name, w in WEIGHTS.items()}
    for name, s in scores.items():
        assert s.shape == WEIGHTS[name].shape
        assert torch.isfinite(s).all()
    masks = scope(scores, sparsity)
    total = sum(w.numel() for w in WEIGHTS.values())
    if scope is global_masks:
        assert sum(int((~m).sum()) for m in masks.values()) == prune_count(total, sparsity)
    for name, w in WEIGHTS.items():
        new = estimator.compensate(name, w.clone(), masks[name])
        assert new.shape == w.shape
        assert torch.all(new[~masks[name]] == 0)
        if scope is layer_masks:
            assert int((new == 0).sum()) == prune_count(w.numel(), sparsity)


def test_magnitude_by_hand():
    est = ESTIMATORS.get("magnitude")()
    w = torch.tensor([[0.5, -2.0], [0.1, -0.3]])
    assert torch.equal(est.scores("w", w), torch.tensor([[0.5, 2.0], [0.1, 0.3]]))
    keep = layer_masks({"w": est.scores("w", w)}, 0.5)["w"]
    assert torch.equal(est.compensate("w", w, keep), torch.tensor([[0.5, -2.0], [0.0, 0.0]]))


def test_registry_refuses_duplicates_and_lists_valid_names():
    reg: Registry[int] = Registry("widget")
    reg.register("a")(1)
    reg.register("b")(2)
    with pytest.raises(ValueError, match="already registered"):
        reg.register("a")(3)
    with pytest.raises(UsageError, match="unknown widget 'c'; valid: a, b"):
        reg.get("c")
    assert reg.names() == ("a", "b")


def test_estimator_registry_has_magnitude():
    assert "magnitude" in ESTIMATORS
    with pytest.raises(UsageError, match="valid: .*magnitude"):
        ESTIMATORS.get("nope")
