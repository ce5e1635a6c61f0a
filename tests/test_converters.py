"""Every converter onnxprune adds or overrides, against onnxruntime on random inputs of several
shapes (batch > 1 included)."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

from onnxprune.bridge.convert import convert
from onnxprune.errors import UnsupportedOperatorError

from builders import model, ort_run, randn, tensor, torch_run


def check(m, *feed_sets, atol=1e-5, rtol=1e-5):
    """Convert once, then compare with onnxruntime on each feed set."""
    converted = convert(m)
    for feeds in feed_sets:
        ours, theirs = torch_run(converted, feeds), ort_run(m, feeds)
        assert len(ours) == len(theirs)
        for a, b in zip(ours, theirs):
            assert a.shape == b.shape, (a.shape, b.shape)
            np.testing.assert_allclose(a, b, atol=atol, rtol=rtol)


def unary(op, shape_in, opset=17, out_type=TensorProto.FLOAT, **attrs):
    return model(
        [helper.make_node(op, ["x"], ["y"], **attrs)],
        [tensor("x", shape_in)],
        [tensor("y", None, out_type)],
        opset=opset,
    )


# --------------------------------------------------------------------------- pooling, misc


def test_global_max_pool():
    m = unary("GlobalMaxPool", None)
    check(m, {"x": randn(1, 3, 4, 4)}, {"x": randn(2, 5, 3, seed=1)}, {"x": randn(3, 2, 2, 3, 4, seed=2)})


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_20(approximate):
    m = unary("Gelu", None, opset=20, approximate=approximate)
    check(m, {"x": randn(2, 7)}, {"x": randn(3, 4, 5, seed=1)})


def test_size():
    m = unary("Size", None, out_type=TensorProto.INT64)
    check(m, {"x": randn(2, 7)}, {"x": randn(3, 4, 5, seed=1)})


@pytest.mark.parametrize("axis", [0, 1, -1, 2])
def test_flatten_any_rank_including_rank_1(axis):
    rank1 = unary("Flatten", None, opset=13, axis=min(axis, 1) if axis >= 0 else -1)
    check(rank1, {"x": randn(5)}, {"x": randn(1, seed=1)})
    m = unary("Flatten", None, opset=13, axis=axis)
    check(m, {"x": randn(2, 3, 4)}, {"x": randn(1, 5, 2, seed=1)})


def test_dropout_7_at_opset_9_is_identity_in_inference():
    m = unary("Dropout", None, opset=9, ratio=0.3)
    check(m, {"x": randn(4, 3)}, {"x": randn(1, 2, 5, seed=1)})


# --------------------------------------------------------------------------- Reduce*-18


REDUCE_OPS = [
    "ReduceMean",
    "ReduceMax",
    "ReduceMin",
    "ReduceProd",
    "ReduceL1",
    "ReduceL2",
    "ReduceLogSum",
    "ReduceLogSumExp",
    "ReduceSumSquare",
]


@pytest.mark.parametrize("op", REDUCE_OPS)
@pytest.mark.parametrize("axes", [None, [1], [-1, 0]])
@pytest.mark.parametrize("keepdims", [0, 1])
def test_reduce_18_axes_as_input(op, axes, keepdims):
    inputs, inits = ["x"], {}
    if axes is not None:
        inputs.append("axes")
        inits["axes"] = np.array(axes, np.int64)
    m = model(
        [helper.make_node(op, inputs, ["y"], keepdims=keepdims)],
        [tensor("x", None)],
        [tensor("y", None)],
        inits,
        opset=18,
    )
    positive = op in ("ReduceLogSum",)
    a, b = randn(2, 3, 4), randn(5, 2, 3, seed=1)
    if positive:
        a, b = np.abs(a) + 0.1, np.abs(b) + 0.1
    check(m, {"x": a}, {"x": b}, rtol=1e-4)


def test_reduce_18_noop_with_empty_axes():
    m = model(
        [helper.make_node("ReduceMean", ["x"], ["y"], noop_with_empty_axes=1)],
        [tensor("x", None)],
        [tensor("y", None)],
        opset=18,
    )
    check(m, {"x": randn(2, 3)})


def test_reduce_max_20_alias_serves_the_18_converter():
    m = model(
        [helper.make_node("ReduceMax", ["x", "axes"], ["y"], keepdims=0)],
        [tensor("x", None)],
        [tensor("y", None)],
        {"axes": np.array([1], np.int64)},
        opset=20,
    )
    check(m, {"x": randn(3, 4)}, {"x": randn(2, 5, 2, seed=1)})


# --------------------------------------------------------------------------- Pad-18/19


@pytest.mark.parametrize("mode", ["constant", "reflect", "edge", "wrap"])
@pytest.mark.parametrize("with_axes", [False, True])
def test_pad_18_19(mode, with_axes):
    inputs, inits = ["x", "pads"], {}
    if with_axes:
        inits["pads"] = np.array([1, 2, 2, 0], np.int64)  # axes (-1, 1): begins then ends
        inits["axes"] = np.array([-1, 1], np.int64)
        inputs += ["value", "axes"]
        inits["value"] = np.array(1.5, np.float32)
    else:
        inits["pads"] = np.array([0, 1, 2, 1, 0, 1], np.int64)
        if mode == "constant":
            inputs.append("value")
            inits["value"] = np.array(-2.0, np.float32)
    m = model(
        [helper.make_node("Pad", inputs, ["y"], mode=mode)], [tensor("x", None)], [tensor("y", None)], inits, opset=19
    )
    check(m, {"x": randn(2, 3, 5)}, {"x": randn(3, 4, 4, seed=1)})


def test_pad_negative_pads_crop():
    m = model(
        [helper.make_node("Pad", ["x", "pads"], ["y"], mode="edge")],
        [tensor("x", None)],
        [tensor("y", None)],
        {"pads": np.array([0, -1, 1, 0], np.int64)},
        opset=18,
    )
    check(m, {"x": randn(2, 5)}, {"x": randn(4, 3, seed=1)})


# --------------------------------------------------------------------------- Split-18, multi-output


@pytest.mark.parametrize("outputs, size", [(3, 7), (4, 10), (2, 6)])
def test_split_18_num_outputs_uneven(outputs, size):
    names = [f"y{i}" for i in range(outputs)]
    m = model(
        [helper.make_node("Split", ["x"], names, axis=1, num_outputs=outputs)],
        [tensor("x", None)],
        [tensor(n, None) for n in names],
        opset=18,
    )
    check(m, {"x": randn(2, size)}, {"x": randn(1, size, 3, seed=1)})


def test_split_18_sizes_input():
    m = model(
        [helper.make_node("Split", ["x", "s"], ["a", "b"], axis=-1)],
        [tensor("x", None)],
        [tensor("a", None), tensor("b", None)],
        {"s": np.array([1, 3], np.int64)},
        opset=18,
    )
    check(m, {"x": randn(2, 4)}, {"x": randn(3, 5, 4, seed=1)})


def test_graph_outputs_fed_by_a_multi_output_node_are_tensors_not_tuples():
    m = model(
        [
            helper.make_node("TopK", ["x", "k"], ["values", "indices"], axis=-1),
            helper.make_node("Relu", ["values"], ["r"]),
        ],
        [tensor("x", ["n", 6])],
        [tensor("r", None), tensor("indices", None, TensorProto.INT64), tensor("values", None)],
        {"k": np.array([3], np.int64)},
    )
    check(m, {"x": randn(2, 6)}, {"x": randn(5, 6, seed=1)})
    outputs = torch_run(convert(m), {"x": randn(2, 6)})
    assert [o.shape for o in outputs] == [(2, 3), (2, 3), (2, 3)]


# --------------------------------------------------------------------------- overrides


def test_reshape_allowzero_1_keeps_zero_sized_axes():
    m = model(
        [helper.make_node("Reshape", ["x", "s"], ["y"], allowzero=1)],
        [tensor("x", None)],
        [tensor("y", None)],
        {"s": np.array([0, 4], np.int64)},
        opset=14,
    )
    check(m, {"x": np.zeros((2, 0, 3), np.float32)})
    m2 = model(
        [helper.make_node("Reshape", ["x", "s"], ["y"], allowzero=1)],
        [tensor("x", None)],
        [tensor("y", None)],
        {"s": np.array([3, -1], np.int64)},
        opset=14,
    )
    check(m2, {"x": randn(2, 3, 2)}, {"x": randn(6, 1, seed=1)})


def test_clip_with_min_max_computed_in_the_graph():
    m = model(
        [helper.make_node("Clip", ["x", "lo", "hi"], ["y"])],
        [tensor("x", None), tensor("lo", []), tensor("hi", [])],
        [tensor("y", None)],
        opset=13,
    )
    scalar = lambda v: np.array(v, np.float32)  # noqa: E731
    check(
        m,
        {"x": randn(3, 4), "lo": scalar(-0.5), "hi": scalar(0.3)},
        {"x": randn(2, 2, 5, seed=1), "lo": scalar(0.2), "hi": scalar(-0.1)},
    )  # min > max
    only_max = model(
        [helper.make_node("Clip", ["x", "", "hi"], ["y"])],
        [tensor("x", None), tensor("hi", [])],
        [tensor("y", None)],
        opset=13,
    )
    check(only_max, {"x": randn(3, 4), "hi": scalar(0.1)})
    # a constant min and an absent max (''), as torch.onnx.export writes clamp(min=...)
    const_min = model(
        [helper.make_node("Clip", ["x", "lo", ""], ["y"])],
        [tensor("x", None)],
        [tensor("y", None)],
        {"lo": np.array(1e-9, np.float32)},
        opset=17,
    )
    check(const_min, {"x": randn(3, 4)}, {"x": randn(2, 5, seed=1)})


# --------------------------------------------------------------------------- aliases


def test_newer_opset_versions_served_by_aliases():
    m = model(
        [
            helper.make_node("Reshape", ["x", "s"], ["r"]),
            helper.make_node("Cast", ["r"], ["c"], to=TensorProto.FLOAT16),
            helper.make_node("Cast", ["c"], ["y"], to=TensorProto.FLOAT),
        ],
        [tensor("x", None)],
        [tensor("y", None)],
        {"s": np.array([-1, 6], np.int64)},
        opset=21,
        ir_version=10,
    )
    check(m, {"x": randn(2, 3, 2)}, {"x": randn(4, 6, seed=1)}, atol=1e-2)


def test_alias_refuses_a_new_attribute_set_to_a_non_default_value():
    def resize(**attrs):
        node = helper.make_node("Resize", ["x", "", "scales"], ["y"], mode="linear", **attrs)
        return model(
            [node],
            [tensor("x", [1, 2, 4, 4])],
            [tensor("y", None)],
            {"scales": np.array([1, 1, 2, 2], np.float32)},
            opset=18,
        )

    with pytest.raises(UnsupportedOperatorError, match=r"Resize-18 attribute antialias=1 is not supported"):
        convert(resize(antialias=1))
    check(resize(antialias=0), {"x": randn(1, 2, 4, 4)})


# --------------------------------------------------------------------------- recurrent


def _rnn_model(
    op,
    gates,
    hidden,
    inputs,
    directions,
    with_bias=True,
    with_states=True,
    with_lens=False,
    with_peep=False,
    opset=14,
    **attrs,
):
    names = ["x", "W", "R"]
    inits = {
        "W": randn(directions, gates * hidden, inputs, seed=10) * 0.5,
        "R": randn(directions, gates * hidden, hidden, seed=11) * 0.5,
    }
    graph_inputs = [tensor("x", None)]
    names.append("B" if with_bias else "")
    if with_bias:
        inits["B"] = randn(directions, 2 * gates * hidden, seed=12) * 0.5
    names.append("lens" if with_lens else "")
    if with_lens:
        graph_inputs.append(tensor("lens", None, TensorProto.INT32))
    names.append("h0" if with_states else "")
    if with_states:
        graph_inputs.append(tensor("h0", None))
    outputs = ["Y", "Y_h"]
    if op == "LSTM":
        names.append("c0" if with_states else "")
        if with_states:
            graph_inputs.append(tensor("c0", None))
        names.append("P" if with_peep else "")
        if with_peep:
            inits["P"] = randn(directions, 3 * hidden, seed=13) * 0.5
        outputs.append("Y_c")
    while names[-1] == "":
        names.pop()
    node = helper.make_node(
        op, names, outputs, hidden_size=hidden, direction={1: "forward", 2: "bidirectional"}[directions], **attrs
    )
    return model([node], graph_inputs, [tensor(o, None) for o in outputs], inits, opset=opset)


def _rnn_feeds(seq, batch, inputs, hidden, directions, op, lens=None, layout=0, seed=0):
    x = randn(seq, batch, inputs, seed=seed) if layout == 0 else randn(batch, seq, inputs, seed=seed)
    state = (directions, batch, hidden) if layout == 0 else (batch, directions, hidden)
    feeds = {"x": x, "h0": randn(*state, seed=seed + 1)}
    if op == "LSTM":
        feeds["c0"] = randn(*state, seed=seed + 2)
    if lens is not None:
        feeds["lens"] = np.array(lens, np.int32)
    return feeds


@pytest.mark.parametrize("directions", [1, 2])
@pytest.mark.parametrize("peepholes", [False, True])
def test_lstm(directions, peepholes):
    m = _rnn_model("LSTM", 4, 5, 3, directions, with_peep=peepholes)
    check(m, _rnn_feeds(6, 1, 3, 5, directions, "LSTM"), _rnn_feeds(4, 3, 3, 5, directions, "LSTM", seed=4))


def test_lstm_reverse_and_bidirectional_with_sequence_lens():
    m = _rnn_model("LSTM", 4, 4, 3, 1, with_lens=True)
    m.graph.node[0].attribute.append(helper.make_attribute("direction", "reverse"))
    del m.graph.node[0].attribute[[a.name for a in m.graph.node[0].attribute].index("direction")]
    check(m, _rnn_feeds(5, 3, 3, 4, 1, "LSTM", lens=[5, 2, 3]))
    bidir = _rnn_model("LSTM", 4, 4, 3, 2, with_lens=True)
    check(bidir, _rnn_feeds(5, 3, 3, 4, 2, "LSTM", lens=[1, 5, 3], seed=3))


def test_lstm_layout_1_equals_layout_0_on_transposed_inputs():
    # onnxruntime's CPU LSTM refuses layout=1, so compare with its layout-0 result instead.
    seq_first = _rnn_model("LSTM", 4, 4, 3, 2)
    batch_first = _rnn_model("LSTM", 4, 4, 3, 2, layout=1)
    feeds = _rnn_feeds(5, 2, 3, 4, 2, "LSTM", seed=5)
    y, y_h, y_c = ort_run(seq_first, feeds)
    transposed = {
        "x": feeds["x"].transpose(1, 0, 2),
        "h0": feeds["h0"].transpose(1, 0, 2),
        "c0": feeds["c0"].transpose(1, 0, 2),
    }
    ours = torch_run(convert(batch_first), transposed)
    np.testing.assert_allclose(ours[0], y.transpose(2, 0, 1, 3), atol=1e-5)
    np.testing.assert_allclose(ours[1], y_h.transpose(1, 0, 2), atol=1e-5)
    np.testing.assert_allclose(ours[2], y_c.transpose(1, 0, 2), atol=1e-5)


@pytest.mark.parametrize("linear_before_reset", [0, 1])
@pytest.mark.parametrize("directions", [1, 2])
def test_gru(linear_before_reset, directions):
    m = _rnn_model("GRU", 3, 4, 3, directions, linear_before_reset=linear_before_reset)
    check(m, _rnn_feeds(5, 1, 3, 4, directions, "GRU"), _rnn_feeds(3, 4, 3, 4, directions, "GRU", seed=2))


@pytest.mark.parametrize("activation", ["Tanh", "Relu"])
def test_rnn(activation):
    m = _rnn_model("RNN", 1, 4, 3, 2, activations=[activation, activation])
    check(m, _rnn_feeds(5, 2, 3, 4, 2, "RNN"), _rnn_feeds(2, 1, 3, 4, 2, "RNN", seed=3))


def test_lstm_at_opset_7_without_optional_inputs_and_only_y():
    node = helper.make_node("LSTM", ["x", "W", "R"], ["Y"], hidden_size=3)
    m = model(
        [node],
        [tensor("x", None)],
        [tensor("Y", None)],
        {"W": randn(1, 12, 2, seed=1), "R": randn(1, 12, 3, seed=2)},
        opset=9,
    )
    check(m, {"x": randn(4, 2, 2)}, {"x": randn(1, 5, 2, seed=3)})


def test_dropout_with_declared_mask_output_keeps_the_batch():
    m = model(
        [helper.make_node("Dropout", ["x"], ["y", "mask"], ratio=0.5), helper.make_node("Relu", ["y"], ["z"])],
        [tensor("x", None)],
        [tensor("z", None)],
        opset=9,
    )
    check(m, {"x": randn(3, 4)}, {"x": randn(2, 3, 5, seed=1)})


# --------------------------------------------------------------------------- pooling, SAME, slice, pad

from onnxprune.bridge.converters.layout import pool_output_size, same_pads  # noqa: E402


def test_same_pads_and_pool_output_size_by_hand():
    # size 5, kernel 3, stride 2: out = ceil(5/2) = 3, total pad = (3-1)*2 + 3 - 5 = 2
    assert same_pads([5], [3], [2], [1], upper=True) == [1, 1]
    # size 6, kernel 3, stride 2: out 3, total pad = 4 + 3 - 6 = 1 -> the odd pad goes last (UPPER) or first
    assert same_pads([6], [3], [2], [1], upper=True) == [0, 1]
    assert same_pads([6], [3], [2], [1], upper=False) == [1, 0]
    assert pool_output_size(6, 3, 2, 1, 0, 0, ceil=False) == 2  # (6-3)//2 + 1
    assert pool_output_size(6, 3, 2, 1, 0, 0, ceil=True) == 3  # ceil(3/2) + 1
    assert pool_output_size(5, 2, 2, 1, 0, 1, ceil=True) == 3  # last window starts at 4 < 5: kept
    assert pool_output_size(4, 2, 2, 1, 0, 1, ceil=True) == 2  # ceil(3/2)+1 = 3, but window 3 would start at 4


POOLS = [
    dict(kernel_shape=[3, 3], strides=[2, 2], pads=[0, 1, 1, 2]),
    dict(kernel_shape=[2, 3], pads=[1, 0, 0, 1], ceil_mode=1, strides=[2, 2]),
    dict(kernel_shape=[3, 3], strides=[2, 2], auto_pad="SAME_UPPER"),
    dict(kernel_shape=[3, 2], strides=[2, 1], auto_pad="SAME_LOWER"),
    dict(kernel_shape=[2, 2], strides=[2, 2], auto_pad="VALID", ceil_mode=1),
    dict(kernel_shape=[3, 3], pads=[1, 1, 1, 1], count_include_pad=1),
    dict(kernel_shape=[3, 3], pads=[0, 0, 2, 1], count_include_pad=1, strides=[2, 2]),
]


@pytest.mark.parametrize("op", ["AveragePool", "MaxPool"])
@pytest.mark.parametrize("attrs", POOLS, ids=range(len(POOLS)))
def test_pooling_pads_ceil_same_and_count_include_pad(op, attrs):
    if op == "MaxPool":
        attrs = {k: v for k, v in attrs.items() if k != "count_include_pad"}
    m = model(
        [helper.make_node(op, ["x"], ["y"], **attrs)], [tensor("x", ["n", 2, "h", "w"])], [tensor("y", None)], opset=11
    )
    check(m, {"x": randn(1, 2, 7, 6)}, {"x": randn(3, 2, 8, 9, seed=1)}, {"x": randn(2, 2, 5, 5, seed=2)})


def test_maxpool_dilations_and_1d_3d():
    dilated = model(
        [helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[2, 2], dilations=[2, 2], pads=[1, 0, 0, 1])],
        [tensor("x", None)],
        [tensor("y", None)],
        opset=12,
    )
    check(dilated, {"x": randn(2, 3, 7, 7)})
    one_d = model(
        [helper.make_node("AveragePool", ["x"], ["y"], kernel_shape=[3], strides=[2], pads=[0, 2])],
        [tensor("x", None)],
        [tensor("y", None)],
        opset=11,
    )
    check(one_d, {"x": randn(2, 3, 9)}, {"x": randn(1, 1, 4, seed=1)})
    three_d = model(
        [helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[2, 2, 2], strides=[2, 2, 2], auto_pad="SAME_UPPER")],
        [tensor("x", None)],
        [tensor("y", None)],
        opset=11,
    )
    check(three_d, {"x": randn(1, 2, 5, 4, 3)})


@pytest.mark.parametrize("auto_pad", ["SAME_UPPER", "SAME_LOWER"])
def test_conv_with_auto_pad_same(auto_pad):
    m = model(
        [helper.make_node("Conv", ["x", "w", "b"], ["y"], auto_pad=auto_pad, strides=[2, 2])],
        [tensor("x", None)],
        [tensor("y", None)],
        {"w": randn(4, 3, 3, 2), "b": randn(4, seed=1)},
        opset=11,
    )
    check(m, {"x": randn(1, 3, 8, 7)}, {"x": randn(2, 3, 5, 6, seed=1)})
    (found,) = convert(m).prunable
    assert found.name == "w"


@pytest.mark.parametrize("mode", ["reflect", "edge", "constant"])
def test_pad_13_any_rank(mode):
    m = model(
        [helper.make_node("Pad", ["x", "pads"], ["y"], mode=mode)],
        [tensor("x", None)],
        [tensor("y", None)],
        {"pads": np.array([0, 3, 0, 2], np.int64)},
        opset=13,
    )
    check(m, {"x": randn(2, 5)}, {"x": randn(1, 6, seed=1)})


SLICES = [
    ([1], [-1], [1], [1]),
    ([-1], [-(2**63)], [0], [-1]),  # reverse the whole first axis
    ([5, 0], [1, 10**9], [0, -1], [-2, 2]),
    ([0, -3], [2**63 - 1, -1], [-1, 0], [1, 1]),
    ([10], [0], [0], [-3]),  # start clamped to the last element
]


@pytest.mark.parametrize("starts, ends, axes, steps", SLICES, ids=range(len(SLICES)))
def test_slice_steps_clamping_and_negative_axes(starts, ends, axes, steps):
    inits = {
        "s": np.array(starts, np.int64),
        "e": np.array(ends, np.int64),
        "a": np.array(axes, np.int64),
        "t": np.array(steps, np.int64),
    }
    m = model(
        [helper.make_node("Slice", ["x", "s", "e", "a", "t"], ["y"])],
        [tensor("x", None)],
        [tensor("y", None)],
        inits,
        opset=13,
    )
    check(m, {"x": randn(6, 7)}, {"x": randn(4, 9, seed=1)})
