"""Preprocessing of the (sanitized) working copy before conversion.

Only the working copy changes; the output is written into the original model, so nothing added
here can leak into it. Steps:
- `Constant` nodes become initializers (PaddlePaddle and other exporters keep every weight in a
  Constant node; onnx2torch's converters look weights up among initializers). Which values came
  from Constant nodes is recorded, so write-back can put them back where they were.
- `If` nodes whose condition is a constant are replaced by the taken branch.
- Shapes are inferred, with onnxruntime's symbolic shape inference first (it keeps ranks through
  data-dependent Reshapes where `onnx.shape_inference` loses them) and onnx's as a fallback.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import numpy as np
from onnx import GraphProto, ModelProto, NodeProto, helper, numpy_helper, shape_inference

from ..onnx_io import EXTERNAL_DATA_THRESHOLD, tensor_bytes

log = logging.getLogger("onnxprune")


@dataclass(frozen=True)
class Prepared:
    """The preprocessed working copy and what preprocessing did to it."""

    model: ModelProto
    from_constants: frozenset[str]  # (working) names of initializers that were Constant nodes
    inlined_ifs: int


def preprocess(work: ModelProto) -> Prepared:
    """Constants to initializers and constant-condition Ifs inlined, repeated until stable
    (an inlined branch may bring its own Constants and Ifs)."""
    graph = work.graph
    from_constants: set[str] = set()
    inlined = 0
    while True:
        from_constants |= constants_to_initializers(graph)
        count = inline_constant_ifs(graph)
        inlined += count
        if not count:
            break
    return Prepared(model=work, from_constants=frozenset(from_constants), inlined_ifs=inlined)


def _constant_value(node: NodeProto) -> np.ndarray | None:
    for attr in node.attribute:
        if attr.name == "value":
            return numpy_helper.to_array(attr.t)
        if attr.name == "value_float":
            return np.array(attr.f, dtype=np.float32)
        if attr.name == "value_floats":
            return np.array(list(attr.floats), dtype=np.float32)
        if attr.name == "value_int":
            return np.array(attr.i, dtype=np.int64)
        if attr.name == "value_ints":
            return np.array(list(attr.ints), dtype=np.int64)
    return None  # sparse or string constants stay nodes


def constants_to_initializers(graph: GraphProto) -> set[str]:
    """Turn the graph's Constant nodes into initializers; returns their value names."""
    converted: set[str] = set()
    kept = []
    for node in graph.node:
        value = _constant_value(node) if node.op_type == "Constant" and node.domain in ("", "ai.onnx") else None
        if value is None:
            kept.append(node)
            continue
        tensor = numpy_helper.from_array(np.asarray(value, order="C"), node.output[0])
        graph.initializer.append(tensor)
        converted.add(node.output[0])
    if converted:
        del graph.node[:]
        graph.node.extend(kept)
    return converted


def _condition(graph: GraphProto, name: str) -> bool | None:
    for tensor in graph.initializer:
        if tensor.name == name:
            value = numpy_helper.to_array(tensor)
            return bool(value.reshape(-1)[0]) if value.size == 1 else None
    return None


def inline_constant_ifs(graph: GraphProto) -> int:
    """Replace each If whose condition is a constant by the nodes of the taken branch."""
    nodes: list[NodeProto] = []
    count = 0
    for node in graph.node:
        cond = _condition(graph, node.input[0]) if node.op_type == "If" and node.domain in ("", "ai.onnx") else None
        if cond is None:
            nodes.append(node)
            continue
        branch = next(a.g for a in node.attribute if a.name == ("then_branch" if cond else "else_branch"))
        graph.initializer.extend(branch.initializer)
        graph.value_info.extend(branch.value_info)
        nodes.extend(branch.node)
        for source, target in zip(branch.output, node.output):
            if target:
                nodes.append(helper.make_node("Identity", [source.name], [target], name=f"{node.name}_out_{target}"))
        count += 1
    if count:
        del graph.node[:]
        graph.node.extend(nodes)
    return count


def infer_shapes(work: ModelProto) -> ModelProto:
    """Shapes for the converters that need ranks (pooling, norms); best effort, never fatal."""
    if tensor_bytes(work) >= EXTERNAL_DATA_THRESHOLD:
        return work  # both inferences serialise the model; too big for protobuf
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

            inferred = SymbolicShapeInference.infer_shapes(work, auto_merge=True, guess_output_rank=True)
        if inferred is not None:
            return inferred
    except Exception as exc:  # it raises on ops it does not know; onnx's inference may still work
        log.debug("symbolic shape inference failed (%s); using onnx.shape_inference", exc)
    try:
        return shape_inference.infer_shapes(work)
    except Exception as exc:
        log.debug("onnx shape inference failed (%s); converting without inferred shapes", exc)
        return work
