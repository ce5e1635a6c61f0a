"""Allocation across tensors (exact counts, the knapsack against brute force, sensitivity end to
end) and automatic damping."""

from __future__ import annotations

import itertools
from dataclasses import replace

import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper

from onnxprune import PruneConfig, prune
from onnxprune.activations import ActivationSource
from onnxprune.allocation import choose_sparsities, exact_counts
from onnxprune.data import split
from onnxprune.estimators.base import DAMP_GRID, DEFAULT_DAMP
from onnxprune.estimators.woodfisher import BlockGram
from onnxprune.gradients import GradientSource
from onnxprune.job import search_split, search_statistics
from onnxprune.masks import prune_count
from onnxprune.pipeline import prepare
from onnxprune.report import format_human
from onnxprune.reuse import ScoreCache
from onnxprune.searches import resolve_damping

from builders import MODELS, model, ort_run, randn, save, save_npz, tensor


@pytest.mark.parametrize("target", [0.0, 0.33, 0.5, 0.8, 0.97])
def test_exact_counts_sum_to_the_target_to_the_element(target):
    numels = [7, 1000, 333, 2]
    rng = np.random.default_rng(0)
    fractions = rng.uniform(0, 1, size=4)
    total = prune_count(sum(numels), target)
    counts = exact_counts(numels, fractions, total)
    assert sum(counts) == total
    assert all(0 <= c <= n for c, n in zip(counts, numels))


def test_exact_counts_respect_entries_already_pruned_and_the_sizes():
    counts = exact_counts([10, 10, 10], [0.0, 0.9, 0.9], 15, lower=[6, 0, 0])
    assert sum(counts) == 15 and counts[0] >= 6 and max(counts) <= 10
    assert exact_counts([4, 4], [1.0, 0.0], 6) == [4, 2]  # the capped tensor's excess moves on
    with pytest.raises(ValueError):
        exact_counts([4, 4], [0.5, 0.5], 9)


def test_knapsack_choice_equals_brute_force():
    grid = (0.0, 0.5, 0.8, 0.9)
    numels = [100, 300, 50]
    rng = np.random.default_rng(1)
    # convex-ish increasing curves with different scales per tensor
    curves = [sorted(rng.uniform(0, scale, size=len(grid))) for scale in (1.0, 0.1, 5.0)]
    for curve in curves:
        curve[0] = 0.0
    target = 0.7
    chosen = choose_sparsities(curves, numels, target, grid)
    best, best_loss = None, np.inf
    for picks in itertools.product(range(len(grid)), repeat=len(numels)):
        pruned = sum(grid[k] * n for k, n in zip(picks, numels))
        loss = sum(curves[i][k] for i, k in enumerate(picks))
        if pruned >= target * sum(numels) - 1e-9 and loss < best_loss:
            best, best_loss = [grid[k] for k in picks], loss
    assert chosen == best
    # the cheap tensor (scale 0.1) takes the most
    assert chosen[1] == max(chosen)


def test_sensitivity_allocation_on_the_shipped_cnn_prunes_exactly_and_beats_uniform(tmp_path):
    # the allocations alone: the repair after pruning recovers much of what a poor split loses
    # (per layer 0.934 with it), which is not what this test is about
    accuracy = {}
    for scope in ("layer", "sensitivity"):
        report = prune(
            PruneConfig(
                input=MODELS / "mnist_cnn.onnx", output=tmp_path / f"{scope}.onnx", sparsity=0.9,
                method="magnitude", scope=scope, calibration=MODELS / "mnist_calib.npz",
                evaluation=MODELS / "mnist_eval.npz", progress="off",
                refine_masks=False, solve_weights=False, correct_statistics="off",
            )
        )  # fmt: skip
        accuracy[scope] = report.validation.accuracy_after
        if scope == "sensitivity":  # exact over all tensors (layer rounds each tensor on its own)
            assert report.pruning.zeros == prune_count(report.pruning.params, 0.9)
            per_tensor = {t.name: t.sparsity for t in report.pruning.tensors}
            assert len(set(round(s, 2) for s in per_tensor.values())) > 1  # not uniform
    assert accuracy["sensitivity"] >= accuracy["layer"] + 0.02, accuracy


# ------------------------------------------------------------------------------ automatic damping


def cnn_config(tmp_path, name: str, **settings) -> PruneConfig:
    settings = {"method": "woodfisher", **settings}
    return PruneConfig(
        input=MODELS / "mnist_cnn.onnx", output=tmp_path / f"{name}.onnx", sparsity=0.9,
        calibration=MODELS / "mnist_calib.npz", evaluation=MODELS / "mnist_eval.npz", num_grads=64,
        progress="off", **settings,
    )  # fmt: skip


def weights(path) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


def test_auto_damping_picks_the_grid_value_with_the_smallest_held_out_loss_and_leaves_no_trace(tmp_path):
    # the whole grid whatever the machine's speed (a loaded 2-core machine took more than 180 s / 5
    # for the first trial, and the search stopped there; the next test covers that)
    report = prune(cnn_config(tmp_path, "auto", damp_search_seconds=10**6))
    search = report.fisher.estimator["damp_search"]
    assert search["searched"] and search["grid"] == list(DAMP_GRID) and len(search["losses"]) == len(DAMP_GRID)
    assert search["chosen"] == DAMP_GRID[int(np.argmin(search["losses"]))] == report.fisher.estimator["damp"]
    assert max(search["losses"]) > 1.05 * min(search["losses"])  # the choice matters on this model
    # the search restored every weight: the run equals one with that damping given
    given = prune(cnn_config(tmp_path, "given", damp=search["chosen"]))
    assert "damp_search" not in given.fisher.estimator
    first, second = weights(tmp_path / "auto.onnx"), weights(tmp_path / "given.onnx")
    assert all(np.array_equal(first[k], second[k]) for k in first)
    assert report.validation.accuracy_after == given.validation.accuracy_after


def test_auto_damping_stops_after_its_first_trial_when_the_rest_would_take_too_long(tmp_path):
    # held-out samples the statistics never draw: the stopped search's trial is then a plain run's
    # (to the bit where the trial factors its pruned sets as the plain run does)
    exact = dict(search_holdout="unused", shared_factors=False)
    config = cnn_config(tmp_path, "costly", allocation="global", damp_search_seconds=0.001, **exact)
    job = prepare(config, torch.device("cpu"), {})
    chosen, search = resolve_damping(config, job)
    assert not search["searched"] and search["chosen"] == DEFAULT_DAMP == chosen.damp
    assert search["grid"] == [DEFAULT_DAMP] and len(search["losses"]) == 1 and search["allocation"] == "global"
    assert search["estimated_seconds"] > 0.001 and "--damp-search-seconds 0.001" in search["why"]
    # the trial it ran is the run's: the run equals one at the default damping given
    report = prune(config)
    assert report.fisher.estimator["damp_search"]["losses"] == search["losses"]
    prune(cnn_config(tmp_path, "given", allocation="global", damp=DEFAULT_DAMP, search_holdout="unused"))
    first, second = weights(tmp_path / "costly.onnx"), weights(tmp_path / "given.onnx")
    assert all(np.array_equal(first[k], second[k]) for k in first)
    # given time for the other five trials, it searches the whole grid
    chosen, search = resolve_damping(replace(config, damp_search_seconds=10**6), job, {DEFAULT_DAMP: 0.5}, 1.0)
    assert search["searched"] and search["grid"] == list(DAMP_GRID) and chosen.damp == search["chosen"]
    assert search["losses"][DAMP_GRID.index(DEFAULT_DAMP)] == 0.5  # a known loss is not measured again


# ------------------------------------------------------------------------------ automatic allocation


def rescaled_mlp(tmp_path):
    """x → Gemm(w1·1e3) → Relu → MatMul(w2·1e-3): the scales cancel, so the function is an ordinary
    MLP's, but every head weight is smaller than every first-layer one. Global magnitude at 50%
    (320 of 640 weights) then empties the head (128); per layer keeps both layers working."""
    w1, w2 = randn(32, 16, seed=1) * 1e3, randn(32, 4, seed=2) * 1e-3
    m = model(
        [
            helper.make_node("Gemm", ["x", "w1"], ["h"], name="fc1", transB=1),
            helper.make_node("Relu", ["h"], ["r"], name="relu"),
            helper.make_node("MatMul", ["r", "w2"], ["logits"], name="head"),
        ],
        [tensor("x", ["N", 16])],
        [tensor("logits", ["N", 4])],
        {"w1": w1, "w2": w2},
    )
    path = save(m, tmp_path / "rescaled.onnx")
    x = randn(400, 16, seed=3)
    labels = np.argmax(ort_run(m, {"x": x})[0], axis=1)
    calib = save_npz(tmp_path / "calib.npz", x=x[:300], labels=labels[:300])
    evaluation = save_npz(tmp_path / "eval.npz", x=x[300:], labels=labels[300:])
    return path, calib, evaluation


def test_auto_allocation_chooses_the_candidate_with_the_smaller_held_out_loss(tmp_path):
    path, calib, evaluation = rescaled_mlp(tmp_path)
    settings = dict(input=path, sparsity=0.5, method="magnitude", evaluation=evaluation, progress="off")
    auto = prune(PruneConfig(output=tmp_path / "auto.onnx", calibration=calib, **settings))
    search = auto.pruning.allocation_search
    assert search["candidates"] == ["global", "layer"] and len(search["losses"]) == 2
    assert search["chosen"] == "layer" == auto.pruning.allocation
    assert search["losses"][0] > 1.5 * search["losses"][1]
    assert "allocation auto: chose layer" in format_human(auto)
    # the chosen allocation, given explicitly, writes the same weights and reaches the same accuracy
    given = prune(PruneConfig(output=tmp_path / "layer.onnx", calibration=calib, scope="layer", **settings))
    assert given.pruning.allocation_search is None and given.pruning.allocation == given.pruning.scope == "layer"
    first, second = weights(tmp_path / "auto.onnx"), weights(tmp_path / "layer.onnx")
    assert all(np.array_equal(first[k], second[k]) for k in first)
    assert auto.validation.accuracy_after == given.validation.accuracy_after
    # and it was the right choice: global magnitude empties the head and loses the model
    worse = prune(PruneConfig(output=tmp_path / "global.onnx", calibration=calib, scope="global", **settings))
    assert (weights(tmp_path / "global.onnx")["w2"] == 0).all()
    assert worse.validation.accuracy_after < auto.validation.accuracy_after - 0.2


def test_auto_allocation_without_calibration_data_is_global(tmp_path):
    path, _, evaluation = rescaled_mlp(tmp_path)
    report = prune(PruneConfig(input=path, output=tmp_path / "o.onnx", sparsity=0.5, method="magnitude",
                               evaluation=evaluation, progress="off"))  # fmt: skip
    assert report.pruning.allocation == "global" and report.pruning.allocation_search is None


def test_auto_allocation_never_picks_per_layer_for_sparsegpt_on_the_cnn_and_the_damping_search_reuses_it(tmp_path):
    # measured without the repair: at 90% SparseGPT keeps 0.953 with global allocation and 0.574
    # per layer on this CNN (per layer empties most of the first convolution's 9-weight filters)
    report = prune(cnn_config(tmp_path, "sgpt", method="sparsegpt"))
    search, damping = report.pruning.allocation_search, report.fisher.estimator["damp_search"]
    assert search["candidates"] == ["global", "layer", "magnitude"]
    chosen = search["candidates"][int(np.argmin(search["losses"]))]
    assert search["chosen"] == chosen == report.pruning.allocation != "layer"
    assert search["losses"][1] > 2 * min(search["losses"])
    # the damping search ran under the chosen allocation, and its trial at the default damping
    # (where the allocation was chosen) is the allocation search's
    assert damping["allocation"] == chosen
    assert damping["losses"][damping["grid"].index(1e-3)] == min(search["losses"])
    assert report.validation.accuracy_after > 0.9


def test_allocation_trials_and_the_run_share_one_set_of_statistics(tmp_path, monkeypatch):
    # WoodFisher, allocation auto at a fixed damping: the candidates differ only in the masks chosen
    # from the same saliencies, so one gradient collection serves every trial and the run
    path, calib, evaluation = rescaled_mlp(tmp_path)
    settings = dict(input=path, sparsity=0.5, method="woodfisher", damp=1e-3, num_grads=32, block_size=8,
                    calibration=calib, evaluation=evaluation, progress="off")  # fmt: skip
    collections = []
    stream = GradientSource.stream
    monkeypatch.setattr(GradientSource, "stream", lambda self, *a, **k: collections.append(1) or stream(self, *a, **k))
    shared = prune(PruneConfig(output=tmp_path / "shared.onnx", **settings))
    search = shared.pruning.allocation_search
    assert search["candidates"] == ["global", "layer", "magnitude"] and len(collections) == 1
    # the same run computing everything again (no cache) writes exactly the same weights
    collections.clear()
    monkeypatch.setattr(ScoreCache, "get", lambda self, key: None)
    fresh = prune(PruneConfig(output=tmp_path / "fresh.onnx", **settings))
    assert len(collections) == len(search["candidates"]) + 1
    timed = ("seconds",)
    assert {k: v for k, v in fresh.pruning.allocation_search.items() if k not in timed} == {
        k: v for k, v in search.items() if k not in timed
    }
    first, second = weights(tmp_path / "shared.onnx"), weights(tmp_path / "fresh.onnx")
    assert all(np.array_equal(first[k], second[k]) for k in first)


def _rows(dataset, of) -> set[int]:
    """Indices into `of` of the samples in `dataset` (the test data's rows are distinct floats)."""
    index = {row.tobytes(): i for i, row in enumerate(of.arrays["x"])}
    return {index[row.tobytes()] for row in dataset.arrays["x"]}


def test_the_searches_hold_out_samples_the_statistics_never_draw(tmp_path):
    path, calib, evaluation = rescaled_mlp(tmp_path)
    config = PruneConfig(input=path, output=tmp_path / "o.onnx", sparsity=0.5, method="woodfisher", num_grads=96,
                         fisher_batch=2, search_holdout="unused",
                         calibration=calib, evaluation=evaluation, progress="off")  # fmt: skip
    job = prepare(config, torch.device("cpu"), {})
    data = job.calibration_data
    fit, held = search_split(config, data)
    assert len(data) == 300 and len(held) == 75 and _rows(fit, data) == set(range(300)) - _rows(held, data)
    gradients = GradientSource(job.torch_model, data, job.specs, None, 96, 2, config.seed, torch.device("cpu"))
    activations = ActivationSource(job.torch_model, data, job.specs, job.targets, 96, 32, config.seed, "cpu")
    drawn = set(gradients.indices.ravel().tolist())
    assert len(drawn) == 192 and not drawn & _rows(held, data)
    assert _rows(activations.samples, data) <= drawn
    # so the trials draw from every sample, as the run without a search does
    assert search_statistics(config, data) is data
    # without room for both (300 − 256 × 2 drawn < 75), and with --search-holdout quarter: a random
    # quarter, the statistics drawn from the rest
    for crowded in (replace(config, num_grads=256), replace(config, search_holdout="quarter")):
        fit, held = search_split(crowded, data)
        old_fit, old_held = split(data, 75 / 300, config.seed + 3)
        assert _rows(held, data) == _rows(old_held, data) and _rows(fit, data) == _rows(old_fit, data)
        assert _rows(search_statistics(crowded, data), data) == _rows(fit, data)


def test_a_run_that_keeps_the_searched_allocation_equals_that_allocation_given(tmp_path):
    # the trials prune with the run's own statistics, so choosing costs nothing in quality
    path, calib, evaluation = rescaled_mlp(tmp_path)
    settings = dict(input=path, sparsity=0.5, method="woodfisher", damp=1e-3, num_grads=32, block_size=8,
                    calibration=calib, evaluation=evaluation, progress="off")  # fmt: skip
    # the repair's held-out samples too; the given run factors its pruned sets itself, so the
    # search does too (shared factors: equal to float rounding, test below)
    unused = {**settings, "search_holdout": "unused", "shared_factors": False}
    auto = prune(PruneConfig(output=tmp_path / "auto.onnx", **unused))
    chosen = auto.pruning.allocation_search["chosen"]
    given = prune(PruneConfig(output=tmp_path / "given.onnx", **{**unused, "allocation": chosen}))
    first, second = weights(tmp_path / "auto.onnx"), weights(tmp_path / "given.onnx")
    assert all(np.array_equal(first[k], second[k]) for k in first)
    assert auto.validation.accuracy_after == given.validation.accuracy_after
    # with the held-out quarter the trials (and so the run) drew other samples than the given run
    # its allocation given
    quarter = prune(PruneConfig(output=tmp_path / "quarter.onnx", search_holdout="quarter", **settings))
    prune(PruneConfig(output=tmp_path / "same.onnx", **{**settings, "allocation": quarter.pruning.allocation}))
    third, fourth = weights(tmp_path / "quarter.onnx"), weights(tmp_path / "same.onnx")
    assert not all(np.array_equal(third[k], fourth[k]) for k in third)


def test_the_allocation_candidates_share_one_factor_per_block_and_update_as_each_would_alone(tmp_path, monkeypatch):
    # the candidates prune thresholds of the same saliencies: one ordered Cholesky factor per
    # block serves all three; the weights are those of each candidate's own factorisation
    path, calib, evaluation = rescaled_mlp(tmp_path)
    settings = dict(input=path, sparsity=0.6, method="woodfisher", damp=1e-3, num_grads=32, block_size=8,
                    calibration=calib, evaluation=evaluation, progress="off", scale_update=False,
                    refine_masks=False, solve_weights=False, correct_statistics="off")  # fmt: skip
    factored = []
    to_factor = BlockGram.to_ordered_factor
    monkeypatch.setattr(BlockGram, "to_ordered_factor", lambda self, o: factored.append(1) or to_factor(self, o))
    shared = prune(PruneConfig(output=tmp_path / "shared.onnx", **settings))
    assert shared.pruning.allocation_search["candidates"] == ["global", "layer", "magnitude"]
    assert len(factored) == 2  # once per tensor (w1, w2), not per candidate
    factored.clear()
    alone = prune(PruneConfig(output=tmp_path / "alone.onnx", shared_factors=False, **settings))
    assert not factored
    assert alone.pruning.allocation == shared.pruning.allocation
    np.testing.assert_allclose(
        alone.pruning.allocation_search["losses"], shared.pruning.allocation_search["losses"], rtol=1e-4
    )
    first, second = weights(tmp_path / "shared.onnx"), weights(tmp_path / "alone.onnx")
    for name in first:
        assert np.array_equal(first[name] == 0, second[name] == 0), name
        # both solve from the float32 inverse; on this deliberately ill-scaled MLP (×1e3, ×1e-3)
        # they differ by up to 8e-5 relative, each as far from a float64 solve as the other
        np.testing.assert_allclose(first[name], second[name], rtol=2e-4, atol=1e-6)
