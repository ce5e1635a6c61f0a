"""Where onnx2torch's own converter is wrong for us or for the file, and it cannot be replaced in
its registry (which refuses duplicates): our own registry of overrides, consulted first.

An override returns a result, or None to let onnx2torch's converter handle the node.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable, Optional

import torch
from torch import nn
from torch.func import functional_call
from torch.nn.modules.conv import _ConvNd

from ...registry import Registry
from .added import Pad18
from .layout import Pool, SamePadding, Slice

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from onnx2torch.node_converters import get_converter
    from onnx2torch.node_converters.gemm import OnnxGemm
    from onnx2torch.onnx_graph import OnnxGraph
    from onnx2torch.onnx_node import OnnxNode
    from onnx2torch.utils.common import OnnxMapping, OperationConverterResult, onnx_mapping_from_node

Override = Callable[[OnnxNode, OnnxGraph, int], Optional[OperationConverterResult]]
OVERRIDES: Registry[Override] = Registry("converter override")


def _result(module: nn.Module, node: OnnxNode) -> OperationConverterResult:
    return OperationConverterResult(torch_module=module, onnx_mapping=onnx_mapping_from_node(node))


# --------------------------------------------------------------------------- weights as inputs
# onnx2torch absorbs Conv/ConvTranspose/Gemm weights into modules (Gemm with transB=0 transposed
# and scaled by alpha). We keep them graph tensors in ONNX layout, passed as inputs, so a shared
# weight is one tensor, gradients reach it, and write-back needs no inverse transform.


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


@OVERRIDES.register("Conv")
@OVERRIDES.register("ConvTranspose")
def _conv(node: OnnxNode, graph: OnnxGraph, opset: int) -> OperationConverterResult:
    auto_pad = node.attributes.get("auto_pad", "NOTSET")
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        if node.operation_type != "Conv":
            raise NotImplementedError(f"ConvTranspose with auto_pad={auto_pad}")
        result = _conv(_without_padding(node), graph, opset)
        if result is None:  # _conv always converts; None is only the registry's signature
            raise NotImplementedError("Conv without padding")
        module = SamePadding(
            result.torch_module,
            node.attributes.get("strides"),
            node.attributes.get("dilations"),
            upper=auto_pad == "SAME_UPPER",
        )
        return OperationConverterResult(torch_module=module, onnx_mapping=result.onnx_mapping)
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


def _without_padding(node: OnnxNode) -> OnnxNode:
    """The same node with auto_pad NOTSET and no pads (padding is then applied outside)."""
    proto = type(node.proto)()
    proto.CopyFrom(node.proto)
    kept = [a for a in proto.attribute if a.name not in ("auto_pad", "pads")]
    del proto.attribute[:]
    proto.attribute.extend(kept)
    return OnnxNode(proto, unique_name=node.unique_name)


@OVERRIDES.register("Gemm")
def _gemm(node: OnnxNode, graph: OnnxGraph, opset: int) -> OperationConverterResult:
    attributes = node.attributes
    module = OnnxGemm(
        alpha=attributes.get("alpha", 1.0),
        beta=attributes.get("beta", 1.0),
        trans_a=attributes.get("transA", 0) != 0,
        trans_b=attributes.get("transB", 0) != 0,
    )
    return _result(module, node)


# --------------------------------------------------------------------------- semantics gaps


class ReshapeAllowZero(nn.Module):
    """Reshape with allowzero=1: a 0 in the shape is a real zero-sized axis, not 'copy'."""

    def forward(self, x: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
        return torch.reshape(x, [int(d) for d in shape.reshape(-1).tolist()])


@OVERRIDES.register("Reshape")
def _reshape(node: OnnxNode, graph: OnnxGraph, opset: int) -> Optional[OperationConverterResult]:
    if node.attributes.get("allowzero", 0) != 1:
        return None
    return _result(ReshapeAllowZero(), node)


class ClipTensors(nn.Module):
    """Clip-11+, bounds as (optional) inputs: onnx2torch needs them constant and mistakes an
    absent optional input ('') for a computed one."""

    def forward(self, x: torch.Tensor, lo: torch.Tensor | None = None, hi: torch.Tensor | None = None) -> torch.Tensor:
        if lo is None and hi is None:
            return x
        return torch.clamp(x, min=lo, max=hi)


@OVERRIDES.register("Clip")
def _clip(node: OnnxNode, graph: OnnxGraph, opset: int) -> Optional[OperationConverterResult]:
    return None if opset < 11 else _result(ClipTensors(), node)


class Flatten(nn.Module):
    """ONNX Flatten: always 2-D, (prod(d[:axis]), prod(d[axis:])), for any rank including 1."""

    def __init__(self, axis: int):
        super().__init__()
        self.axis = axis

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        axis = self.axis + x.dim() if self.axis < 0 else self.axis
        outer = math.prod(x.shape[:axis])
        inner = math.prod(x.shape[axis:])
        return x.reshape(outer, inner)


@OVERRIDES.register("Flatten")
def _flatten(node: OnnxNode, graph: OnnxGraph, opset: int) -> OperationConverterResult:
    return _result(Flatten(node.attributes.get("axis", 1)), node)


# --------------------------------------------------------------------------- pooling, pad, slice


@OVERRIDES.register("AveragePool")
@OVERRIDES.register("MaxPool")
def _pool(node: OnnxNode, graph: OnnxGraph, opset: int) -> OperationConverterResult:
    attributes = node.attributes
    if node.operation_type == "MaxPool" and len([o for o in node.output_values if o]) > 1:
        raise NotImplementedError("MaxPool with an Indices output")
    module = Pool(
        kind="max" if node.operation_type == "MaxPool" else "avg",
        kernel=attributes["kernel_shape"],
        strides=attributes.get("strides"),
        pads=attributes.get("pads"),
        auto_pad=attributes.get("auto_pad", "NOTSET"),
        dilations=attributes.get("dilations"),
        ceil_mode=attributes.get("ceil_mode", 0) != 0,
        count_include_pad=attributes.get("count_include_pad", 0) != 0,
    )
    return _result(module, node)


@OVERRIDES.register("Pad")
def _pad(node: OnnxNode, graph: OnnxGraph, opset: int) -> Optional[OperationConverterResult]:
    # onnx2torch's Pad-11/13 uses torch's reflect/replicate, which handle only some ranks
    if opset < 11:
        return None
    return _result(Pad18(node.attributes.get("mode", "constant")), node)


@OVERRIDES.register("Slice")
def _slice(node: OnnxNode, graph: OnnxGraph, opset: int) -> Optional[OperationConverterResult]:
    # onnx2torch's Slice indexes with a list of slices, which torch deprecates (and will reinterpret)
    return None if opset < 10 else _result(Slice(), node)
