"""Operators and operator versions onnx2torch lacks, registered through its own registry.

Each module computes exactly what the ONNX operator specification says for inference; the tests
compare every one with onnxruntime on random inputs of several shapes.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable

import torch
from torch import nn

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from onnx2torch.node_converters.registry import add_converter
    from onnx2torch.onnx_graph import OnnxGraph
    from onnx2torch.onnx_node import OnnxNode
    from onnx2torch.utils.common import OperationConverterResult, onnx_mapping_from_node


def _result(module: nn.Module, node: OnnxNode) -> OperationConverterResult:
    return OperationConverterResult(torch_module=module, onnx_mapping=onnx_mapping_from_node(node))


def _axes(value: torch.Tensor | None, rank: int) -> list[int]:
    """ONNX axes (possibly negative, possibly absent) as sorted non-negative dims."""
    if value is None:
        return []
    return sorted({int(a) % rank if rank else 0 for a in value.reshape(-1).tolist()})


# --------------------------------------------------------------------------- GlobalMaxPool


class GlobalMaxPool(nn.Module):
    """Max over all spatial axes (2..), keeping them as size-1 axes."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.amax(dim=tuple(range(2, x.dim())), keepdim=True) if x.dim() > 2 else x


@add_converter(operation_type="GlobalMaxPool", version=1)
def _global_max_pool(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    return _result(GlobalMaxPool(), node)


# --------------------------------------------------------------------------- Reduce*-18


def _reduce_prod(x: torch.Tensor, dims: list[int], keepdim: bool) -> torch.Tensor:
    for d in sorted(dims, reverse=True):
        x = torch.prod(x, dim=d, keepdim=keepdim)
    return x


REDUCTIONS: dict[str, Callable[[torch.Tensor, list[int], bool], torch.Tensor]] = {
    "ReduceMean": lambda x, d, k: x.mean(dim=d, keepdim=k),
    "ReduceMax": lambda x, d, k: x.amax(dim=d, keepdim=k),
    "ReduceMin": lambda x, d, k: x.amin(dim=d, keepdim=k),
    "ReduceProd": _reduce_prod,
    "ReduceL1": lambda x, d, k: x.abs().sum(dim=d, keepdim=k),
    "ReduceL2": lambda x, d, k: (x * x).sum(dim=d, keepdim=k).sqrt(),
    "ReduceLogSum": lambda x, d, k: x.sum(dim=d, keepdim=k).log(),
    "ReduceLogSumExp": lambda x, d, k: torch.logsumexp(x, dim=d, keepdim=k),
    "ReduceSumSquare": lambda x, d, k: (x * x).sum(dim=d, keepdim=k),
}


class Reduce18(nn.Module):
    """Reduce*-18: axes come as an optional input; empty axes reduce all unless noop is set."""

    def __init__(self, op: str, keepdims: bool, noop_with_empty_axes: bool):
        super().__init__()
        self.op, self.keepdims, self.noop = op, keepdims, noop_with_empty_axes

    def forward(self, x: torch.Tensor, axes: torch.Tensor | None = None) -> torch.Tensor:
        dims = _axes(axes, x.dim())
        if not dims:
            if self.noop:
                return x
            dims = list(range(x.dim()))
        if not dims:  # a scalar: nothing to reduce over
            return REDUCTIONS[self.op](x.reshape(1), [0], False).reshape(())
        return REDUCTIONS[self.op](x, dims, self.keepdims)


def _reduce18(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    attributes = node.attributes
    module = Reduce18(
        node.operation_type,
        keepdims=attributes.get("keepdims", 1) != 0,
        noop_with_empty_axes=attributes.get("noop_with_empty_axes", 0) != 0,
    )
    return _result(module, node)


for _op in REDUCTIONS:
    add_converter(operation_type=_op, version=18)(_reduce18)


# --------------------------------------------------------------------------- Pad-18


class Pad18(nn.Module):
    """Pad-18/19/21: pads (and optional axes, constant value) as inputs; modes constant, reflect,
    edge, wrap. Negative pads crop. Non-constant modes gather indices axis by axis, so any rank
    works (torch's own reflect/replicate/circular only handle the last 1-3 axes)."""

    def __init__(self, mode: str):
        super().__init__()
        if mode not in ("constant", "reflect", "edge", "wrap"):
            raise NotImplementedError(f"Pad mode {mode!r}")
        self.mode = mode

    def forward(
        self,
        x: torch.Tensor,
        pads: torch.Tensor,
        constant_value: torch.Tensor | None = None,
        axes: torch.Tensor | None = None,
    ) -> torch.Tensor:
        rank = x.dim()
        values = [int(p) for p in pads.reshape(-1).tolist()]
        axis_list = [int(a) % rank for a in axes.reshape(-1).tolist()] if axes is not None else list(range(rank))
        count = len(axis_list)
        begins, ends = values[:count], values[count:]
        if self.mode == "constant":
            flat: list[int] = []
            for axis in range(rank - 1, -1, -1):
                if axis in axis_list:
                    i = axis_list.index(axis)
                    flat += [begins[i], ends[i]]
                else:
                    flat += [0, 0]
            value = (
                0.0 if constant_value is None or constant_value.numel() == 0 else constant_value.reshape(-1)[0].item()
            )
            return nn.functional.pad(x, flat, mode="constant", value=value)
        for axis, begin, end in zip(axis_list, begins, ends):
            size = x.shape[axis]
            if begin < 0 or end < 0:  # crop first
                x = x.narrow(axis, max(0, -begin), size - max(0, -begin) - max(0, -end))
                size = x.shape[axis]
                begin, end = max(0, begin), max(0, end)
            index = torch.arange(-begin, size + end, device=x.device)
            if self.mode == "edge":
                index = index.clamp(0, size - 1)
            elif self.mode == "wrap":
                index = index.remainder(size)
            else:  # reflect, without repeating the edge element
                period = 2 * (size - 1)
                index = index.remainder(period) if period > 0 else index.clamp(0, 0)
                index = torch.where(index >= size, period - index, index)
            x = x.index_select(axis, index)
        return x


@add_converter(operation_type="Pad", version=18)
def _pad18(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    return _result(Pad18(node.attributes.get("mode", "constant")), node)


# --------------------------------------------------------------------------- Split-18


class Split18(nn.Module):
    """Split-18: explicit sizes as input, or `num_outputs` chunks of ceil(n/k) (the last smaller)."""

    def __init__(self, axis: int, num_outputs: int | None, outputs: int):
        super().__init__()
        self.axis, self.num_outputs, self.outputs = axis, num_outputs, outputs

    def forward(self, x: torch.Tensor, split: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, ...]:
        axis = self.axis % x.dim()
        size = x.shape[axis]
        if split is not None and split.numel():
            sizes = [int(s) for s in split.reshape(-1).tolist()]
        else:
            parts = self.num_outputs or self.outputs
            chunk = math.ceil(size / parts)
            sizes = [chunk] * (parts - 1) + [size - chunk * (parts - 1)]
        pieces = tuple(torch.split(x, sizes, dim=axis))
        return pieces[0] if self.outputs == 1 else pieces


@add_converter(operation_type="Split", version=18)
def _split18(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    attributes = node.attributes
    module = Split18(attributes.get("axis", 0), attributes.get("num_outputs"), len(node.output_values))
    return _result(module, node)


# --------------------------------------------------------------------------- Gelu-20, Size


class Gelu(nn.Module):
    def __init__(self, approximate: str):
        super().__init__()
        if approximate not in ("none", "tanh"):
            raise NotImplementedError(f"Gelu approximate={approximate!r}")
        self.approximate = approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.gelu(x, approximate=self.approximate)


@add_converter(operation_type="Gelu", version=20)
def _gelu(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    return _result(Gelu(node.attributes.get("approximate", "none")), node)


class Size(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tensor(x.numel(), dtype=torch.int64, device=x.device)


@add_converter(operation_type="Size", version=1)
def _size(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    return _result(Size(), node)
