"""ONNX → torch.fx with onnx2torch's converters, keeping every weight tied to its ONNX tensor.

We drive onnx2torch's converter registry with our own graph-building loop because its `convert()`
loses what we need: it copies an initializer once per use (so a shared weight is not one tensor),
absorbs Conv/Gemm weights into modules in a transformed layout, returns a multi-output node's
tuple as a graph output, and puts ONNX names into generated Python code.

Here a sanitized, preprocessed working copy is converted. Every initializer becomes exactly one
tensor of a `tensors` submodule, in its ONNX layout (float ones as Parameters, others as buffers),
passed as an input to every node that uses it. The prunable weights are discovered on that same
working graph and reported under their original names.
"""

from __future__ import annotations

import inspect
import warnings
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from onnx import ModelProto
from torch import fx, nn

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from onnx2torch.node_converters import get_converter
    from onnx2torch.onnx_graph import OnnxGraph, ValueType
    from onnx2torch.onnx_node import OnnxNode
    from onnx2torch.utils.common import OperationConverterResult

from ..errors import InvalidModelError, UnsupportedOperatorError
from ..onnx_io import tensor_values
from .bindings import PrunableTensor, find_prunable
from .converters import OVERRIDES
from .preprocess import Prepared, infer_shapes, preprocess
from .sanitize import Renaming, sanitized_copy

ONNX_DOMAIN = ""


@dataclass
class TorchModel:
    """The converted model and how it maps onto the ONNX graph (all names are original ones)."""

    module: fx.GraphModule
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    tensors: dict[str, torch.Tensor]  # every initializer (and former Constant) by ONNX name
    prunable: list[PrunableTensor]  # weights feeding Conv/ConvTranspose/Gemm/MatMul/RNNs
    nodes: dict[str, tuple[str, str]] = field(default_factory=dict)  # module name -> (op type, ONNX node)
    node_inputs: dict[str, tuple[str, ...]] = field(default_factory=dict)  # module name -> ONNX input names
    node_outputs: dict[str, tuple[str, ...]] = field(default_factory=dict)  # module name -> ONNX output names
    inlined_ifs: int = 0

    def __call__(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.module(*inputs)

    def inputs(self, feeds: dict[str, Any], device: torch.device | str = "cpu") -> list[torch.Tensor]:
        """The model's positional inputs from a feeds dict of arrays, on `device`."""
        return [torch.from_numpy(np.asarray(feeds[name], order="C")).to(device) for name in self.input_names]

    def locate_failure(self, *inputs: torch.Tensor) -> UnsupportedOperatorError | None:
        """Re-run node by node; the first node that raises, as an exit-4 error naming it."""
        nodes, failed = self.nodes, []

        class Tracing(fx.Interpreter):
            def run_node(self, n: fx.Node):
                try:
                    return super().run_node(n)
                except Exception as exc:
                    failed.append((n, exc))
                    raise

        try:
            with torch.no_grad():
                Tracing(self.module).run(*inputs)
        except Exception:
            if not failed:
                raise
        if not failed:
            return None
        n, exc = failed[0]
        op_type, name = nodes.get(str(n.target), ("?", str(n.target)))
        message = str(exc).split("\n\nWhile executing")[0].strip().splitlines()
        reason = f"{type(exc).__name__}: {message[0] if message else ''}"
        return UnsupportedOperatorError(
            f"the converted model fails at {op_type} node {name!r}: {reason}",
            missing=[{"op_type": op_type, "node": name, "reason": reason}],
        )


def _domain(domain: str) -> str:
    return ONNX_DOMAIN if domain == "ai.onnx" else domain


def convert(model: ModelProto) -> TorchModel:
    """Convert a checked ModelProto to a TorchModel; unsupported operators raise exit-4 errors."""
    work, renaming = sanitized_copy(model)
    for node in work.graph.node:
        node.domain = _domain(node.domain)
    initializer_names = {tensor.name for tensor in work.graph.initializer}
    # Old exporters list initializers as graph inputs too; they are constants, not feeds.
    kept_inputs = [info for info in work.graph.input if info.name not in initializer_names]
    del work.graph.input[:]
    work.graph.input.extend(kept_inputs)
    prepared = preprocess(work)
    work = infer_shapes(prepared.model)

    opsets = {_domain(entry.domain): entry.version for entry in work.opset_import}
    graph = OnnxGraph(work.graph)
    _check_supported(graph, opsets, renaming)
    torch_model = _build(graph, opsets, renaming)
    torch_model.prunable = _original_names(find_prunable(work), prepared, renaming)
    torch_model.inlined_ifs = prepared.inlined_ifs
    return torch_model


def _original_names(found: list[PrunableTensor], prepared: Prepared, renaming: Renaming) -> list[PrunableTensor]:
    return [
        replace(
            tensor,
            name=renaming.original_value(tensor.name),
            source="constant" if tensor.name in prepared.from_constants else "initializer",
            consumers=tuple(replace(c, node=renaming.original_node(c.node)) for c in tensor.consumers),
        )
        for tensor in found
    ]


def _check_supported(graph: OnnxGraph, opsets: dict[str, int], renaming: Renaming) -> None:
    missing: Counter[tuple[str, str, int]] = Counter()
    for node in graph.nodes.values():
        if node.domain not in opsets:
            raise InvalidModelError(
                f"node {renaming.original_node(node.name)!r} uses domain {node.domain!r}, "
                "which the model does not import"
            )
        if node.domain == ONNX_DOMAIN and node.operation_type in OVERRIDES:
            continue
        try:
            get_converter(node.operation_type, opsets[node.domain], node.domain)
        except NotImplementedError:
            missing[(node.operation_type, node.domain or "ai.onnx", opsets[node.domain])] += 1
    if missing:
        entries = [
            {"op_type": op, "domain": domain, "opset": opset, "count": count}
            for (op, domain, opset), count in sorted(missing.items())
        ]
        listing = "; ".join(f"{e['op_type']} ({e['domain']}, opset {e['opset']}) x{e['count']}" for e in entries)
        raise UnsupportedOperatorError(f"unsupported operators: {listing}", missing=entries)


class _Values:
    """The fx node of each ONNX value while the graph is built: graph inputs, initializers (made
    parameters or buffers of the `store` module on first use), and outputs of multi-output nodes
    (selected only when used, see select_output)."""

    def __init__(self, graph: OnnxGraph, fx_graph: fx.Graph, store: nn.Module, renaming: Renaming):
        self.graph, self.fx_graph, self.store, self.renaming = graph, fx_graph, store, renaming
        self.nodes: dict[str, fx.Node] = {}
        self.pending: dict[str, tuple[fx.Node, int]] = {}
        self.tensor_slots: dict[str, str] = {}  # original initializer name -> attribute in `store`

    def __call__(self, name: str) -> fx.Node:
        if name in self.nodes:
            return self.nodes[name]
        if name in self.pending:
            self.nodes[name] = self.fx_graph.call_function(select_output, args=self.pending.pop(name))
            return self.nodes[name]
        if self.graph.value_type(name) == ValueType.GRAPH_INITIALIZER:
            tensor = torch.from_numpy(tensor_values(self.graph.initializers[name].proto).copy())
            attr = f"t{len(self.tensor_slots)}"
            if tensor.is_floating_point():
                self.store.register_parameter(attr, nn.Parameter(tensor, requires_grad=False))
            else:
                self.store.register_buffer(attr, tensor)
            self.tensor_slots[self.renaming.original_value(name)] = attr
            self.nodes[name] = self.fx_graph.get_attr(f"tensors.{attr}")
            return self.nodes[name]
        raise InvalidModelError(f"value {self.renaming.original_value(name)!r} is used but never defined")


def _build(graph: OnnxGraph, opsets: dict[str, int], renaming: Renaming) -> TorchModel:
    fx_graph = fx.Graph()
    root = nn.Module()
    store = nn.Module()
    root.add_module("tensors", store)
    value = _Values(graph, fx_graph, store, renaming)
    for index, name in enumerate(graph.input_values):
        value.nodes[name] = fx_graph.placeholder(f"x{index}")

    nodes: dict[str, tuple[str, str]] = {}
    node_inputs: dict[str, tuple[str, ...]] = {}
    node_outputs: dict[str, tuple[str, ...]] = {}
    for index, node in enumerate(graph.nodes.values()):
        module, mapping = _convert_node(node, graph, opsets, renaming)
        module_name = f"m{index}"
        root.add_module(module_name, module)
        nodes[module_name] = (node.operation_type, renaming.original_node(node.name))
        node_inputs[module_name] = tuple(renaming.original_value(name) if name else "" for name in node.input_values)
        node_outputs[module_name] = tuple(renaming.original_value(name) for name in node.output_values)
        inputs = [value(name) if name else None for name in mapping.inputs]
        args, kwargs = _split_arguments(module, inputs)
        call = fx_graph.call_module(module_name, args=args, kwargs=kwargs)
        outputs = node.output_values
        if len(outputs) == 1:
            value.nodes[outputs[0]] = call
        else:
            value.pending.update({output: (call, position) for position, output in enumerate(outputs) if output})

    fx_graph.output(tuple(value(name) for name in graph.output_values))
    fx_graph.lint()
    # ONNX graphs have inference semantics (BatchNorm uses running statistics, Dropout is off).
    module = fx.GraphModule(root, fx_graph).eval()
    # GraphModule copies only what the graph references: no `tensors` child without initializers.
    held = module.get_submodule("tensors") if value.tensor_slots else None
    return TorchModel(
        module=module,
        input_names=tuple(renaming.original_value(name) for name in graph.input_values),
        output_names=tuple(renaming.original_value(name) for name in graph.output_values),
        tensors={name: getattr(held, attr) for name, attr in value.tensor_slots.items()},
        prunable=[],
        nodes=nodes,
        node_inputs=node_inputs,
        node_outputs=node_outputs,
    )


def select_output(result: Any, index: int) -> Any:
    """Output `index` of a node's module. Some converters return a single tensor for a node that
    declares extra outputs nobody uses (Dropout's mask, MaxPool's indices); indexing that tensor
    would silently take its first row, so only real tuples are indexed."""
    if isinstance(result, (tuple, list)):
        return result[index]
    if index == 0:
        return result
    raise NotImplementedError(f"the converter returned one output, the graph uses output {index}")


def _convert_node(
    node: OnnxNode, graph: OnnxGraph, opsets: dict[str, int], renaming: Renaming
) -> OperationConverterResult:
    opset = opsets[node.domain]
    where = (
        f"{node.operation_type} node {renaming.original_node(node.name)!r} ({node.domain or 'ai.onnx'}, opset {opset})"
    )
    try:
        if node.domain == ONNX_DOMAIN and node.operation_type in OVERRIDES:
            result = OVERRIDES.get(node.operation_type)(node, graph, opset)
            if result is not None:
                return result
        return get_converter(node.operation_type, opset, node.domain)(node, graph)
    except Exception as exc:  # converters raise NotImplementedError, KeyError, ... on what they cannot do
        reason = f"{type(exc).__name__}: {renaming.restore_text(str(exc) or type(exc).__name__)}"
        entry = {
            "op_type": node.operation_type,
            "domain": node.domain or "ai.onnx",
            "opset": opset,
            "count": 1,
            "reason": reason,
        }
        raise UnsupportedOperatorError(f"cannot convert {where}: {reason}", missing=[entry]) from None


def _split_arguments(module: nn.Module, inputs: list[Any]) -> tuple[tuple, dict]:
    """Positional arguments up to the first absent optional input, keywords after it."""
    while inputs and inputs[-1] is None:
        inputs = inputs[:-1]
    if None not in inputs:
        return tuple(inputs), {}
    first_absent = inputs.index(None)
    names = list(inspect.signature(module.forward).parameters)
    kwargs = {names[i]: v for i, v in enumerate(inputs) if i >= first_absent and v is not None}
    return tuple(inputs[:first_absent]), kwargs
