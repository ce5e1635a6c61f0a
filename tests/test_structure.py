"""Structured removal of channels: the traced groups of hand-built graphs, and the physically
smaller ONNX model against the original with the same channels masked (and, for the residual
pair, against torch with the channels sliced out by hand), all run in onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import helper, numpy_helper

from onnxprune.structure import STRUCTURES
from onnxprune.structure.remove import class_totals, keep_masks, kept_biases, remove_channels
from onnxprune.structure.select import EntryCounter
from onnxprune.structure.trace import trace_channels

from builders import attention_block, model, ort_run, randn, tensor


def conv(name, x, w, b, out, group=1, pad=1):
    return helper.make_node("Conv", [x, w, b], [out], name=name, pads=[pad] * 4, group=group)


def residual_pair():
    """x -> conv a -> relu -> (conv b, conv c) -> add -> relu -> conv d -> global pool -> flatten -> gemm."""
    inits = {
        "wa": randn(4, 3, 3, 3, seed=1),
        "ba": randn(4, seed=2),
        "wb": randn(6, 4, 3, 3, seed=3),
        "bb": randn(6, seed=4),
        "wc": randn(6, 4, 3, 3, seed=5),
        "bc": randn(6, seed=6),
        "wd": randn(5, 6, 3, 3, seed=7),
        "bd": randn(5, seed=8),
        "wf": randn(5, 2, seed=9),
        "bf": randn(2, seed=10),
    }
    nodes = [
        conv("a", "x", "wa", "ba", "ya"),
        helper.make_node("Relu", ["ya"], ["ra"], name="ra"),
        conv("b", "ra", "wb", "bb", "yb"),
        conv("c", "ra", "wc", "bc", "yc"),
        helper.make_node("Add", ["yb", "yc"], ["s"], name="add"),
        helper.make_node("Relu", ["s"], ["rs"], name="rs"),
        conv("d", "rs", "wd", "bd", "yd"),
        helper.make_node("GlobalAveragePool", ["yd"], ["p"], name="pool"),
        helper.make_node("Flatten", ["p"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "wf", "bf"], ["out"], name="fc"),
    ]
    return model(nodes, [tensor("x", ["n", 3, 8, 8])], [tensor("out", ["n", 2])], inits)


def classes_of(graph, node_name):
    space = next(s for s in graph.spaces if s.node == node_name)
    return [graph.find(e) for e in range(space.start, space.start + space.size)]


def masked(proto, graph, removed):
    """The original with every entry of the removed classes zeroed (what the torch model holds)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    shapes = {t.name: tuple(t.dims) for t in copy.graph.initializer}
    masks = keep_masks(graph, shapes, removed)
    for t in copy.graph.initializer:
        if t.name in masks:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * masks[t.name], t.name))
    return copy


def pruned(proto, removed_of):
    graph = trace_channels(proto)
    removed = removed_of(graph)
    smaller = onnx.ModelProto()
    smaller.CopyFrom(proto)
    report = remove_channels(smaller, graph, removed)
    onnx.checker.check_model(smaller, full_check=True)
    return graph, removed, smaller, report


def test_residual_pair_ties_the_added_branches_and_equals_torch_with_the_channels_sliced_out():
    proto = residual_pair()
    graph = trace_channels(proto)
    b, c = classes_of(graph, "b"), classes_of(graph, "c")
    assert b == c  # the Add ties channel k of both branches into one class
    assert all(graph.is_blocked(e) for e in classes_of(graph, "fc"))  # the graph output
    assert not any(graph.is_blocked(e) for e in classes_of(graph, "a") + b + classes_of(graph, "d"))
    removed = [classes_of(graph, "a")[1], b[0], b[4], classes_of(graph, "d")[2]]
    smaller = onnx.ModelProto()
    smaller.CopyFrom(proto)
    report = remove_channels(smaller, graph, removed)
    onnx.checker.check_model(smaller, full_check=True)
    assert report == {"a": (3, 4), "b": (4, 6), "c": (4, 6), "d": (4, 5)}
    dims = {t.name: tuple(t.dims) for t in smaller.graph.initializer}
    assert dims["wa"] == (3, 3, 3, 3) and dims["wb"] == (4, 3, 3, 3) and dims["wd"] == (4, 4, 3, 3)
    assert dims["wf"] == (4, 2) and dims["bb"] == (4,)
    x = randn(2, 3, 8, 8, seed=11)
    got = ort_run(smaller, {"x": x})[0]
    # torch with the channels sliced out by hand
    w = {k: torch.from_numpy(numpy_helper.to_array(t)) for k, t in ((t.name, t) for t in proto.graph.initializer)}
    ka, kb, kd = [0, 2, 3], [1, 2, 3, 5], [0, 1, 3, 4]
    ya = F.relu(F.conv2d(torch.from_numpy(x), w["wa"][ka], w["ba"][ka], padding=1))
    yb = F.conv2d(ya, w["wb"][kb][:, ka], w["bb"][kb], padding=1)
    yc = F.conv2d(ya, w["wc"][kb][:, ka], w["bc"][kb], padding=1)
    yd = F.conv2d(F.relu(yb + yc), w["wd"][kd][:, kb], w["bd"][kd], padding=1)
    expected = yd.mean(dim=(2, 3)) @ w["wf"][kd] + w["bf"]
    np.testing.assert_allclose(got, expected.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got, ort_run(masked(proto, graph, removed), {"x": x})[0], rtol=1e-4, atol=1e-5)


def test_concat_offsets_the_second_input_and_a_graph_input_in_the_concat_stays():
    inits = {
        "w1": randn(3, 2, 3, 3, seed=1),
        "b1": randn(3, seed=2),
        "w2": randn(4, 2, 3, 3, seed=3),
        "b2": randn(4, seed=4),
        "w3": randn(5, 9, 3, 3, seed=5),
        "b3": randn(5, seed=6),
    }
    nodes = [
        conv("c1", "x", "w1", "b1", "y1"),
        conv("c2", "x", "w2", "b2", "y2"),
        helper.make_node("Concat", ["y1", "y2", "x"], ["cat"], name="cat", axis=1),
        conv("c3", "cat", "w3", "b3", "out"),
    ]
    proto = model(nodes, [tensor("x", [1, 2, 6, 6])], [tensor("out", [1, 5, 6, 6])], inits)
    graph, removed, smaller, report = pruned(
        proto, lambda g: [classes_of(g, "c1")[2], classes_of(g, "c2")[0], classes_of(g, "c2")[3]]
    )
    assert report == {"c1": (2, 3), "c2": (2, 4)}
    dims = {t.name: tuple(t.dims) for t in smaller.graph.initializer}
    assert dims["w3"] == (5, 6, 3, 3)  # 9 inputs less c1's third and c2's first and fourth
    w3 = numpy_helper.to_array(next(t for t in smaller.graph.initializer if t.name == "w3"))
    original = numpy_helper.to_array(proto.graph.initializer[4])
    np.testing.assert_array_equal(w3, original[:, [0, 1, 4, 5, 7, 8]])
    x = randn(1, 2, 6, 6, seed=7)
    np.testing.assert_allclose(
        ort_run(smaller, {"x": x})[0], ort_run(masked(proto, graph, removed), {"x": x})[0], rtol=1e-4, atol=1e-5
    )


def test_depthwise_block_carries_channels_through_and_updates_group():
    inits = {
        "w1": randn(6, 3, 1, 1, seed=1),
        "b1": randn(6, seed=2),
        "s": np.abs(randn(6, seed=3)) + 0.5,
        "bn_b": randn(6, seed=4),
        "m": randn(6, seed=5),
        "v": np.abs(randn(6, seed=6)) + 0.5,
        "wd": randn(6, 1, 3, 3, seed=7),
        "bd": randn(6, seed=8),
        "scale": randn(1, 6, 1, 1, seed=9),
        "w2": randn(4, 6, 1, 1, seed=10),
        "b2": randn(4, seed=11),
    }
    nodes = [
        conv("c1", "x", "w1", "b1", "y1", pad=0),
        helper.make_node("BatchNormalization", ["y1", "s", "bn_b", "m", "v"], ["n1"], name="bn"),
        helper.make_node("Clip", ["n1"], ["r1"], name="relu6"),
        conv("dw", "r1", "wd", "bd", "yd", group=6),
        helper.make_node("Mul", ["yd", "scale"], ["sc"], name="mul"),
        conv("c2", "sc", "w2", "b2", "out", pad=0),
    ]
    proto = model(nodes, [tensor("x", [1, 3, 5, 5])], [tensor("out", [1, 4, 5, 5])], inits)
    graph, removed, smaller, report = pruned(proto, lambda g: [classes_of(g, "c1")[k] for k in (0, 3, 4)])
    assert report == {"c1": (3, 6)}
    attrs = {a.name: a.i for a in smaller.graph.node[3].attribute if a.name == "group"}
    assert attrs == {"group": 3}
    dims = {t.name: tuple(t.dims) for t in smaller.graph.initializer}
    assert dims["wd"] == (3, 1, 3, 3) and dims["s"] == (3,) and dims["scale"] == (1, 3, 1, 1)
    assert dims["w2"] == (4, 3, 1, 1)
    x = randn(1, 3, 5, 5, seed=12)
    np.testing.assert_allclose(
        ort_run(smaller, {"x": x})[0], ort_run(masked(proto, graph, removed), {"x": x})[0], rtol=1e-4, atol=1e-5
    )
    # a bias the statistics correction adds to the depthwise Conv (PaddlePaddle's have none) goes
    # with its channels: 6 values, channels 0, 3 and 4 removed (onnxruntime refused the model before)
    added = [("yd", "wd", np.arange(6.0)), ("out", "w2", np.arange(4.0))]
    cut = kept_biases(graph, removed, added)
    assert list(cut[0][2]) == [1.0, 2.0, 5.0] and list(cut[1][2]) == [0.0, 1.0, 2.0, 3.0]


def test_flatten_and_constant_reshape_repeat_channels_over_the_merged_positions():
    inits = {
        "w1": randn(3, 1, 3, 3, seed=1),
        "b1": randn(3, seed=2),
        "shape": np.array([-1, 48], dtype=np.int64),
        "wf": randn(48, 2, seed=3),
    }
    nodes = [
        conv("c1", "x", "w1", "b1", "y1"),
        helper.make_node("Reshape", ["y1", "shape"], ["flat"], name="reshape"),
        helper.make_node("MatMul", ["flat", "wf"], ["out"], name="fc"),
    ]
    proto = model(nodes, [tensor("x", [1, 1, 4, 4])], [tensor("out", [1, 2])], inits)
    graph, removed, smaller, report = pruned(proto, lambda g: [classes_of(g, "c1")[1]])
    inits_after = {t.name: numpy_helper.to_array(t) for t in smaller.graph.initializer}
    assert list(inits_after["shape"]) == [-1, 32]
    np.testing.assert_array_equal(
        inits_after["wf"], numpy_helper.to_array(proto.graph.initializer[3])[list(range(16)) + list(range(32, 48))]
    )
    x = randn(1, 1, 4, 4, seed=4)
    np.testing.assert_allclose(
        ort_run(smaller, {"x": x})[0], ort_run(masked(proto, graph, removed), {"x": x})[0], rtol=1e-4, atol=1e-5
    )


def test_mlp_neurons_and_what_cannot_be_followed_is_blocked_with_a_reason():
    inits = {"w1": randn(8, 6, seed=1), "b1": randn(6, seed=2), "w2": randn(6, 3, seed=3)}
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
        helper.make_node("Add", ["h", "b1"], ["hb"], name="bias1"),
        helper.make_node("Gelu", ["hb"], ["g"], name="gelu", domain=""),
        helper.make_node("MatMul", ["g", "w2"], ["y"], name="fc2"),
        helper.make_node("Softmax", ["y"], ["out"], name="softmax", axis=-1),
    ]
    proto = model(nodes, [tensor("x", [2, 5, 8])], [tensor("out", [2, 5, 3])], inits, opset=20)
    graph = trace_channels(proto)
    fc2 = classes_of(graph, "fc2")
    assert all(graph.is_blocked(e) for e in fc2)
    assert "Softmax" in graph.blocked[fc2[0]]
    counter = EntryCounter(graph, {"w1": (8, 6), "w2": (6, 3)})
    assert {counter.size(root) for root in graph.classes()} == {
        8 + 3
    }  # a hidden neuron: its column of w1 and its row of w2
    totals = class_totals(graph, {"w1": np.abs(inits["w1"]), "w2": np.abs(inits["w2"])})
    k = classes_of(graph, "fc1")[2]
    assert totals[k] == pytest.approx(np.abs(inits["w1"][:, 2]).sum() + np.abs(inits["w2"][2]).sum())
    graph, removed, smaller, report = pruned(proto, lambda g: [classes_of(g, "fc1")[k] for k in (1, 2, 5)])
    assert report == {"fc1": (3, 6)}
    x = randn(2, 5, 8, seed=4)
    np.testing.assert_allclose(
        ort_run(smaller, {"x": x})[0], ort_run(masked(proto, graph, removed), {"x": x})[0], rtol=1e-5, atol=1e-6
    )


def test_a_grouped_conv_and_an_unknown_op_block_instead_of_guessing():
    inits = {"w1": randn(4, 2, 3, 3, seed=1), "b1": randn(4, seed=2), "w2": randn(4, 2, 3, 3, seed=3)}
    nodes = [
        conv("c1", "x", "w1", "b1", "y1"),
        helper.make_node("Conv", ["y1", "w2"], ["y2"], name="grouped", group=2, pads=[1, 1, 1, 1]),
        helper.make_node("Softmax", ["y2"], ["out"], name="sm", axis=1),
    ]
    proto = model(nodes, [tensor("x", [1, 2, 4, 4])], [tensor("out", [1, 4, 4, 4])], inits)
    graph = trace_channels(proto)
    assert graph.classes() == {}
    reasons = set(graph.blocked.values())
    # c1's channels stay because of their consumer, and the grouped Conv's own are not removed
    assert reasons == {
        "Conv 'grouped': a grouped Conv that is not depthwise",
        "Conv 'grouped': grouped output channels",
    }


def test_attention_heads_are_removed_whole_and_equal_attention_computed_without_them():
    proto = attention_block()
    graph, removed, smaller, report = pruned(proto, lambda g: [classes_of(g, "q")[2]])  # head 1: channels 2, 3
    # one class per head: its 2 channels of Q, of K and of V
    assert len(graph.classes()) == 3 and all(len(c) == 6 for c in graph.classes().values())
    assert classes_of(graph, "q") == classes_of(graph, "k") == classes_of(graph, "v")
    assert all(graph.is_head(root) for root in graph.classes())
    assert report == {"q": (4, 6), "k": (4, 6), "v": (4, 6)}
    after = {t.name: numpy_helper.to_array(t) for t in smaller.graph.initializer}
    assert list(after["shape_q"]) == [0, 0, 2, 2] and list(after["shape_v"]) == [0, 0, 2, 2]
    assert list(after["shape_k"]) == [0, 0, -1, 2] and list(after["merge"]) == [0, 0, 4]
    assert after["wq"].shape == (6, 4) and after["wo"].shape == (4, 6) and after["bo"].shape == (6,)
    onnx.shape_inference.infer_shapes(smaller, strict_mode=True)
    # attention by hand with heads 0 and 2 only
    w = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in proto.graph.initializer}
    x = randn(1, 4, 6, seed=11)
    keep = [0, 1, 4, 5]
    context = []
    for head in (0, 2):
        cols = [2 * head, 2 * head + 1]
        q, k, v = (x[0] @ w[f"w{p}"][:, cols] + w[f"b{p}"][cols] for p in "qkv")
        scores = q @ k.T / np.sqrt(2)
        p = np.exp(scores - scores.max(1, keepdims=True))
        context.append((p / p.sum(1, keepdims=True)) @ v)
    expected = np.concatenate(context, axis=1) @ w["wo"][keep] + w["bo"]
    got = ort_run(smaller, {"x": x})[0]
    np.testing.assert_allclose(got[0], expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got, ort_run(masked(proto, graph, removed), {"x": x})[0], rtol=1e-4, atol=1e-5)


def test_the_heads_and_ffn_structures_keep_their_own_classes_only():
    proto = attention_block(ffn=True)
    channels = STRUCTURES.get("channels")().trace(proto, {})
    heads = STRUCTURES.get("heads")().trace(proto, {})
    ffn = STRUCTURES.get("ffn")().trace(proto, {})
    # 3 heads, the output projection's 6 channels (fc1 reads them) and fc1's 5 neurons; fc2's reach the output
    assert len(channels.classes()) == 3 + 6 + 5
    assert sum(channels.is_head(r) for r in channels.classes()) == 3
    assert set(heads.classes()) == {r for r in channels.classes() if channels.is_head(r)}
    assert set(ffn.classes()) == {r for r in channels.classes() if not channels.is_head(r)}
    assert len(ffn.classes()) == 6 + 5
    assert heads.blocked[classes_of(heads, "fc1")[0]] == "--structure heads: not an attention head"
    assert ffn.blocked[classes_of(ffn, "q")[0]] == "--structure ffn: an attention head"


def test_attention_the_trace_cannot_follow_stays_with_a_reason():
    # the head count computed from the input's width (6 / 2): the split cannot be rewritten, so Q, K and V stay
    proto = attention_block()
    graph = proto.graph
    graph.initializer.remove(next(t for t in graph.initializer if t.name == "shape_q"))
    computed = [
        helper.make_node("Shape", ["x"], ["xs"]),
        helper.make_node("Slice", ["xs", "i0", "i2"], ["lead"]),
        helper.make_node("Slice", ["xs", "i2", "i3"], ["width"]),
        helper.make_node("Div", ["width", "two"], ["count"]),
        helper.make_node("Concat", ["lead", "count", "two"], ["shape_q"], axis=0),
    ]
    for k, node in enumerate(computed):
        graph.node.insert(k, node)
    for name, value in {"i0": [0], "i2": [2], "i3": [3], "two": [2]}.items():
        graph.initializer.append(numpy_helper.from_array(np.array(value, dtype=np.int64), name))
    traced = trace_channels(proto, {"x": randn(1, 4, 6, seed=1)})
    assert traced.classes() == {}
    assert "Reshape 'q_split': a split into heads whose head count or size is not a constant" in set(
        traced.blocked.values()
    )
