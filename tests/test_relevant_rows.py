"""Rows the outputs never read (padding tokens behind an attention mask) are left out of the
layer-wise statistics and of the repair: found from exact zeros of an output gradient, checked
against the mask by hand, and shown not to matter: whatever the padding holds, the written model
is the same."""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import helper

from onnxprune import PruneConfig, prune
from onnxprune.activations import ActivationSource, InputStatistics, capture_plans, relevant_rows
from onnxprune.bridge.convert import convert
from onnxprune.data import Dataset, input_specs

from builders import model, randn, save, save_npz, tensor


def masked_pooling() -> onnx.ModelProto:
    """Tokens x [N, 5, 6] → MatMul → Relu → MatMul, then the mean over the tokens the mask m
    [N, 5] marks (sentence-transformers' pooling): masked tokens reach the output multiplied by 0."""
    return model(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
            helper.make_node("Relu", ["h"], ["r"], name="relu"),
            helper.make_node("MatMul", ["r", "w2"], ["z"], name="fc2"),
            helper.make_node("Unsqueeze", ["m", "axis2"], ["m3"], name="unsq"),
            helper.make_node("Mul", ["z", "m3"], ["zm"], name="mul"),
            helper.make_node("ReduceSum", ["zm", "axis1"], ["s"], name="sum", keepdims=0),
            helper.make_node("ReduceSum", ["m", "axis1"], ["count"], name="count", keepdims=1),
            helper.make_node("Div", ["s", "count"], ["y"], name="mean"),
        ],
        [tensor("x", ["N", 5, 6]), tensor("m", ["N", 5])],
        [tensor("y", ["N", 4])],
        {
            "w1": randn(6, 8, seed=1),
            "w2": randn(8, 4, seed=2),
            "axis1": np.array([1], dtype=np.int64),
            "axis2": np.array([2], dtype=np.int64),
        },
    )


def data(n: int, padding: str, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 6, n)
    mask = (np.arange(5)[None] < lengths[:, None]).astype(np.float32)
    x = rng.standard_normal((n, 5, 6)).astype(np.float32)
    fill = 0.0 if padding == "zeros" else 10.0 * np.random.default_rng(seed + 1).standard_normal(x.shape)
    x = np.where(mask[:, :, None] > 0, x, fill).astype(np.float32)
    return {"x": x, "m": mask}


def test_the_rows_behind_the_mask_are_the_irrelevant_ones():
    proto = masked_pooling()
    tm = convert(proto)
    feeds = data(7, "noise")
    plans, _ = capture_plans(tm, tm.prunable)
    captures = [plans["w1"][0], plans["w2"][0]]
    masks = relevant_rows(tm, tm.inputs(feeds), captures, 7, 1.0, 0)
    expected = feeds["m"].reshape(-1) > 0  # rows are (sample, token) in order
    for k in (0, 1):
        assert masks[k].tolist() == expected.tolist()


def test_one_row_per_sample_is_never_checked():
    """A plain MLP: every row is a sample, nothing is dropped and nothing is asked again."""
    from builders import mlp

    tm = convert(mlp())
    plans, _ = capture_plans(tm, tm.prunable)
    captures = [c for name in plans for c in plans[name]]
    assert relevant_rows(tm, tm.inputs({"x": randn(5, 8, seed=3)}), captures, 5, 1.0, 0) is None


def test_the_captured_hessian_is_that_of_the_unmasked_tokens_by_hand():
    proto = masked_pooling()
    tm = convert(proto)
    feeds = data(9, "noise")
    source = ActivationSource(
        tm, Dataset(feeds, None, "calib"), input_specs(proto), tm.prunable, 9, 4, 0, torch.device("cpu")
    )
    stats = {"w1": InputStatistics(6)}
    source.collect(stats)
    kept = feeds["x"].reshape(-1, 6)[feeds["m"].reshape(-1) > 0].astype(np.float64)
    np.testing.assert_allclose(stats["w1"].hessian()[0].numpy(), kept.T @ kept / len(kept), rtol=1e-6)


def test_what_the_padding_holds_does_not_change_the_written_model(tmp_path):
    """The same sentences padded with zeros or with large noise: SparseGPT with the repair writes
    the same weights (before, the noise decided most of each layer's XᵀX)."""
    path = save(masked_pooling(), tmp_path / "m.onnx")
    written = []
    for padding in ("zeros", "noise"):
        calib = save_npz(tmp_path / f"{padding}.npz", **data(120, padding))
        out = tmp_path / f"{padding}.onnx"
        prune(
            PruneConfig(
                input=path, output=out, sparsity=0.6, method="sparsegpt", calibration=calib,
                evaluation=calib, progress="off", damp=0.01, scope="layer",
            )
        )  # fmt: skip
        written.append({t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(out)).graph.initializer})
    for name in ("w1", "w2"):
        np.testing.assert_allclose(written[0][name], written[1][name], rtol=1e-5, atol=1e-6)
