"""Edits of the written graph: the statistics corrections' shifts folded into biases, adding a
bias input (Conv, Gemm) or a constant where a node had none, in the original graph's style."""

from __future__ import annotations

from typing import Sequence

import numpy as np
from onnx import GraphProto, ModelProto, NodeProto, TensorProto, helper, numpy_helper


def add_biases(model: ModelProto, added: Sequence[tuple[str, str, np.ndarray]]) -> None:
    """Give each node (found by its output) the new bias input, in the style of its weight: an
    initializer, or a Constant node where the weight is one (PaddlePaddle); IR < 4 graphs list
    initializers as inputs too."""
    for output, weight, values in added:
        graph, node = _find_node(model.graph, output)
        name = _fresh_name(model, f"{weight}_onnxprune_bias")
        tensor = numpy_helper.from_array(values.astype(np.float32), name)
        if any(n.op_type == "Constant" and weight in n.output for n in graph.node):
            constant = helper.make_node(
                "Constant", [], [name], name=_fresh_name(model, name + "_constant"), value=tensor
            )
            position = list(graph.node).index(node)
            graph.node.insert(position, constant)
        else:
            graph.initializer.append(tensor)
            if model.ir_version < 4:
                graph.input.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, list(values.shape)))
        while len(node.input) < 2:
            node.input.append("")
        if len(node.input) == 2:
            node.input.append(name)
        else:
            node.input[2] = name


def _find_node(graph: GraphProto, output: str) -> tuple[GraphProto, NodeProto]:
    for node in graph.node:
        if output in node.output:
            return graph, node
        for attr in node.attribute:
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                try:
                    return _find_node(sub, output)
                except KeyError:
                    pass
    raise KeyError(f"no node produces {output!r}")


def _fresh_name(model: ModelProto, wanted: str) -> str:
    used: set[str] = set()

    def walk(graph: GraphProto) -> None:
        used.update(t.name for t in graph.initializer)
        used.update(i.name for i in graph.input)
        for node in graph.node:
            used.update(node.output)
            used.add(node.name)
            for attr in node.attribute:
                for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                    walk(sub)

    walk(model.graph)
    name, k = wanted, 1
    while name in used:
        name, k = f"{wanted}_{k}", k + 1
    return name
