"""Preprocessing leaves the output graph untouched: Constant-node weights are pruned in their
Constant nodes, constant-condition Ifs are converted, old IR/opset files go through."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxprune import PruneConfig, prune
from onnxprune.bridge.bindings import read_tensor
from onnxprune.bridge.convert import convert
from onnxprune.masks import prune_count

from builders import model, ort_run, randn, save, save_npz, tensor, torch_run


def const(name: str, array: np.ndarray) -> onnx.NodeProto:
    return helper.make_node(
        "Constant", [], [name], name=f"const_{name}", value=numpy_helper.from_array(np.asarray(array), name="")
    )


def paddle_style() -> onnx.ModelProto:
    """Every weight in a Constant node, as PaddlePaddle exports them."""
    return model(
        [
            const("conv_w", randn(4, 2, 3, 3, seed=1)),
            const("conv_b", randn(4, seed=2)),
            helper.make_node("Conv", ["x", "conv_w", "conv_b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["c"], ["r"], name="relu"),
            helper.make_node("GlobalAveragePool", ["r"], ["g"], name="gap"),
            const("shape", np.array([-1, 4], np.int64)),
            helper.make_node("Reshape", ["g", "shape"], ["f"], name="flat"),
            const("fc_w", randn(4, 3, seed=3)),
            helper.make_node("MatMul", ["f", "fc_w"], ["y"], name="fc"),
        ],
        [tensor("x", ["n", 2, 5, 5])],
        [tensor("y", ["n", 3])],
        opset=11,
        ir_version=7,
    )


def test_constant_node_weights_convert_and_are_discovered_as_constants():
    m = paddle_style()
    converted = convert(m)
    for feeds in ({"x": randn(1, 2, 5, 5)}, {"x": randn(3, 2, 5, 5, seed=9)}):
        np.testing.assert_allclose(torch_run(converted, feeds)[0], ort_run(m, feeds)[0], atol=1e-5)
    found = {t.name: t.source for t in converted.prunable}
    assert found == {"conv_w": "constant", "fc_w": "constant"}


def test_constant_node_weights_are_pruned_inside_their_constant_nodes(tmp_path):
    m = paddle_style()
    path = save(m, tmp_path / "paddle.onnx")
    report = prune(
        PruneConfig(input=path, output=tmp_path / "out.onnx", sparsity=0.5, scope="layer", method="magnitude")
    )
    out = onnx.load(str(tmp_path / "out.onnx"))
    # same nodes (Constants included, in place), no initializer added
    assert [(n.op_type, n.name, list(n.output)) for n in out.graph.node] == [
        (n.op_type, n.name, list(n.output)) for n in m.graph.node
    ]
    assert len(out.graph.initializer) == 0
    for name, size in (("conv_w", 72), ("fc_w", 12)):
        values = read_tensor(out, name)
        assert int((values == 0).sum()) == prune_count(size, 0.5)
        kept = values != 0
        np.testing.assert_array_equal(values[kept], read_tensor(m, name)[kept])
    assert read_tensor(out, "conv_b").tobytes() == read_tensor(m, "conv_b").tobytes()
    assert {t.name for t in report.pruning.tensors} == {"conv_w", "fc_w"}
    assert report.conversion.max_abs_error < 1e-5


def test_constant_condition_if_is_converted_and_branch_weights_are_written_in_the_branch(tmp_path):
    def branch(name, scale):
        return helper.make_graph(
            [helper.make_node("MatMul", ["x", f"{name}_w"], [f"{name}_y"], name=f"{name}_mm")],
            name,
            [],
            [tensor(f"{name}_y", ["n", 4])],
            initializer=[numpy_helper.from_array(randn(4, 4, seed=scale), f"{name}_w")],
        )

    for flag in (True, False):
        m = model(
            [
                const("cond", np.array(flag)),
                helper.make_node(
                    "If", ["cond"], ["y"], name="if", then_branch=branch("then", 1), else_branch=branch("else", 2)
                ),
            ],
            [tensor("x", ["n", 4])],
            [tensor("y", ["n", 4])],
            opset=13,
        )
        converted = convert(m)
        assert converted.inlined_ifs == 1
        feeds = {"x": randn(3, 4, seed=5)}
        np.testing.assert_allclose(torch_run(converted, feeds)[0], ort_run(m, feeds)[0], atol=1e-5)
        taken = "then_w" if flag else "else_w"
        assert [t.name for t in converted.prunable] == [taken]

        path = save(m, tmp_path / f"if_{flag}.onnx")
        prune(PruneConfig(input=path, output=tmp_path / f"out_{flag}.onnx", sparsity=0.5))
        out = onnx.load(str(tmp_path / f"out_{flag}.onnx"))
        assert [n.op_type for n in out.graph.node] == ["Constant", "If"]  # still an If, weights inside
        assert int((read_tensor(out, taken) == 0).sum()) == 8
        other = "else_w" if flag else "then_w"
        assert read_tensor(out, other).tobytes() == read_tensor(m, other).tobytes()


def test_if_on_a_data_dependent_condition_is_unsupported_with_a_reason():
    branch = helper.make_graph([helper.make_node("Identity", ["x"], ["o"])], "b", [], [tensor("o", None)])
    m = model(
        [helper.make_node("If", ["c"], ["y"], then_branch=branch, else_branch=branch)],
        [tensor("x", [2]), tensor("c", [], TensorProto.BOOL)],
        [tensor("y", None)],
        opset=13,
    )
    from onnxprune.errors import UnsupportedOperatorError

    with pytest.raises(UnsupportedOperatorError, match=r"If \(ai.onnx, opset 13\) x1"):
        convert(m)


def ir3_opset9() -> onnx.ModelProto:
    """An IR 3 / opset 9 classifier with its initializers also listed as graph inputs."""
    inits = {
        "conv_w": randn(4, 3, 3, 3, seed=1),
        "conv_b": randn(4, seed=2),
        "bn_s": np.abs(randn(4, seed=3)) + 0.5,
        "bn_b": randn(4, seed=4),
        "bn_m": randn(4, seed=5),
        "bn_v": np.abs(randn(4, seed=6)) + 0.5,
        "shape": np.array([1, -1], np.int64),
        "fc_w": randn(5, 36, seed=7),
        "fc_b": randn(5, seed=8),
    }
    nodes = [
        helper.make_node("Conv", ["data", "conv_w", "conv_b"], ["c"], name="conv1", kernel_shape=[3, 3]),
        helper.make_node("BatchNormalization", ["c", "bn_s", "bn_b", "bn_m", "bn_v"], ["bn"], name="bn1"),
        helper.make_node("Relu", ["bn"], ["r"], name="relu1"),
        helper.make_node("MaxPool", ["r"], ["p"], name="pool1", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Dropout", ["p"], ["d"], name="drop", ratio=0.5),
        helper.make_node("Reshape", ["d", "shape"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["g"], name="fc", transB=1),
        helper.make_node("Softmax", ["g"], ["prob"], name="softmax"),
    ]
    graph_inputs = [tensor("data", [1, 3, 8, 8])] + [
        helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(a.dtype), a.shape) for n, a in inits.items()
    ]
    return model(nodes, graph_inputs, [tensor("prob", [1, 5])], inits, opset=9, ir_version=3)


def test_ir3_opset9_model_converts_and_prunes(tmp_path):
    m = ir3_opset9()
    converted = convert(m)
    assert converted.input_names == ("data",)
    for seed in (0, 1):
        feeds = {"data": randn(1, 3, 8, 8, seed=seed)}
        np.testing.assert_allclose(torch_run(converted, feeds)[0], ort_run(m, feeds)[0], atol=1e-6)
    path = save(m, tmp_path / "old.onnx")
    data = save_npz(tmp_path / "eval.npz", data=randn(10, 3, 8, 8, seed=3))  # fixed batch 1: fed one at a time
    report = prune(PruneConfig(input=path, output=tmp_path / "out.onnx", sparsity=0.5, evaluation=data))
    out = onnx.load(str(tmp_path / "out.onnx"))
    assert (out.ir_version, out.opset_import[0].version) == (3, 9)
    assert [i.name for i in out.graph.input] == [i.name for i in m.graph.input]
    assert report.pruning.zeros == prune_count(108 + 180, 0.5)
    assert report.validation.samples == 10


def test_discovery_through_cast_squeeze_chains_and_rnn_weights():
    m = model(
        [
            helper.make_node("Cast", ["w16"], ["w32"], to=TensorProto.FLOAT),
            helper.make_node("Unsqueeze", ["w32", "ax"], ["w3"]),
            helper.make_node("Squeeze", ["w3", "ax"], ["w"]),
            helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
            helper.make_node("Unsqueeze", ["h", "ax"], ["seq"]),
            helper.make_node("GRU", ["seq", "W", "R"], ["Y"], name="gru", hidden_size=2),
        ],
        [tensor("x", ["n", 3])],
        [tensor("Y", None)],
        {
            "w16": randn(3, 3).astype(np.float16),
            "ax": np.array([0], np.int64),
            "W": randn(1, 6, 3, seed=1),
            "R": randn(1, 6, 2, seed=2),
        },
    )
    found = {t.name: t.consumers[0] for t in convert(m).prunable}
    assert set(found) == {"w16", "W", "R"}
    assert found["w16"].via == ("Cast", "Unsqueeze", "Squeeze")
    assert (found["W"].op_type, found["W"].input_index, found["R"].input_index) == ("GRU", 1, 2)
    feeds = {"x": randn(4, 3, seed=3)}
    np.testing.assert_allclose(torch_run(convert(m), feeds)[0], ort_run(m, feeds)[0], atol=1e-3)


def test_scalar_constants_stay_scalars():
    # Gather with a 0-d index yields a 0-d tensor; a (1,)-shaped index would add an axis
    m = model(
        [
            const("idx", np.array(1, np.int64)),
            helper.make_node("Shape", ["x"], ["s"]),
            helper.make_node("Gather", ["s", "idx"], ["d"], axis=0),
            const("ax", np.array([0], np.int64)),
            helper.make_node("Unsqueeze", ["d", "ax"], ["y"]),
        ],
        [tensor("x", ["n", 5])],
        [tensor("y", None, TensorProto.INT64)],
        opset=13,
    )
    converted = convert(m)
    assert tuple(converted.tensors["idx"].shape) == ()
    feeds = {"x": randn(3, 5)}
    assert torch_run(converted, feeds)[0].tolist() == ort_run(m, feeds)[0].tolist() == [5]


def test_rank_after_a_data_dependent_reshape_comes_from_symbolic_shape_inference():
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Gather", ["s", "zero"], ["n"], axis=0),
        helper.make_node("Unsqueeze", ["n", "ax"], ["n1"]),
        helper.make_node("Div", ["n1", "two"], ["half"]),
        helper.make_node("Concat", ["half", "rest"], ["target"], axis=0),
        helper.make_node("Reshape", ["x", "target"], ["r"]),
        helper.make_node("BatchNormalization", ["r", "sc", "b", "m", "v"], ["y"]),  # its converter needs the rank
    ]
    inits = {
        "zero": np.array(0, np.int64),
        "ax": np.array([0], np.int64),
        "two": np.array([2], np.int64),
        "rest": np.array([6, 4, 4], np.int64),
        "sc": randn(6, seed=1),
        "b": randn(6, seed=2),
        "m": randn(6, seed=3),
        "v": np.abs(randn(6, seed=4)) + 0.5,
    }
    m = model(nodes, [tensor("x", ["n", 3, 4, 4])], [tensor("y", None)], inits, opset=13)
    inferred = onnx.shape_inference.infer_shapes(m)
    reshaped = next(v for v in inferred.graph.value_info if v.name == "r")
    assert not reshaped.type.tensor_type.HasField("shape")  # onnx's inference loses the rank here
    converted = convert(m)
    for batch in (2, 6):
        feeds = {"x": randn(batch, 3, 4, 4, seed=batch)}
        np.testing.assert_allclose(torch_run(converted, feeds)[0], ort_run(m, feeds)[0], atol=1e-5)
