"""The extension points: estimators declare their settings, allocators turn scores into exact
masks, names fail with the valid ones, and a new estimator or allocation is one class and one
registration, used by `prune()` and the config like the built-in ones."""

from __future__ import annotations

from dataclasses import FrozenInstanceError, fields
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from onnxprune import PruneConfig, prune
from onnxprune.allocators import ALLOCATORS, CHOICES, Allocator, PatternConstraint
from onnxprune.errors import UsageError
from onnxprune.estimators import ESTIMATORS, Estimator
from onnxprune.masks import keep_lowest_pruned, pattern_violations, prune_count
from onnxprune.oneshot import Scored
from onnxprune.progress import Progress

from builders import mlp, save, save_npz

CONFIG_FIELDS = {f.name for f in fields(PruneConfig)}


@pytest.mark.parametrize("name", ESTIMATORS.names())
def test_each_estimator_reads_config_fields_into_its_settings_and_nothing_else(name):
    kind = ESTIMATORS.get(name)
    assert set(kind.reads) <= CONFIG_FIELDS, f"{name} reads {set(kind.reads) - CONFIG_FIELDS}, not config fields"
    config = PruneConfig(input="i", output="o", sparsity=0.5, block_size=64, damp=0.1, fishleg_damp=0.5, mix=0.3)
    settings = kind(config).settings
    assert {f.name: getattr(settings, f.name) for f in fields(settings)} == {n: getattr(config, n) for n in kind.reads}
    with pytest.raises(FrozenInstanceError):
        settings.seed = 1
    if kind.reads:  # no second copy of the defaults: without a config there is nothing to read
        with pytest.raises(TypeError, match="built from a PruneConfig"):
            kind()


class FakeView:
    """What an allocator reads of a weight: its flat values and size."""

    def __init__(self, values: torch.Tensor, rows: int):
        self.value, self.numel, self.shape, self.kernel = (
            values.clone(),
            values.numel(),
            (rows, values.numel() // rows),
            1,
        )

    def read(self) -> torch.Tensor:
        return self.value.clone()

    def write(self, flat: torch.Tensor) -> None:
        self.value = flat.clone()


def scored_example(seed: int = 0):
    """Three tensors of scores, two entries of the first pruned before (score -1, keep False)."""
    g = torch.Generator().manual_seed(seed)
    weights = [torch.randn(24, generator=g), torch.randn(48, generator=g), torch.randn(8, generator=g)]
    keep = [torch.ones(w.numel(), dtype=torch.bool) for w in weights]
    keep[0][:2] = False
    scores = {i: torch.where(keep[i], w.abs(), -1.0) for i, w in enumerate(weights)}
    views = [FakeView(torch.where(k, w, 0.0), rows) for w, k, rows in zip(weights, keep, (6, 4, 2))]  # 4, 12, 4 cols
    scored = Scored(number=1, label="step 1/1", source=None, keep=keep, scores=scores)
    # the sensitivity allocation's loss: the squared weights that were removed
    dense = sum(float((v.read() ** 2).sum()) for v in views)
    pruner = SimpleNamespace(
        views=views,
        estimator=ESTIMATORS.get("magnitude")(),
        evaluate=lambda: dense - sum(float((v.read() ** 2).sum()) for v in views),
        progress=Progress(False),
    )
    return pruner, scored


@pytest.mark.parametrize("name", ALLOCATORS.names())
@pytest.mark.parametrize("sparsity", [0.3, 0.75])
def test_every_allocator_prunes_exactly_the_target_and_keeps_what_was_pruned(name, sparsity):
    pruner, scored = scored_example()
    masks = ALLOCATORS.get(name)().masks(pruner, scored, sparsity, {"estimator": 0.0})
    total = sum(v.numel for v in pruner.views)
    assert sorted(masks) == [0, 1, 2]
    assert all(masks[i].shape == scored.keep[i].shape and masks[i].dtype == torch.bool for i in masks)
    if name == "layer":  # exact in each tensor
        assert [int((~m).sum()) for m in masks.values()] == [prune_count(v.numel, sparsity) for v in pruner.views]
    else:  # exact over all of them
        assert sum(int((~m).sum()) for m in masks.values()) == prune_count(total, sparsity)
    assert not bool(masks[0][:2].any())  # pruned before, pruned still
    for i, mask in masks.items():  # within a tensor the lowest scores go
        pruned, kept = scored.scores[i][~mask], scored.scores[i][mask]
        assert pruned.numel() == 0 or kept.numel() == 0 or float(pruned.max()) <= float(kept.min())


def test_the_built_in_splits_differ_as_described():
    pruner, scored = scored_example(1)
    counts = {
        name: [int((~m).sum()) for m in ALLOCATORS.get(name)().masks(pruner, scored, 0.5, {"estimator": 0.0}).values()]
        for name in ("global", "layer", "magnitude")
    }
    assert counts["layer"] == [prune_count(n, 0.5) for n in (24, 48, 8)]  # uniform
    # magnitude scores: the magnitude profile is the global split itself
    assert counts["magnitude"] == counts["global"]


def test_n_m_wraps_any_allocation_and_completes_the_pattern_at_the_last_step():
    pruner, scored = scored_example(2)
    for name in ALLOCATORS.names():
        constraint = PatternConstraint(ALLOCATORS.get(name)(), 2, 4)
        final = constraint.masks(pruner, scored, 0.5, {"estimator": 0.0}, last=True)
        for keep in final.values():
            matrix = torch.where(keep, 1.0, 0.0).reshape(4, -1)
            assert pattern_violations(matrix, 2, 4) == 0
        early = constraint.masks(pruner, scored, 0.25, {"estimator": 0.0}, last=False)
        for i in early:  # an earlier step prunes only entries the pattern would prune
            assert not bool((~early[i] & final[i]).any())


def test_unknown_names_fail_with_the_valid_ones_and_scope_is_an_alias():
    with pytest.raises(UsageError, match="valid: auto, global, layer, magnitude, sensitivity"):
        PruneConfig(input="i", output="o", sparsity=0.5, allocation="best")
    with pytest.raises(UsageError, match="valid: diagonal-fisher, woodfisher"):
        PruneConfig(input="i", output="o", sparsity=0.5, method="obs")
    old = PruneConfig(input="i", output="o", sparsity=0.5, scope="layer")
    assert old.allocation == "layer" and old.as_dict()["scope"] == "layer"
    assert PruneConfig(input="i", output="o", sparsity=0.5, scope="uniform").allocation == "layer"
    with pytest.raises(UsageError, match="old name"):
        PruneConfig(input="i", output="o", sparsity=0.5, scope="layer", allocation="global")
    assert CHOICES == ("auto", *ALLOCATORS.names())


class LargestFirst(Allocator):
    """The example of a new allocation: the largest tensor alone loses everything it can."""

    name = "largest-first"
    summary = "prune the largest tensor first"

    def masks(self, pruner, scored, sparsity, timer):
        total = prune_count(sum(v.numel for v in pruner.views), sparsity)
        order = sorted(scored.scores, key=lambda i: -pruner.views[i].numel)
        out = {}
        for i in order:
            count = min(total, pruner.views[i].numel)
            out[i], total = keep_lowest_pruned(scored.scores[i], count), total - count
        return out


class Halves(Estimator):
    """The example of a new estimator: the even entries of each weight score above the odd ones."""

    name = "halves"
    summary = "keep the even entries"

    def scores(self, weight, stats):
        return (torch.arange(weight.numel(), device=weight.device) % 2 == 0).to(torch.float32) + weight.abs() * 1e-3


@pytest.fixture
def registered():
    ALLOCATORS.register(LargestFirst.name)(LargestFirst)
    ESTIMATORS.register(Halves.name)(Halves)
    yield
    ALLOCATORS.unregister(LargestFirst.name)
    ESTIMATORS.unregister(Halves.name)


def test_a_new_allocation_and_estimator_are_one_class_and_one_registration_each(tmp_path, registered):
    path = save(mlp(hidden=16, inputs=8, classes=4), tmp_path / "m.onnx")
    x = np.random.default_rng(0).normal(size=(64, 8)).astype(np.float32)
    save_npz(tmp_path / "eval.npz", x=x)
    report = prune(path, tmp_path / "o.onnx", sparsity=0.5, method="halves", allocation="largest-first",
                   evaluation=tmp_path / "eval.npz", progress="off")  # fmt: skip
    assert report.pruning.method == "halves" and report.pruning.allocation == "largest-first"
    zeros = {t.name: t.zeros for t in report.pruning.tensors}
    assert zeros == {"w1": 96, "w2": 0}  # 50% of 128 + 64 weights, all from the largest tensor
    w1 = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(tmp_path / "o.onnx")).graph.initializer}["w1"]
    assert not w1.reshape(-1)[1::2].any()  # the estimator's scores chose: every odd entry went first
