"""Which ONNX tensors are prunable weights, and writing pruned values back into the original model.

A weight is prunable when it is a float initializer of rank >= 2 that reaches the weight input of
Conv, ConvTranspose, Gemm, MatMul or a recurrent node (W, R), directly or through a chain of
layout-only nodes. A tensor used by several nodes is one entry, pruned once. The bridge runs
discovery on its preprocessed working graph (where Constant-node weights are initializers too)
and reports original names; write-back finds each tensor by name wherever it lives in the
original model: an initializer, or the value of a Constant node, in the main graph or a subgraph.
"""

from __future__ import annotations

import re
import sys
from collections import defaultdict
from dataclasses import dataclass
from typing import Iterable, Iterator, Mapping

import numpy as np
from onnx import GraphProto, ModelProto, NodeProto, TensorProto, helper

from ..onnx_io import is_lazy, tensor_values

# Inputs that carry weights, per operator. Gemm/MatMul: whichever operand is constant.
WEIGHT_INPUTS: dict[str, frozenset[int]] = {
    "Conv": frozenset({1}),
    "ConvTranspose": frozenset({1}),
    "Gemm": frozenset({0, 1}),
    "MatMul": frozenset({0, 1}),
    "LSTM": frozenset({1, 2}),
    "GRU": frozenset({1, 2}),
    "RNN": frozenset({1, 2}),
}
# Nodes that only change a tensor's layout or dtype; a weight may pass through them (input 0).
LAYOUT_ONLY = frozenset({"Transpose", "Identity", "Reshape", "Cast", "Squeeze", "Unsqueeze", "Flatten"})
FLOAT_TYPES = frozenset({TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16})


@dataclass(frozen=True)
class Consumer:
    """A node that uses a weight: its name, op type, which input, the layout nodes between, and
    whether the weight's first two axes are (input, output) rather than (output, input)."""

    node: str
    op_type: str
    input_index: int
    via: tuple[str, ...] = ()
    transposed: bool = False

    def describe(self) -> str:
        chain = "".join(f"{op} -> " for op in self.via)
        return f"{chain}{self.op_type} {self.node!r} input {self.input_index}"


@dataclass(frozen=True)
class PrunableTensor:
    """A weight that may be pruned, named as in the original model."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    consumers: tuple[Consumer, ...]
    source: str = "initializer"  # or "constant": the value of a Constant node

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def swapped(self) -> bool:
        """Whether the canonical order (output units major) is the ONNX layout with its first two
        axes swapped: every consumer stores the weight (input, output, ...) and uses it directly.
        Otherwise (already canonical, consumers disagreeing, a layout chain) it is the ONNX one."""
        if not self.consumers or any(c.via for c in self.consumers) or len(self.shape) < 2:
            return False
        return {c.transposed for c in self.consumers} == {True}

    def canonical_order(self) -> np.ndarray | None:
        """Flat ONNX positions in canonical order, or None when that is the ONNX order (an index
        array as large as the tensor: for checks; the pipeline transposes instead)."""
        if not self.swapped:
            return None
        return np.arange(self.numel).reshape(self.shape).swapaxes(0, 1).reshape(-1)

    def matrix_shape(self) -> tuple[int, int]:
        """(output units, inputs per unit) in canonical order: Conv [out, in·k], Gemm/MatMul
        [out, in], recurrent W/R [directions·gates·hidden, in]."""
        shape = list(self.shape)
        if self.swapped:
            shape[0], shape[1] = shape[1], shape[0]
        if self.consumers and self.consumers[0].op_type in ("LSTM", "GRU", "RNN"):
            rows = int(np.prod(shape[:-1]))
        else:
            rows = shape[0]
        return rows, self.numel // rows

    @property
    def kernel(self) -> int:
        """Kernel positions per input channel: the product of a (transposed) convolution weight's
        spatial axes, 1 for anything else."""
        convolution = self.consumers and self.consumers[0].op_type in ("Conv", "ConvTranspose")
        return int(np.prod(self.shape[2:], dtype=np.int64)) if convolution and len(self.shape) > 2 else 1

    def matches(self, pattern: re.Pattern) -> bool:
        """Whether `pattern` matches the tensor's name or the name of a node that uses it."""
        return bool(pattern.search(self.name)) or any(pattern.search(c.node) for c in self.consumers)


def find_prunable(model: ModelProto) -> list[PrunableTensor]:
    """Prunable initializers of the model's main graph, in initializer order."""
    graph = model.graph
    users: dict[str, list[tuple[NodeProto, int]]] = defaultdict(list)
    for node in graph.node:
        for index, name in enumerate(node.input):
            if name:
                users[name].append((node, index))

    found = []
    for tensor in graph.initializer:
        if tensor.data_type not in FLOAT_TYPES or len(tensor.dims) < 2:
            continue
        consumers = tuple(_weight_consumers(tensor.name, users, via=(), seen=set()))
        if consumers:
            found.append(
                PrunableTensor(
                    name=tensor.name,
                    shape=tuple(int(d) for d in tensor.dims),
                    dtype=helper.tensor_dtype_to_np_dtype(tensor.data_type),
                    consumers=consumers,
                )
            )
    return found


def _weight_consumers(
    value: str, users: Mapping[str, list[tuple[NodeProto, int]]], via: tuple[str, ...], seen: set[str]
) -> Iterable[Consumer]:
    if value in seen:  # a malformed graph may loop; never walk a value twice
        return
    seen.add(value)
    for node, index in users.get(value, ()):
        if node.domain not in ("", "ai.onnx"):
            continue
        if index in WEIGHT_INPUTS.get(node.op_type, ()):
            yield Consumer(
                node=node.name,
                op_type=node.op_type,
                input_index=index,
                via=via,
                transposed=_stores_inputs_first(node, index),
            )
        elif node.op_type in LAYOUT_ONLY and index == 0:
            for output in node.output:
                yield from _weight_consumers(output, users, via + (node.op_type,), seen)


def _stores_inputs_first(node: NodeProto, index: int) -> bool:
    """Whether the weight at input `index` is laid out (input, output, ...): MatMul's right
    operand, Gemm's B without transB (or A with transA), ConvTranspose's weight."""
    attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if node.op_type == "MatMul":
        return index == 1
    if node.op_type == "Gemm":
        return not attributes.get("transB", 0) if index == 1 else bool(attributes.get("transA", 0))
    return node.op_type == "ConvTranspose"


def select(tensors: Iterable[PrunableTensor], exclude: Iterable[str]) -> list[PrunableTensor]:
    """`tensors` without those matched by any of the `exclude` regular expressions."""
    patterns = [re.compile(p) for p in exclude]
    return [t for t in tensors if not any(t.matches(p) for p in patterns)]


def named_tensors(model: ModelProto) -> Iterator[tuple[str, TensorProto]]:
    """(value name, tensor) for every tensor a write-back may target: initializers and the values
    of Constant nodes (named by the Constant's output), in the main graph and all subgraphs."""

    def walk(graph: GraphProto) -> Iterator[tuple[str, TensorProto]]:
        for tensor in graph.initializer:
            yield tensor.name, tensor
        for node in graph.node:
            for attr in node.attribute:
                if node.op_type == "Constant" and attr.name == "value" and node.output:
                    yield node.output[0], attr.t
                if attr.HasField("g"):
                    yield from walk(attr.g)
                for sub in attr.graphs:
                    yield from walk(sub)

    yield from walk(model.graph)


def write_back(model: ModelProto, arrays: Mapping[str, np.ndarray]) -> ModelProto:
    """A copy of `model` whose tensors named in `arrays` hold the new values.

    Everything else (nodes, names, opsets, IR version, metadata, other tensors) is copied as is.
    Values keep the original tensor's dtype and shape.
    """
    out = ModelProto()
    out.CopyFrom(model)
    remaining = dict(arrays)
    for name, tensor in named_tensors(out):
        if name not in remaining:
            continue
        array = np.asarray(remaining.pop(name))
        dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type)
        shape = tuple(tensor.dims)
        if array.shape != shape:
            raise ValueError(f"write_back: {name!r} has shape {shape}, got {array.shape}")
        # Replace only the payload, so the tensor's other fields (doc, metadata) stay as they were.
        _clear_payload(tensor)
        if is_lazy(tensor):  # left in the input's file (onnx_io.LAZY_BYTES)
            tensor.ClearField("data_location")  # cleared, not set to DEFAULT: the bytes stay as before
            del tensor.external_data[:]
        # raw_data is little-endian; one bytes copy of the values (a large tensor is not staged
        # through a second TensorProto)
        values = np.ascontiguousarray(array, dtype=dtype)
        tensor.raw_data = (values.byteswap() if sys.byteorder == "big" else values).tobytes()
    if remaining:
        raise KeyError(f"write_back: no initializer or Constant named {sorted(remaining)}")
    return out


def release_payloads(model: ModelProto, names: Iterable[str]) -> None:
    """Drop the values of the tensors called `names` from `model` in place, keeping their names,
    types and shapes: the values live on in the torch model and every write-back replaces them,
    so a large model is not held twice."""
    wanted = set(names)
    for name, tensor in named_tensors(model):
        if name in wanted:
            _clear_payload(tensor)
            tensor.ClearField("raw_data")


def _clear_payload(tensor: TensorProto) -> None:
    for typed_field in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data"):
        tensor.ClearField(typed_field)


def read_tensor(model: ModelProto, name: str) -> np.ndarray:
    """The value of the initializer or Constant called `name`, wherever it is in the model."""
    for found, tensor in named_tensors(model):
        if found == name:
            return tensor_values(tensor)
    raise KeyError(f"no initializer or Constant named {name!r}")
