"""A working copy of the model whose names cannot reach generated code.

onnx2torch and torch.fx turn ONNX names into Python source (module attributes, variable names);
a crafted name can execute code. The working copy renames every node, value and graph to a plain
identifier (`n12`, `v34`, `g0`) by one injective map, which keeps the graph's meaning. The copy is
only ever converted, never written: the output is the original model, so the original names
survive untouched.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from onnx import GraphProto, ModelProto, NodeProto


@dataclass
class Renaming:
    """Safe name → original name, for values (tensors) and for nodes."""

    values: dict[str, str] = field(default_factory=dict)
    nodes: dict[str, str] = field(default_factory=dict)
    _value_ids: dict[str, str] = field(default_factory=dict, repr=False)

    def safe_value(self, original: str) -> str:
        """The safe name for `original` (the empty name, ONNX's 'absent', stays empty)."""
        if original == "":
            return ""
        safe = self._value_ids.get(original)
        if safe is None:
            safe = f"v{len(self._value_ids)}"
            self._value_ids[original] = safe
            self.values[safe] = original
        return safe

    def safe_node(self, original: str) -> str:
        safe = f"n{len(self.nodes)}"
        self.nodes[safe] = original
        return safe

    def original_value(self, safe: str) -> str:
        return self.values.get(safe, safe)

    def original_node(self, safe: str) -> str:
        return self.nodes.get(safe, safe)

    def restore_text(self, text: str) -> str:
        """`text` (an error message, say) with safe names replaced by the original ones."""

        def original(match: re.Match) -> str:
            token = match.group(0)
            return self.values.get(token) or self.nodes.get(token) or token

        return _SAFE_TOKEN.sub(original, text)


_SAFE_TOKEN = re.compile(r"\b[vn]\d+\b")


def sanitized_copy(model: ModelProto) -> tuple[ModelProto, Renaming]:
    """A copy of `model` with every name replaced by a safe identifier, and the map back."""
    work = ModelProto()
    work.CopyFrom(model)
    renaming = Renaming()
    graph_counter = [0]

    def rename_node(node: NodeProto) -> None:
        node.name = renaming.safe_node(node.name)
        node.input[:] = [renaming.safe_value(name) for name in node.input]
        node.output[:] = [renaming.safe_value(name) for name in node.output]
        for attr in node.attribute:
            if attr.HasField("g"):
                rename_graph(attr.g)
            for sub in attr.graphs:
                rename_graph(sub)

    def rename_graph(graph: GraphProto) -> None:
        graph.name = f"g{graph_counter[0]}"
        graph_counter[0] += 1
        for info in [*graph.input, *graph.output, *graph.value_info]:
            info.name = renaming.safe_value(info.name)
        for tensor in graph.initializer:
            tensor.name = renaming.safe_value(tensor.name)
        for sparse in graph.sparse_initializer:
            sparse.values.name = renaming.safe_value(sparse.values.name)
            sparse.indices.name = renaming.safe_value(sparse.indices.name)
        for node in graph.node:
            rename_node(node)

    rename_graph(work.graph)
    for function in work.functions:
        function.input[:] = [renaming.safe_value(name) for name in function.input]
        function.output[:] = [renaming.safe_value(name) for name in function.output]
        for node in function.node:
            rename_node(node)
    return work, renaming
