"""ONNX → torch.fx with onnx2torch's converters, keeping every weight tied to its ONNX tensor.

We drive onnx2torch's converter registry with our own graph-building loop because its `convert()`
loses what we need: it copies an initializer once per use (so a shared weight is not one tensor),
absorbs Conv/Gemm weights into modules in a transformed layout (Gemm with `transB=0` is stored
transposed and scaled by alpha), and puts ONNX names into generated Python code.

Here every ONNX initializer becomes exactly one tensor of a `tensors` submodule, in its ONNX
layout (float ones as Parameters, others as buffers), passed as an input to every node that uses
it. Modules that would absorb a weight (Conv, ConvTranspose, Gemm) get it as an input instead, so
the layout transform happens in the forward pass, gradients reach the shared ONNX-layout tensor,
and writing it back needs no inverse transform at all.
"""

from __future__ import annotations

import inspect
import warnings
from collections import Counter
from dataclasses import dataclass
from operator import getitem
from typing import Any, Callable

import torch
from onnx import ModelProto, numpy_helper, shape_inference
from torch import fx, nn
from torch.func import functional_call
from torch.nn.modules.conv import _ConvNd

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from onnx2torch.node_converters import get_converter
    from onnx2torch.node_converters.gemm import OnnxGemm
    from onnx2torch.onnx_graph import OnnxGraph, ValueType
    from onnx2torch.onnx_node import OnnxNode
    from onnx2torch.utils.common import OnnxMapping, OperationConverterResult

from ..errors import InvalidModelError, UnsupportedOperatorError
from ..onnx_io import EXTERNAL_DATA_THRESHOLD, tensor_bytes
from .sanitize import Renaming, sanitized_copy

ONNX_DOMAIN = ""


@dataclass
class TorchModel:
    """The converted model and how it maps onto the ONNX graph (all names are original ones)."""

    module: fx.GraphModule
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    tensors: dict[str, torch.Tensor]

    def __call__(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.module(*inputs)


class WeightsAsInputs(nn.Module):
    """Runs a module whose weights onnx2torch absorbed, taking those weights as inputs instead.

    `slots` are the module's own tensor paths (e.g. 'weight', '1.bias'), in the order the ONNX
    node lists them after the data input.
    """

    def __init__(self, inner: nn.Module, slots: tuple[str, ...]):
        super().__init__()
        self.inner = inner
        self.slots = slots
        for path in slots:
            owner, _, attr = path.rpartition(".")
            setattr(inner.get_submodule(owner) if owner else inner, attr, None)

    def forward(self, x: torch.Tensor, *tensors: torch.Tensor) -> torch.Tensor:
        return functional_call(self.inner, dict(zip(self.slots, tensors)), (x,))


def _conv_as_inputs(node: OnnxNode, graph: OnnxGraph, opset: int) -> OperationConverterResult:
    result = get_converter(node.operation_type, opset, node.domain)(node, graph)
    conv_paths = [name for name, module in result.torch_module.named_modules() if isinstance(module, _ConvNd)]
    if len(conv_paths) != 1:
        raise NotImplementedError(f"unexpected module layout for {node.operation_type}")
    prefix = conv_paths[0] + "." if conv_paths[0] else ""
    present = [value for value in node.input_values[1:] if value]
    slots = (prefix + "weight", prefix + "bias")[: len(present)]
    return OperationConverterResult(
        torch_module=WeightsAsInputs(result.torch_module, slots),
        onnx_mapping=OnnxMapping(inputs=(node.input_values[0], *present), outputs=node.output_values),
    )


def _gemm_as_inputs(node: OnnxNode, graph: OnnxGraph, opset: int) -> OperationConverterResult:
    attributes = node.attributes
    module = OnnxGemm(
        alpha=attributes.get("alpha", 1.0),
        beta=attributes.get("beta", 1.0),
        trans_a=attributes.get("transA", 0) != 0,
        trans_b=attributes.get("transB", 0) != 0,
    )
    return OperationConverterResult(
        torch_module=module, onnx_mapping=OnnxMapping(inputs=node.input_values, outputs=node.output_values)
    )


# Ops whose onnx2torch converter would absorb (copy, transpose, scale) a prunable weight.
WEIGHT_INPUT_CONVERTERS: dict[str, Callable[[OnnxNode, OnnxGraph, int], OperationConverterResult]] = {
    "Conv": _conv_as_inputs,
    "ConvTranspose": _conv_as_inputs,
    "Gemm": _gemm_as_inputs,
}


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
    work = _infer_shapes(work)

    opsets = {_domain(entry.domain): entry.version for entry in work.opset_import}
    graph = OnnxGraph(work.graph)
    _check_supported(graph, opsets, renaming)
    return _build(graph, opsets, renaming)


def _infer_shapes(work: ModelProto) -> ModelProto:
    # Shapes help a few converters; a model too big to serialise or one inference rejects
    # is converted without them rather than refused.
    if tensor_bytes(work) >= EXTERNAL_DATA_THRESHOLD:
        return work
    try:
        return shape_inference.infer_shapes(work)
    except Exception:
        return work


def _check_supported(graph: OnnxGraph, opsets: dict[str, int], renaming: Renaming) -> None:
    missing: Counter[tuple[str, str, int]] = Counter()
    for node in graph.nodes.values():
        if node.domain not in opsets:
            raise InvalidModelError(
                f"node {renaming.original_node(node.name)!r} uses domain {node.domain!r}, "
                "which the model does not import"
            )
        if node.operation_type in WEIGHT_INPUT_CONVERTERS and node.domain == ONNX_DOMAIN:
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


def _build(graph: OnnxGraph, opsets: dict[str, int], renaming: Renaming) -> TorchModel:
    fx_graph = fx.Graph()
    root = nn.Module()
    store = nn.Module()
    root.add_module("tensors", store)
    values: dict[str, fx.Node] = {}
    # Outputs of multi-output nodes, fetched with getitem only when used: some converters
    # return a single tensor for a node that declares an unused second output.
    pending: dict[str, tuple[fx.Node, int]] = {}
    tensor_slots: dict[str, str] = {}  # original initializer name -> attribute in `store`

    for index, name in enumerate(graph.input_values):
        values[name] = fx_graph.placeholder(f"x{index}")

    def value(name: str) -> fx.Node:
        if name in values:
            return values[name]
        if name in pending:
            values[name] = fx_graph.call_function(getitem, args=pending.pop(name))
            return values[name]
        kind = graph.value_type(name)
        if kind == ValueType.GRAPH_INITIALIZER:
            array = numpy_helper.to_array(graph.initializers[name].proto).copy()
            tensor = torch.from_numpy(array)
            attr = f"t{len(tensor_slots)}"
            if tensor.is_floating_point():
                store.register_parameter(attr, nn.Parameter(tensor, requires_grad=False))
            else:
                store.register_buffer(attr, tensor)
            tensor_slots[renaming.original_value(name)] = attr
            values[name] = fx_graph.get_attr(f"tensors.{attr}")
            return values[name]
        raise InvalidModelError(f"value {renaming.original_value(name)!r} is used but never defined")

    for index, node in enumerate(graph.nodes.values()):
        module, mapping = _convert_node(node, graph, opsets, renaming)
        module_name = f"m{index}"
        root.add_module(module_name, module)
        inputs = [value(name) if name else None for name in mapping.inputs]
        args, kwargs = _split_arguments(module, inputs)
        call = fx_graph.call_module(module_name, args=args, kwargs=kwargs)
        outputs = node.output_values
        if len(outputs) == 1:
            values[outputs[0]] = call
        else:
            pending.update({output: (call, position) for position, output in enumerate(outputs) if output})

    fx_graph.output(tuple(value(name) for name in graph.output_values))
    fx_graph.lint()
    # ONNX graphs have inference semantics (BatchNorm uses running statistics, Dropout is off).
    module = fx.GraphModule(root, fx_graph).eval()
    converted_store = module.get_submodule("tensors")
    tensors = {name: getattr(converted_store, attr) for name, attr in tensor_slots.items()}
    return TorchModel(
        module=module,
        input_names=tuple(renaming.original_value(name) for name in graph.input_values),
        output_names=tuple(renaming.original_value(name) for name in graph.output_values),
        tensors=tensors,
    )


def _convert_node(
    node: OnnxNode, graph: OnnxGraph, opsets: dict[str, int], renaming: Renaming
) -> OperationConverterResult:
    where = (
        f"{node.operation_type} node {renaming.original_node(node.name)!r} "
        f"({node.domain or 'ai.onnx'}, opset {opsets[node.domain]})"
    )
    override = WEIGHT_INPUT_CONVERTERS.get(node.operation_type) if node.domain == ONNX_DOMAIN else None
    try:
        if override is not None:
            return override(node, graph, opsets[node.domain])
        return get_converter(node.operation_type, opsets[node.domain], node.domain)(node, graph)
    except Exception as exc:  # converters raise NotImplementedError, KeyError, ... on what they cannot do
        detail = renaming.restore_text(str(exc) or type(exc).__name__)
        entry = {
            "op_type": node.operation_type,
            "domain": node.domain or "ai.onnx",
            "opset": opsets[node.domain],
            "count": 1,
            "reason": f"{type(exc).__name__}: {detail}",
        }
        raise UnsupportedOperatorError(
            f"cannot convert {where}: {type(exc).__name__}: {detail}", missing=[entry]
        ) from None


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
