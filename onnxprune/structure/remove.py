"""Structured removal on a traced ChannelGraph: the classes' scores and sizes from per-entry
values, the keep-masks that make the torch model compute what the smaller graph computes, and
the physical removal in the ONNX graph (initializers sliced, depthwise `group` and Reshape shape
constants updated; nodes, names, opsets and IR version untouched)."""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import numpy as np
from onnx import ModelProto, TensorProto, helper, numpy_helper

from .graph import ChannelGraph, main_graph_constants


def class_totals(graph: ChannelGraph, values: Mapping[str, np.ndarray]) -> dict[int, float]:
    """Per removable class, the sum of `values` (arrays in the initializers' ONNX layout) over
    every entry the class's removal deletes; an entry in two classes (a row of one, a column of
    another) counts for both."""
    classes = graph.classes()
    totals = dict.fromkeys(classes, 0.0)
    for edit in graph.edits:
        if edit.initializer not in values:
            continue
        array = np.asarray(values[edit.initializer], dtype=np.float64)
        other = tuple(a for a in range(array.ndim) if a != edit.axis)
        per_position = array.sum(axis=other) if other else array
        for position, element in enumerate(edit.labels):
            root = graph.find(element)
            if root in totals:
                totals[root] += float(per_position[position])
    return totals


def keep_masks(
    graph: ChannelGraph, shapes: Mapping[str, tuple[int, ...]], removed: Iterable[int]
) -> dict[str, np.ndarray]:
    """Boolean keep-masks (ONNX layout) of the initializers in `shapes` an edit slices, False on
    every entry of a removed class."""
    removed = {graph.find(r) for r in removed}
    masks: dict[str, np.ndarray] = {}
    for edit in graph.edits:
        if edit.initializer not in shapes:
            continue
        shape = shapes[edit.initializer]
        mask = masks.setdefault(edit.initializer, np.ones(shape, dtype=bool))
        gone = np.asarray([graph.find(e) in removed for e in edit.labels])
        along = [-1 if a == edit.axis else 1 for a in range(len(shape))]
        mask &= ~gone.reshape(along)
    return masks


def remove_channels(proto: ModelProto, graph: ChannelGraph, removed: Iterable[int]) -> dict[str, tuple[int, int]]:
    """Slice `proto` in place so that the removed classes are gone; returns, per weighted node
    with removed channels, (channels kept, channels before)."""
    removed = {graph.find(r) for r in removed}
    if not removed:
        return {}
    kept: dict[str, dict[int, list[int]]] = {e.initializer: {} for e in graph.edits}
    for edit in graph.edits:
        kept[edit.initializer][edit.axis] = [k for k, e in enumerate(edit.labels) if graph.find(e) not in removed]
    constants = main_graph_constants(proto)
    for name, axes in kept.items():
        array = numpy_helper.to_array(constants[name])
        for axis, positions in axes.items():
            array = np.take(array, positions, axis=axis)
        _replace(constants[name], array)
    nodes = proto.graph.node
    for index, labels in graph.groups.items():
        count = sum(graph.find(e) not in removed for e in labels)
        attrs = nodes[index].attribute
        for i, a in enumerate(attrs):
            if a.name == "group":
                attrs[i].CopyFrom(helper.make_attribute("group", count))
    for shape_edit in graph.shape_edits:
        value = numpy_helper.to_array(constants[shape_edit.initializer]).copy()
        if value[shape_edit.index] > 0:
            value[shape_edit.index] = sum(graph.find(e) not in removed for e in shape_edit.labels)
            _replace(constants[shape_edit.initializer], value)
    # shapes recorded for the followed values are stale; the rest of the annotations stay
    stale = [v for v in proto.graph.value_info if v.name in graph.tensors]
    for value in stale:
        proto.graph.value_info.remove(value)
    return {
        space.node: (
            sum(graph.find(e) not in removed for e in range(space.start, space.start + space.size)),
            space.size,
        )
        for space in graph.spaces
        if any(graph.find(e) in removed for e in range(space.start, space.start + space.size))
    }


def kept_biases(
    graph: ChannelGraph, removed: Iterable[int], added: Sequence[tuple[str, str, np.ndarray]]
) -> list[tuple[str, str, np.ndarray]]:
    """New biases (node output, weight, values over the node's full outputs) cut to the outputs
    that stay: a node whose weight starts a traced space, or a depthwise Conv carrying removed
    channels, loses the removed classes' entries."""
    removed = {graph.find(r) for r in removed}
    outputs: dict[str, Sequence[int]] = {s.weight: range(s.start, s.start + s.size) for s in graph.spaces}
    # a depthwise Conv's outputs are its input's channels: they go with them
    outputs.update({e.initializer: e.labels for e in graph.edits if e.node in graph.groups and e.axis == 0})
    out = []
    for output, weight, values in added:
        labels = outputs.get(weight)
        if labels is not None and len(values) == len(labels):
            values = values[[k for k, e in enumerate(labels) if graph.find(e) not in removed]]
        out.append((output, weight, values))
    return out


def _replace(tensor: TensorProto, array: np.ndarray) -> None:
    """Give `tensor` a new value and shape in place (name, type and other fields kept)."""
    replacement = numpy_helper.from_array(np.ascontiguousarray(array).astype(array.dtype), tensor.name)
    for typed_field in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data", "raw_data"):
        tensor.ClearField(typed_field)
    del tensor.dims[:]
    tensor.dims.extend(replacement.dims)
    tensor.raw_data = replacement.raw_data


def describe(graph: ChannelGraph, layers: Mapping[str, tuple[int, int]]) -> dict:
    """The report's account of a structured run: each layer's channels kept, and the channels
    left in place with the reason (everything the trace could not follow)."""
    reasons: dict[str, int] = {}
    for space in graph.spaces:
        for element in range(space.start, space.start + space.size):
            why = graph.blocked.get(graph.find(element))
            if why is not None:
                reasons[why] = reasons.get(why, 0) + 1
    return {
        "layers_traced": len(graph.spaces),
        "classes": len(graph.classes()),
        "layers": [{"node": node, "kept": kept, "before": before} for node, (kept, before) in layers.items()],
        "left_in_place": [{"reason": why, "channels": n} for why, n in sorted(reasons.items(), key=lambda r: -r[1])],
    }


def channel_lines(channels: dict, max_rows: int = 12) -> list[str]:
    """The human table's account of removed channels and of what stayed."""
    layers = channels["layers"]
    lines = [f"channels removed in {len(layers)} of {channels['layers_traced']} layers:"]
    for row in layers[:max_rows]:
        lines.append(f"  {row['node']}: {row['kept']} of {row['before']} kept")
    if len(layers) > max_rows:
        lines.append(f"  ... {len(layers) - max_rows} more (see the JSON report)")
    for row in channels["left_in_place"][:max_rows]:
        lines.append(f"  left in place: {row['channels']} channels ({row['reason']})")
    return lines
