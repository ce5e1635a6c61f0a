"""The repair after pruning: its maths against hand computations and numpy, and the pipeline's
folding of corrections into the written graph against onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper

from onnxprune import PruneConfig, prune
from onnxprune.bridge.bindings import write_back
from onnxprune.bridge.convert import convert
from onnxprune.data import Dataset, InputSpec, input_specs, load_dataset, split
from onnxprune.estimators import ESTIMATORS
from onnxprune.estimators.magnitude import Magnitude
from onnxprune.graph_edit import add_biases
from onnxprune.job import repair_data
from onnxprune.oneshot import Pruner
from onnxprune.progress import Progress
from onnxprune.reconstruct import (
    Moments,
    affine_correction,
    output_moments,
    reconstruction_error,
    refine_masks,
    scaled_update,
    solve_masked,
)
from onnxprune.repair import UPDATE_SCALES, Repairer, repair_passes, repair_settings

from builders import model, ort_run, randn, save, save_npz, tensor

OFF = dict(scale_update=False, refine_masks=False, solve_weights=False, correct_statistics="off")


def moments_of(pruned: np.ndarray, dense: np.ndarray) -> Moments:
    m = Moments.empty(1, pruned.shape[1])
    m.add(torch.from_numpy(pruned)[None], torch.from_numpy(dense)[None])
    return m


# ------------------------------------------------------------------------------ maths


def test_affine_correction_by_hand():
    # dense outputs of one unit: mean 3, variance 4; pruned: mean 1, variance 1
    scale, shift = affine_correction(
        torch.tensor([3.0]), torch.tensor([4.0]), torch.tensor([1.0]), torch.tensor([1.0]), variance=False
    )
    assert scale.tolist() == [1.0] and shift.tolist() == [2.0]
    scale, shift = affine_correction(
        torch.tensor([3.0]), torch.tensor([4.0]), torch.tensor([1.0]), torch.tensor([1.0]), variance=True
    )
    assert scale.tolist() == [2.0] and shift.tolist() == [1.0]  # 2·y + 1: mean 3, variance 4
    # a unit whose pruned output no longer varies keeps scale 1
    scale, shift = affine_correction(
        torch.tensor([3.0]), torch.tensor([4.0]), torch.tensor([1.0]), torch.tensor([0.0]), variance=True
    )
    assert scale.tolist() == [1.0] and shift.tolist() == [2.0]


def test_output_moments_match_numpy():
    x = randn(50, 4, seed=1).astype(np.float64) + 2.0
    w = randn(3, 4, seed=2).astype(np.float64)
    m = moments_of(x, x)
    mean, var = output_moments(torch.from_numpy(w)[None], m.sum_p, m.pp, m.count)
    y = x @ w.T
    np.testing.assert_allclose(mean[0].numpy(), y.mean(0), rtol=1e-10)
    np.testing.assert_allclose(var[0].numpy(), y.var(0), rtol=1e-9)


def test_fixed_mask_solve_equals_numpy_lstsq():
    rng = np.random.default_rng(0)
    dense_x = rng.standard_normal((60, 7))
    pruned_x = dense_x + 0.2 * rng.standard_normal((60, 7))  # inputs from a pruned prefix differ
    w0 = rng.standard_normal((5, 7))
    keep = rng.random((5, 7)) > 0.5
    keep[0] = False  # a row with nothing left stays all zero
    m = moments_of(pruned_x, dense_x)
    got = solve_masked(
        torch.from_numpy(w0 * keep)[None], torch.from_numpy(w0)[None], torch.from_numpy(keep)[None], m, 0.0
    )[0]
    for i in range(5):
        support = keep[i]
        expected = np.zeros(7)
        if support.any():
            expected[support] = np.linalg.lstsq(pruned_x[:, support], dense_x @ w0[i], rcond=None)[0]
        np.testing.assert_allclose(got[i].numpy(), expected, atol=1e-10)


def test_fixed_mask_solve_with_damping_is_the_ridge_towards_the_current_weights():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((20, 4))
    w0, current = rng.standard_normal((1, 4)), rng.standard_normal((1, 4))
    keep = np.array([[True, False, True, True]])
    m = moments_of(x, x)
    lam = 0.5 * float(np.diag(x.T @ x).mean())
    got = solve_masked(
        torch.from_numpy(current)[None], torch.from_numpy(w0)[None], torch.from_numpy(keep)[None], m, 0.5
    )
    s = keep[0]
    a = x[:, s].T @ x[:, s] + lam * np.eye(s.sum())
    expected = np.linalg.solve(a, x[:, s].T @ (x @ w0[0]) + lam * current[0, s])
    np.testing.assert_allclose(got[0, 0, s].numpy(), expected, rtol=1e-10)
    assert got[0, 0, 1] == 0


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    rows=st.integers(1, 6),
    cols=st.integers(2, 12),
    density=st.floats(0.1, 0.9),
    cycles=st.integers(1, 30),
)
def test_mask_refinement_never_increases_its_error_and_keeps_counts(seed, rows, cols, density, cycles):
    rng = np.random.default_rng(seed)
    dense_x = rng.standard_normal((3 * cols, cols))
    pruned_x = dense_x + 0.3 * rng.standard_normal(dense_x.shape)
    w0 = torch.from_numpy(rng.standard_normal((1, rows, cols)))
    keep = torch.from_numpy(rng.random((1, rows, cols)) < density)
    forced = torch.from_numpy(rng.random((1, rows, cols)) < 0.3) & ~keep  # pruned at an earlier step
    m = moments_of(pruned_x, dense_x)
    w = w0 * keep
    new, new_keep, swaps = refine_masks(w, w0, keep, ~keep & ~forced, m, cycles)
    before = float(reconstruction_error(w, w0, m)[0])
    after = float(reconstruction_error(new, w0, m)[0])
    assert after <= before + 1e-9 * (1 + abs(before))
    assert torch.equal(new_keep.sum(2), keep.sum(2))  # every row keeps its number of zeros
    assert not bool((new_keep & forced).any())  # what an earlier step pruned stays pruned
    assert bool((new[~new_keep] == 0).all())
    assert swaps >= int((new_keep & ~keep).sum())  # a revived weight may be swapped out again


def test_mask_refinement_finds_the_better_mask_of_a_constructed_row():
    # inputs 0 and 1 are the same feature; magnitude kept input 1 (|1.1| > |1.0|) and pruned input 0,
    # but input 2 (pruned) carries what input 1 cannot: swapping 1 for 2 is the exact reconstruction
    x = np.random.default_rng(0).standard_normal((40, 3))
    x[:, 1] = x[:, 0]
    w0 = torch.tensor([[[1.0, 1.1, 0.9]]], dtype=torch.float64)
    keep = torch.tensor([[[False, True, True]]])
    m = moments_of(x, x)
    new, new_keep, swaps = refine_masks(w0 * keep, w0, keep, ~keep, m, 10)
    assert swaps >= 1 and float(reconstruction_error(new, w0, m)[0]) < float(reconstruction_error(w0 * keep, w0, m)[0])


# ------------------------------------------------------------------------------ the pipeline


def two_layer(seed: int = 0) -> onnx.ModelProto:
    """x[N, 6] -> MatMul W1 + b1 -> Relu -> MatMul W2 + b2 -> y[N, 1] (a regression: the held-out
    loss is the relative squared error); inputs are positive, so pruning moves the layers' means."""
    return model(
        [
            helper.make_node("MatMul", ["x", "w1"], ["m1"], name="mm1"),
            helper.make_node("Add", ["m1", "b1"], ["h"], name="add1"),
            helper.make_node("Relu", ["h"], ["r"], name="relu"),
            helper.make_node("MatMul", ["r", "w2"], ["m2"], name="mm2"),
            helper.make_node("Add", ["m2", "b2"], ["y"], name="add2"),
        ],
        [tensor("x", ["N", 6])],
        [tensor("y", ["N", 1])],
        {
            "w1": randn(6, 8, seed=seed + 1),
            "b1": randn(8, seed=seed + 2),
            "w2": randn(8, 1, seed=seed + 3),
            "b2": randn(1, seed=seed + 4),
        },
    )


def with_outputs(m: onnx.ModelProto, names) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(m)
    out.graph.output.extend(helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in names)
    return out


def test_statistics_correction_gives_each_pruned_layer_the_dense_mean_on_the_calibration_data(tmp_path):
    source = save(two_layer(), tmp_path / "in.onnx")
    x = np.abs(randn(200, 6, seed=9)) + 0.5
    calib = save_npz(tmp_path / "calib.npz", x=x)
    config = PruneConfig(
        input=source, output=tmp_path / "out.onnx", sparsity=0.5, method="magnitude", scope="layer",
        calibration=calib, progress="off", refine_masks=False, solve_weights=False, correct_statistics="mean",
        repair_samples=10_000,
    )  # fmt: skip
    report = prune(config)
    steps = report.pruning.repair["steps"]
    assert [s["addition"] for s in steps] == ["statistics"] and steps[0]["kept"]
    assert steps[0]["loss_after"] < steps[0]["loss_before"]
    assert report.pruning.repair["corrected_layers"] == 2

    # the samples the correction was computed on: a quarter of --calib is held out for evaluation
    # (no --eval), then the repair's own held-out part
    specs = list(input_specs(onnx.load(source)))
    calibration, _ = split(load_dataset(calib, specs), config.eval_fraction, config.seed)
    samples, _ = repair_data(config, calibration)
    x = samples.arrays["x"]
    original, written = onnx.load(source), onnx.load(tmp_path / "out.onnx")
    dense = ort_run(with_outputs(original, ["h"]), {"x": x})
    pruned = ort_run(with_outputs(written, ["h"]), {"x": x})
    # each pruned layer's output (after its Add, whose constant carries the shift) has the dense mean
    np.testing.assert_allclose(pruned[1].mean(0), dense[1].mean(0), atol=1e-5)
    np.testing.assert_allclose(pruned[0].mean(0), dense[0].mean(0), atol=1e-5)
    # by hand for the first layer, whose inputs are the same in both models: the shift added to b1
    # is mean(x) (W1 − W1_pruned)
    w1, w1_pruned = initializer(original, "w1"), initializer(written, "w1")
    expected = initializer(original, "b1") + x.astype(np.float64).mean(0) @ (w1 - w1_pruned)
    np.testing.assert_allclose(initializer(written, "b1"), expected, rtol=1e-5, atol=1e-6)
    assert (w1_pruned == 0).sum() == 24  # half of each tensor (per layer), as without the correction


def initializer(m: onnx.ModelProto, name: str) -> np.ndarray:
    return onnx.numpy_helper.to_array(next(t for t in m.graph.initializer if t.name == name))


def conv_bn_gemm() -> onnx.ModelProto:
    """A Conv without bias (then BatchNorm), a Gemm without C and a MatMul without Add, in IR 8."""
    return model(
        [
            helper.make_node("Conv", ["x", "cw"], ["c"], name="conv", pads=[1, 1, 1, 1]),
            helper.make_node("BatchNormalization", ["c", "g", "be", "mu", "var"], ["bn"], name="bn", epsilon=1e-5),
            helper.make_node("Relu", ["bn"], ["r"], name="relu"),
            helper.make_node("Flatten", ["r"], ["f"], name="flat"),
            helper.make_node("Gemm", ["f", "gw"], ["g1"], name="fc", transB=1),
            helper.make_node("Relu", ["g1"], ["r2"], name="relu2"),
            helper.make_node("MatMul", ["r2", "mw"], ["logits"], name="head"),
        ],
        [tensor("x", ["N", 2, 5, 5])],
        [tensor("logits", ["N", 4])],
        {
            "cw": randn(6, 2, 3, 3, seed=1),
            "g": np.abs(randn(6, seed=2)) + 0.5,
            "be": randn(6, seed=3),
            "mu": randn(6, seed=4) * 0.1,
            "var": np.abs(randn(6, seed=5)) + 0.5,
            "gw": randn(10, 150, seed=6) * 0.2,
            "mw": randn(10, 4, seed=7),
        },
    )


def settings_with(**changes):
    """The repair settings of a default config, with `changes`."""
    return repair_settings(PruneConfig(input="in.onnx", output="out.onnx", sparsity=0.5), **changes)


def test_repair_settings_are_the_configs():
    """The repair reads the config's own fields (no second set of defaults) and runs masks and
    weights alternating `repair_rounds` times, then the statistics correction."""
    config = PruneConfig(input="in.onnx", output="out.onnx", sparsity=0.5, repair_rounds=3, repair_damp=0.5)
    settings = repair_settings(config)
    assert settings.repair_damp == 0.5 and settings.repair_samples == config.repair_samples
    assert repair_passes(settings) == ("update",) + ("masks", "weights") * 3 + ("statistics",)
    off = repair_settings(config, scale_update=False, refine_masks=False, correct_statistics="off")
    assert repair_passes(off) == ("weights",) * 3


def repaired(proto: onnx.ModelProto, x: np.ndarray, sparsity: float, settings, losses=None):
    """Prune `proto` by magnitude per layer and repair it with `settings`, the held-out loss
    replaced by `losses` (default: always lower, so every pass is kept); returns the torch model's
    output with the corrections, the written model and the repairer's record."""
    torch_model = convert(proto)
    specs = list(input_specs(proto))
    data = Dataset({"x": x}, None, "test")
    losses = iter(losses or [10.0 - k for k in range(10)])
    magnitude = ESTIMATORS.get("magnitude")()
    with Pruner(torch_model, torch_model.prunable, magnitude, "layer", None, 1 << 30, Progress(False)) as pruner:
        repairer = Repairer(
            settings, torch_model, pruner, data, specs, lambda: next(losses), torch.device("cpu"), Progress(False)
        )
        before = list(pruner.keep)
        pruner.step(sparsity, "step", last=True)
        repairer.after_step("step", before)
        with torch.no_grad():
            ours = torch_model(torch.from_numpy(x))[0].numpy()
        arrays = pruner.arrays()
        added = repairer.fold(arrays)
        written = write_back(proto, arrays)
        add_biases(written, added)
        record = repairer.report()
        repairer.close()
    return ours, written, record


@pytest.mark.parametrize("mode", ["mean", "variance"])
def test_corrections_are_written_as_new_bias_inputs_in_the_original_graph(mode):
    original = conv_bn_gemm()
    x = np.abs(randn(120, 2, 5, 5, seed=8))
    settings = settings_with(refine_masks=False, solve_weights=False, correct_statistics=mode)
    ours, written, record = repaired(original, x, 0.6, settings)
    # the MatMul has no Add to carry a shift: not corrected
    assert record["corrected_layers"] == 2 and record["steps"][0]["kept"]
    onnx.checker.check_model(written, full_check=True)
    assert [n.name for n in written.graph.node] == [n.name for n in original.graph.node]
    assert written.ir_version == original.ir_version and written.opset_import == original.opset_import
    nodes = {n.name: n for n in written.graph.node}
    assert len(nodes["conv"].input) == 3 and len(nodes["fc"].input) == 3
    assert len(nodes["head"].input) == 2
    # the file computes what the corrected torch model computed
    np.testing.assert_allclose(ort_run(written, {"x": x})[0], ours, rtol=1e-4, atol=1e-4)
    # the conv's output (BatchNorm's input) has the dense mean over the samples, per channel
    dense = ort_run(with_outputs(original, ["c"]), {"x": x})[1]
    got = ort_run(with_outputs(written, ["c"]), {"x": x})[1]
    np.testing.assert_allclose(got.mean((0, 2, 3)), dense.mean((0, 2, 3)), atol=1e-4)
    if mode == "variance":
        np.testing.assert_allclose(got.var((0, 2, 3)), dense.var((0, 2, 3)), rtol=1e-3)
    # zeros stay zeros: the correction scales rows, it does not fill them
    for name in ("cw", "gw", "mw"):
        assert (initializer(written, name) == 0).mean() == pytest.approx(0.6, abs=0.01)


def test_weights_in_constant_nodes_get_their_bias_as_a_constant_node():
    """PaddlePaddle keeps every weight in a Constant node: a new bias follows that style."""
    proto = conv_bn_gemm()
    for name in ("cw", "gw"):
        value = next(t for t in proto.graph.initializer if t.name == name)
        proto.graph.initializer.remove(value)
        proto.graph.node.insert(0, helper.make_node("Constant", [], [name], name=f"const_{name}", value=value))
    x = np.abs(randn(60, 2, 5, 5, seed=8))
    ours, written, _ = repaired(
        proto, x, 0.5, settings_with(refine_masks=False, solve_weights=False, correct_statistics="mean")
    )
    onnx.checker.check_model(written, full_check=True)
    conv = next(n for n in written.graph.node if n.name == "conv")
    producers = {o: n for n in written.graph.node for o in n.output}
    assert producers[conv.input[2]].op_type == "Constant"
    assert not any(t.name == conv.input[2] for t in written.graph.initializer)
    np.testing.assert_allclose(ort_run(written, {"x": x})[0], ours, rtol=1e-4, atol=1e-4)


def test_a_pass_that_does_not_lower_the_held_out_loss_is_undone():
    proto = two_layer()
    torch_model = convert(proto)
    targets = torch_model.prunable
    specs = [InputSpec("x", np.dtype("float32"), ("N", 6))]
    data = Dataset({"x": np.abs(randn(40, 6, seed=3))}, None, "test")
    with Pruner(torch_model, targets, ESTIMATORS.get("magnitude")(), "layer", None, 1 << 30, Progress(False)) as pruner:
        before = list(pruner.keep)
        pruner.step(0.5, "step", last=True)
        values = {t.name: torch_model.tensors[t.name].detach().clone() for t in targets}
        keep = [k.clone() for k in pruner.keep]
        losses = iter([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])  # every pass makes it worse
        repairer = Repairer(
            settings_with(),
            torch_model,
            pruner,
            data,
            specs,
            lambda: next(losses),
            torch.device("cpu"),
            Progress(False),
        )
        repairer.after_step("step", before)
        assert [(r.addition, r.kept) for r in repairer.records] == [
            ("masks", False),
            ("weights", False),
            ("masks", False),
            ("weights", False),
            ("statistics", False),
        ]
        for name, value in values.items():
            assert torch.equal(torch_model.tensors[name], value)
        assert all(torch.equal(a, b) for a, b in zip(pruner.keep, keep))
        assert not repairer.corrections.values
        repairer.close()


def test_repair_is_reported_and_off_switches_work(tmp_path):
    source = save(two_layer(), tmp_path / "in.onnx")
    calib = save_npz(tmp_path / "calib.npz", x=np.abs(randn(100, 6, seed=9)))
    base = dict(input=source, sparsity=0.5, method="magnitude", calibration=calib, progress="off")
    off = prune(PruneConfig(output=tmp_path / "off.onnx", **base, **OFF))
    assert off.pruning.repair is None
    on = prune(PruneConfig(output=tmp_path / "on.onnx", **base))
    repair = on.pruning.repair
    # masks and weights alternate twice (--repair-rounds 2), then the statistics
    assert repair["passes"] == ["masks", "weights", "masks", "weights", "statistics"] and repair["layers"] == 2
    assert len(repair["steps"]) == 5 and all(
        s["loss_after"] <= s["loss_before"] or not s["kept"] for s in repair["steps"]
    )
    # the repair never loses on the held-out samples it is judged on; on this model it wins on the evaluation data too
    assert on.validation.outputs[0].cosine >= off.validation.outputs[0].cosine


# ------------------------------------------------------------------------------ update scaling


def test_scaled_update_by_hand():
    # survivors 1.5 and -2 after an update of +0.5 and +1; the two pruned entries stay 0
    values, update = torch.tensor([0.0, 1.5, 0.0, -2.0]), torch.tensor([0.0, 0.5, 0.0, 1.0])
    assert scaled_update(values, update, 0.0).tolist() == [0.0, 1.0, 0.0, -3.0]
    assert scaled_update(values, update, 0.5).tolist() == [0.0, 1.25, 0.0, -2.5]
    assert scaled_update(values, update, 1.0).tolist() == values.tolist()


SHIFT = 0.75


class ShiftedMagnitude(Magnitude):
    """Magnitude's mask with a known update of the survivors (+SHIFT each), applied at once like
    an OBS update."""

    compensates = True

    def prune(self, weight, keep, stats, forced, pattern=None):
        return torch.where(keep, weight + SHIFT, 0.0), keep


def test_the_update_pass_keeps_the_fraction_with_the_lowest_held_out_loss():
    proto = two_layer()
    torch_model = convert(proto)
    targets = torch_model.prunable
    specs = [InputSpec("x", np.dtype("float32"), ("N", 6))]
    x = np.abs(randn(60, 6, seed=3))
    data = Dataset({"x": x}, None, "test")
    with torch.no_grad():
        dense_y = torch_model(torch.from_numpy(x))[0].clone()
        dense = {t.name: torch_model.tensors[t.name].detach().clone() for t in targets}

    def held_out_loss() -> float:
        with torch.no_grad():
            return float(((torch_model(torch.from_numpy(x))[0] - dense_y) ** 2).mean())

    settings = settings_with(refine_masks=False, solve_weights=False, correct_statistics="off")
    with Pruner(torch_model, targets, ShiftedMagnitude(), "layer", None, 1 << 30, Progress(False)) as pruner:
        repairer = Repairer(
            settings, torch_model, pruner, data, specs, held_out_loss, torch.device("cpu"), Progress(False)
        )
        assert repairer.passes == ("update",)
        before = list(pruner.keep)
        pruner.step(0.5, "step", last=True)
        keep = list(pruner.keep)
        repairer.after_step("step", before)
        record = repairer.report()["steps"][0]
        chosen = [v.read().clone() for v in pruner.views]
        # the loss at each fraction, computed by hand: magnitude's survivors plus that much of SHIFT
        by_hand = {}
        for scale in (*UPDATE_SCALES, 1.0):
            for view, k in zip(pruner.views, keep):
                view.write(torch.where(k, view.to_canonical(dense[view.target.name].reshape(-1)) + scale * SHIFT, 0.0))
            by_hand[scale] = held_out_loss()
        best = min(by_hand, key=by_hand.get)
        expected = [torch.where(k, view.to_canonical(dense[view.target.name].reshape(-1)) + best * SHIFT, 0.0)
                    for view, k in zip(pruner.views, keep)]  # fmt: skip
        repairer.close()
    for got, want in zip(chosen, expected):
        torch.testing.assert_close(got, want)
    assert record["addition"] == "update" and record["scale"] == best
    assert record["loss_before"] == pytest.approx(by_hand[1.0]) and record["loss_after"] == pytest.approx(by_hand[best])
    assert record["loss_after"] <= record["loss_before"] and record["kept"] == (best != 1.0)
    assert best < 1.0  # a shift of 0.75 on every survivor is worse than none of it on this model
    assert record["changed"] == sum(int(k.sum()) for k in keep)  # every survivor moved


def test_the_update_pass_runs_only_for_estimators_that_update_at_once(tmp_path):
    source = save(two_layer(), tmp_path / "in.onnx")
    calib = save_npz(tmp_path / "calib.npz", x=np.abs(randn(100, 6, seed=9)))
    base = dict(input=source, sparsity=0.5, calibration=calib, progress="off", damp=1e-3, scope="layer")
    woodfisher = prune(PruneConfig(output=tmp_path / "wf.onnx", method="woodfisher", **base))
    steps = woodfisher.pruning.repair["steps"]
    assert woodfisher.pruning.repair["passes"][0] == "update" and steps[0]["addition"] == "update"
    assert steps[0]["scale"] in (*UPDATE_SCALES, 1.0) and steps[0]["loss_after"] <= steps[0]["loss_before"]
    # layer by layer (SparseGPT fits each layer to the updates before it) and magnitude: no update pass
    for method in ("sparsegpt", "magnitude"):
        report = prune(PruneConfig(output=tmp_path / f"{method}.onnx", method=method, **base))
        assert "update" not in report.pruning.repair["passes"]
        assert all("scale" not in s for s in report.pruning.repair["steps"])
    off = prune(PruneConfig(output=tmp_path / "off.onnx", method="woodfisher", scale_update=False, **base))
    assert "update" not in off.pruning.repair["passes"]
    # a gradual schedule fine-tunes between steps: no update scaling there
    gradual = dict(schedule="gradual", prune_steps=2)
    stepped = prune(PruneConfig(output=tmp_path / "gradual.onnx", method="woodfisher", **gradual, **base))
    assert "update" not in stepped.pruning.repair["passes"] and len(stepped.pruning.repair["steps"]) > 0
