"""Wanda, SparseGPT and N:M through the pipeline: captured inputs against hand computations,
written models against onnxruntime, the N:M checker on written tensors, refusals, real digits."""

from __future__ import annotations

import json

import jsonschema
import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper
from test_cli import run_cli

from onnxprune import PruneConfig, prune
from onnxprune.activations import ActivationSource, InputStatistics
from onnxprune.bridge.convert import convert
from onnxprune.data import Dataset, input_specs
from onnxprune.layerwise_maths import conv_patches
from onnxprune.masks import pattern_violations
from onnxprune.report import schema

from builders import MODELS, model, ort_run, randn, save, save_npz, tensor


def mixed_model(groups: int = 2) -> onnx.ModelProto:
    """A (grouped) Conv with asymmetric padding, a Gemm with transB, a MatMul: every capture path."""
    return model(
        [
            helper.make_node(
                "Conv", ["x", "wc", "bc"], ["c"], name="conv", group=groups, pads=[1, 0, 0, 1], strides=[1, 2]
            ),
            helper.make_node("Relu", ["c"], ["r"]),
            helper.make_node("Flatten", ["r"], ["f"], axis=1),
            helper.make_node("Gemm", ["f", "wg"], ["g"], name="gemm", transB=1),
            helper.make_node("Tanh", ["g"], ["t"]),
            helper.make_node("MatMul", ["t", "wm"], ["y"], name="matmul"),
        ],
        [tensor("x", ["n", 4, 6, 6])],
        [tensor("y", ["n", 5])],
        {
            "wc": randn(6, 4 // groups, 3, 3, seed=1),
            "bc": randn(6, seed=2),
            "wg": randn(12, 6 * 5 * 3, seed=3) / 8,
            "wm": randn(12, 5, seed=4),
        },
    )


def test_captured_inputs_equal_the_hand_computed_layer_inputs():
    m = mixed_model()
    tm = convert(m)
    x = randn(7, 4, 6, 6, seed=5)
    source = ActivationSource(
        tm, Dataset({"x": x}, None, "calib"), input_specs(m), tm.prunable, 7, 3, 0, torch.device("cpu")
    )
    stats = {t.name: InputStatistics(t.matrix_shape()[1]) for t in tm.prunable}
    source.collect(stats)
    xt = torch.from_numpy(x).double()
    weights = {t.name: torch.from_numpy(numpy_helper.to_array(t).copy()).double() for t in m.graph.initializer}
    padded = torch.nn.functional.pad(xt, (0, 1, 1, 0))  # ONNX pads [top, left, bottom, right] = [1, 0, 0, 1]
    patches = conv_patches(padded, (3, 3), (1, 2), (0, 0), (1, 1), 2)
    conv = torch.nn.functional.conv2d(padded, weights["wc"], weights["bc"], stride=(1, 2), groups=2)
    flat = torch.relu(conv).reshape(7, -1)
    hidden = torch.tanh(flat @ weights["wg"].T)
    expected = {"wc": patches, "wg": flat.unsqueeze(0), "wm": hidden.unsqueeze(0)}
    for name, rows in expected.items():
        grams = torch.stack([r.T @ r for r in rows]) / rows.shape[1]
        # the model computes in float32
        torch.testing.assert_close(stats[name].hessian(), grams, rtol=1e-5, atol=1e-5 * float(grams.abs().max()))
    assert stats["wc"].groups == 2 and stats["wc"].kernel == 9
    assert [names for names in source.sequence(["wm", "wg", "wc"])] == [["wc"], ["wg"], ["wm"]]


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
@pytest.mark.parametrize("steps", [1, 2])
def test_layerwise_methods_write_exact_sparsity_and_a_model_onnxruntime_agrees_with(tmp_path, method, steps):
    path = save(mixed_model(), tmp_path / "m.onnx")
    calib = save_npz(tmp_path / "c.npz", x=randn(24, 4, 6, 6, seed=6))
    evaluation = save_npz(tmp_path / "e.npz", x=randn(16, 4, 6, 6, seed=7))
    report = prune(
        PruneConfig(
            input=path, output=tmp_path / "o.onnx", sparsity=0.6, method=method, steps=steps,
            calibration=calib, evaluation=evaluation, progress="off",
        )
    )  # fmt: skip
    assert report.pruning.zeros == round(0.6 * report.pruning.params)
    # the automatic allocation compared trials, so the statistics come from its three quarters of
    # the calibration samples (18 of 24), the samples of the trial it chose
    assert report.pruning.allocation_search is not None
    assert report.fisher.statistics == "layer inputs" and report.fisher.num_grads == 18
    jsonschema.validate(json.loads(report.to_json()), schema())
    written = onnx.load(str(tmp_path / "o.onnx"))
    assert [n.name for n in written.graph.node] == [n.name for n in mixed_model().graph.node]
    # onnxruntime on the written file gives what the pruned torch model gave: the conversion
    # check of the pruned model is in the report; here the file itself is run
    x = randn(4, 4, 6, 6, seed=8)
    assert np.isfinite(ort_run(written, {"x": x})[0]).all()


def test_sparsegpt_beats_the_same_mask_without_update_on_the_layer_outputs(tmp_path):
    """The update is what SparseGPT adds to its mask: the written model's outputs are closer to
    the dense ones than those of the same mask with the surviving weights left as they were.
    The input channels share a signal: with independent inputs XᵀX is diagonal and the OBS
    update is zero by construction (the first convolution's output then differs by < 10%)."""
    m = mixed_model()
    path = save(m, tmp_path / "m.onnx")
    x = {"x": randn(64, 1, 6, 6, seed=9) + 0.2 * randn(64, 4, 6, 6, seed=10)}
    calib = save_npz(tmp_path / "c.npz", **x)
    prune(PruneConfig(input=path, output=tmp_path / "o.onnx", sparsity=0.7, method="sparsegpt",
                      calibration=calib, evaluation=calib, progress="off",
                      refine_masks=False, solve_weights=False, correct_statistics="off"))  # fmt: skip
    written = onnx.load(str(tmp_path / "o.onnx"))
    new = {t.name: numpy_helper.to_array(t) for t in written.graph.initializer}
    masked = onnx.load(str(path))
    for t in masked.graph.initializer:
        if t.name in ("wc", "wg", "wm"):
            t.CopyFrom(numpy_helper.from_array(np.where(new[t.name] == 0, 0, numpy_helper.to_array(t)), t.name))
    dense = ort_run(m, x)[0]
    error_updated = np.abs(ort_run(written, x)[0] - dense).mean()
    error_masked = np.abs(ort_run(masked, x)[0] - dense).mean()
    assert error_updated < 0.9 * error_masked, (error_updated, error_masked)


@pytest.mark.parametrize(
    "method, allocation",
    [
        ("magnitude", "auto"),
        ("woodfisher", "auto"),
        ("wanda", "auto"),
        ("sparsegpt", "auto"),
        ("sparsegpt", "magnitude"),
    ],
)
def test_pattern_2_4_holds_in_every_written_tensor(tmp_path, method, allocation):
    """Two steps: the first (below 50%) prunes only entries the pattern allows, the second completes
    every group; each tensor ends exactly half zero (the Conv has 4 input channels per group). The
    pattern overrides any allocation (N:M is uniform)."""
    path = save(mixed_model(groups=1), tmp_path / "m.onnx")
    calib = save_npz(tmp_path / "c.npz", x=randn(24, 4, 6, 6, seed=10))
    result = run_cli(path, tmp_path / "o.onnx", "--sparsity", "0.5", "--pattern", "2:4", "--method", method,
                     "--calib", calib, "--num-grads", "16", "--steps", "2", "--allocation", allocation)  # fmt: skip
    assert result.exit_code == 0, result.stderr
    written = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(tmp_path / "o.onnx")).graph.initializer}
    # canonical [out, in·k] matrices: Conv [6, 4·9] (kernel 9), Gemm transB [12, 90], MatMul Wᵀ [5, 12]
    checks = {
        "wc": (written["wc"].reshape(6, -1), 9),
        "wg": (written["wg"], 1),
        "wm": (written["wm"].T, 1),
    }
    for name, (matrix, kernel) in checks.items():
        assert pattern_violations(torch.tensor(matrix), 2, 4, kernel) == 0, name
        # every full group of 4 loses exactly 2; a last group of 2 (Gemm: 90 inputs) keeps both
        inputs = matrix.shape[1] // kernel
        expected = (inputs // 4) * 2 + max(0, inputs % 4 - 2)
        assert (matrix == 0).sum() == expected * kernel * matrix.shape[0], name
    # and a dense tensor fails the checker (it is not trivially satisfied)
    assert pattern_violations(torch.tensor(numpy_helper.to_array(mixed_model().graph.initializer[2])), 2, 4) > 0


def test_pattern_with_a_different_sparsity_is_a_usage_error(tmp_path):
    path = save(mixed_model(), tmp_path / "m.onnx")
    result = run_cli(path, tmp_path / "o.onnx", "--sparsity", "0.7", "--pattern", "2:4", "--method", "magnitude")
    assert result.exit_code == 2 and "--pattern 2:4 prunes exactly 0.5" in result.stderr


def test_layerwise_methods_refuse_weights_whose_inputs_they_cannot_read(tmp_path):
    m = model(
        [
            helper.make_node("ConvTranspose", ["x", "wt"], ["h"], name="up"),
            helper.make_node("Flatten", ["h"], ["f"]),
            helper.make_node("MatMul", ["f", "wm"], ["y"], name="mm"),
        ],
        [tensor("x", ["n", 2, 3, 3])],
        [tensor("y", ["n", 4])],
        {"wt": randn(2, 3, 2, 2, seed=1), "wm": randn(48, 4, seed=2)},
    )
    path = save(m, tmp_path / "m.onnx")
    result = run_cli(path, tmp_path / "o.onnx", "--sparsity", "0.5", "--method", "sparsegpt")
    assert result.exit_code == 2, result.stderr
    assert "cannot for 'wt' (ConvTranspose input 1)" in result.stderr and "--exclude" in result.stderr
    assert not (tmp_path / "o.onnx").exists()
    result = run_cli(path, tmp_path / "o.onnx", "--sparsity", "0.5", "--method", "sparsegpt", "--exclude", "^wt$")
    assert result.exit_code == 0, result.stderr


def test_sparsegpt_beats_magnitude_on_the_shipped_mnist_cnn_at_90_percent(tmp_path):
    accuracy = {}
    for method in ("magnitude", "sparsegpt"):
        report = prune(
            PruneConfig(
                input=MODELS / "mnist_cnn.onnx", output=tmp_path / f"{method}.onnx", sparsity=0.9, method=method,
                calibration=MODELS / "mnist_calib.npz", evaluation=MODELS / "mnist_eval.npz", num_grads=128,
                progress="off", refine_masks=False, solve_weights=False, correct_statistics="off",
            )
        )  # fmt: skip
        accuracy[method] = report.validation.accuracy_after
    assert accuracy["sparsegpt"] >= accuracy["magnitude"] + 0.01, accuracy
