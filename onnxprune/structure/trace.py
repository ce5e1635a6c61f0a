"""Which output channels of an ONNX graph can be removed physically, and what each removal
touches: the dependency groups of structured pruning.

Every Conv / Gemm / MatMul with a constant weight starts a *space*: its output channels (Conv
axis 1, Gemm/MatMul the last axis). One forward pass in topological order labels each tensor's
channel axis with the channels it carries: element-wise and pooling ops pass the labels on,
BatchNorm and per-channel constants are sliced with them, a depthwise Conv carries them through
(its weight rows and `group` follow), Concat joins labels, Flatten / a flattening Reshape repeats
them over the merged positions, Transpose moves the axis, and an Add/Mul of two labelled tensors
ties their channels position by position into one *class* (residual branches). A weighted
consumer slices its input columns by the labels. A class is removed as a whole: every row,
column, bias entry and per-channel constant it labels.

Whatever the pass cannot follow (an op it does not know, a graph output, a reduction over the
channel axis, a non-depthwise grouped Conv, a shape it cannot read) *blocks* the classes that
reach it: they stay, and the report says where and why. Nothing is guessed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from onnx import ModelProto, NodeProto, numpy_helper

from ..shapes import observed_shapes, static_shapes
from .graph import ChannelGraph, Edit, ShapeEdit, Space, main_graph_constants

# ops whose output has the input's shape and whose channel c depends on input channel c only
_UNARY = {
    "Relu", "LeakyRelu", "Sigmoid", "Tanh", "Clip", "HardSigmoid", "HardSwish", "Elu", "Selu",
    "Softplus", "Softsign", "Gelu", "Erf", "Identity", "Dropout", "Neg", "Abs", "Exp", "Log",
    "Sqrt", "Reciprocal", "Cast", "Mish", "ThresholdedRelu", "Celu", "IsNaN", "IsInf", "Not",
}  # fmt: skip
# element-wise with broadcasting (Where: its condition and both branches)
_BINARY = {"Add", "Sub", "Mul", "Div", "Max", "Min", "PRelu", "Pow", "Where"}
_POOL = {"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "GlobalLpPool"}
_REDUCE = {"ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2"}


@dataclass(frozen=True)
class Label:
    """A tensor's channel axis and the element each position along it carries."""

    axis: int
    rank: int
    elements: tuple[int, ...]


def trace_channels(proto: ModelProto, feeds: dict[str, np.ndarray] | None = None) -> ChannelGraph:
    """The channel graph of `proto`: shapes inferred with the inputs' unknown dimensions 1, or
    from `feeds` (one sample is enough) and completed by running the model on them."""
    return _Tracer(proto, feeds).run()


class _Tracer:
    def __init__(self, proto: ModelProto, feeds: dict[str, np.ndarray] | None):
        self.proto = proto
        self.graph = ChannelGraph()
        self.inits = main_graph_constants(proto)
        given = {name: tuple(np.shape(v)) for name, v in feeds.items()} if feeds else _batch_one(proto)
        self.shapes = static_shapes(proto, given)
        if feeds:
            self.shapes.update(observed_shapes(proto, feeds))
        self.labels: dict[str, Label] = {}
        self.current = 0  # the index of the node being visited
        self.producers = {out: i for i, n in enumerate(proto.graph.node) for out in n.output}

    def run(self) -> ChannelGraph:
        for index, node in enumerate(self.proto.graph.node):
            self.current = index
            self.visit(node)
        for output in self.proto.graph.output:
            if output.name in self.labels:
                self.graph.block(self.labels[output.name].elements, f"reaches the graph output {output.name!r}")
        self._check_shared_initializers()
        self.graph.tensors = set(self.labels)
        return self.graph

    # ------------------------------------------------------------------ helpers

    def const(self, name: str) -> np.ndarray | None:
        return numpy_helper.to_array(self.inits[name]) if name in self.inits else None

    def array(self, name: str) -> np.ndarray:
        """The value of a constant known to be one."""
        return numpy_helper.to_array(self.inits[name])

    def block_inputs(self, node: NodeProto, why: str) -> None:
        for name in node.input:
            if name in self.labels:
                self.graph.block(self.labels[name].elements, f"{node.op_type} {node.name!r}: {why}")

    def edit(self, initializer: str, axis: int, labels: tuple[int, ...], node: NodeProto) -> None:
        self.graph.edits.append(Edit(initializer, axis, labels, self.current))

    def rank(self, name: str) -> int | None:
        shape = self.shapes.get(name)
        return len(shape) if shape is not None else None

    # ------------------------------------------------------------------ one node

    def visit(self, node: NodeProto) -> None:
        labelled = [name for name in node.input if name in self.labels]
        op = node.op_type
        if op in ("Conv", "Gemm", "MatMul") and len(node.input) > 1 and node.input[1] in self.inits:
            self.weighted(node)
        elif not labelled:
            return
        elif op == "Shape":
            return  # computed at run time; whatever uses it is checked where it meets channels
        elif op in _UNARY and labelled == [node.input[0]]:
            self.labels[node.output[0]] = self.labels[node.input[0]]
        elif op in _POOL and self.labels[node.input[0]].axis == 1:
            self.labels[node.output[0]] = self.labels[node.input[0]]
        elif op in ("BatchNormalization", "InstanceNormalization") and labelled == [node.input[0]]:
            self.normalization(node)
        elif op in _BINARY:
            self.binary(node)
        elif op == "Concat":
            self.concat(node)
        elif op == "Flatten":
            self.flatten(node)
        elif op == "Reshape":
            self.reshape(node)
        elif op in ("Softmax", "LogSoftmax"):
            self.softmax(node)
        elif op == "MatMul":
            self.batched_matmul(node)
        elif op == "Transpose":
            self.transpose(node)
        elif op in _REDUCE or op in ("Squeeze", "Unsqueeze"):
            self.axes_op(node)
        else:
            self.block_inputs(node, "an op the channel trace does not follow")

    def weighted(self, node: NodeProto) -> None:
        w = self.inits[node.input[1]]
        self.graph.weights.add(node.input[1])
        dims = tuple(w.dims)
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        x = self.labels.get(node.input[0])
        if node.op_type == "Conv" and group > 1:
            if x is not None and x.axis == 1 and group == len(x.elements) == dims[0] and dims[1] == 1:
                self.depthwise(node, x)
            else:
                self.block_inputs(node, "a grouped Conv that is not depthwise")
                self.producer(node, w.name, dims[0], 0)
                self.graph.block(
                    self.labels.get(node.output[0], Label(1, 0, ())).elements,
                    f"Conv {node.name!r}: grouped output channels",
                )
            return
        if node.op_type == "Gemm":
            trans_a = next((a.i for a in node.attribute if a.name == "transA"), 0)
            trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
            in_axis, out_axis, x_axis = (1, 0, 1) if trans_b else (0, 1, 1)
            if trans_a:
                x_axis = 0
        elif node.op_type == "MatMul":
            if len(dims) != 2:
                self.block_inputs(node, "a MatMul with a weight of rank other than 2")
                return
            in_axis, out_axis, x_axis = 0, 1, (self.rank(node.input[0]) or 0) - 1
        else:
            in_axis, out_axis, x_axis = 1, 0, 1
        if x is not None:
            if x.axis != x_axis or (node.op_type == "Conv" and len(x.elements) != dims[1]):
                self.block_inputs(node, "its input's channels are not on the axis it reduces")
            else:
                self.edit(w.name, in_axis, x.elements, node)
        for extra in node.input[2:]:
            if extra in self.labels:
                self.block_inputs(node, "a labelled bias input")
        self.producer(node, w.name, dims[out_axis], out_axis)

    def producer(self, node: NodeProto, weight: str, size: int, weight_axis: int) -> None:
        out = node.output[0]
        rank = self.rank(out)
        axis = None if rank is None else 1 if node.op_type == "Conv" else rank - 1
        elements = tuple(self.graph.new_elements(size))
        self.graph.spaces.append(Space(node.name, weight, size, elements[0]))
        self.edit(weight, weight_axis, elements, node)
        if len(node.input) > 2 and node.input[2]:
            bias = self.const(node.input[2])
            if node.input[2] in self.inits and bias is not None and bias.ndim == 1 and bias.shape[0] == size:
                self.edit(node.input[2], 0, elements, node)
            elif bias is not None and bias.size == 1:
                pass
            else:
                self.graph.block(elements, f"{node.op_type} {node.name!r}: a bias not per output channel")
        if axis is None:
            self.graph.block(elements, f"{node.op_type} {node.name!r}: output shape unknown")
            return
        self.labels[out] = Label(axis, rank or 0, elements)

    def depthwise(self, node: NodeProto, x: Label) -> None:
        self.edit(node.input[1], 0, x.elements, node)
        if len(node.input) > 2 and node.input[2]:
            self.edit(node.input[2], 0, x.elements, node)
        self.graph.groups[self.current] = x.elements
        self.labels[node.output[0]] = x

    def normalization(self, node: NodeProto) -> None:
        x = self.labels[node.input[0]]
        if x.axis != 1 or any(name not in self.inits for name in node.input[1:] if name):
            self.block_inputs(node, "normalisation parameters not constant per channel")
            return
        for name in node.input[1:]:
            if name:
                self.edit(name, 0, x.elements, node)
        self.labels[node.output[0]] = x

    def binary(self, node: NodeProto) -> None:
        out_rank = self.rank(node.output[0])
        labelled = [(i, self.labels[n]) for i, n in enumerate(node.input) if n in self.labels]
        first = labelled[0][1]
        if out_rank is None or any(label.rank != out_rank for _, label in labelled):
            self.block_inputs(node, "operands of different or unknown rank")
            return
        for _, other in labelled[1:]:
            if other.axis != first.axis or len(other.elements) != len(first.elements):
                self.block_inputs(node, "the operands' channels do not line up")
                return
            for a, b in zip(first.elements, other.elements):
                self.graph.union(a, b)
        for name in node.input:
            if name in self.labels or not name:
                continue
            if not self.broadcast_operand(node, name, first):
                return
        self.labels[node.output[0]] = first

    def broadcast_operand(self, node: NodeProto, name: str, label: Label) -> bool:
        """An unlabelled operand is fine if it broadcasts over the channel axis or is a constant
        sliced with it."""
        value = self.const(name)
        shape = value.shape if value is not None else self.shapes.get(name)
        if shape is None:
            self.block_inputs(node, f"the shape of {name!r} is unknown")
            return False
        position = label.axis - (label.rank - len(shape))
        size = shape[position] if 0 <= position < len(shape) else 1
        if size == 1:
            return True
        if size == len(label.elements) and name in self.inits:
            self.edit(name, position, label.elements, node)
            return True
        if size == len(label.elements) and self.reshaped_constant(name, position, label):
            return True
        self.block_inputs(node, f"{name!r} varies along the channel axis")
        return False

    def reshaped_constant(self, name: str, position: int, label: Label) -> bool:
        """A Reshape of a per-channel constant (PaddlePaddle's Conv bias: [C] reshaped to
        [1, C, 1, 1] and added): the constant and the shape's entry are sliced with the labels."""
        index = self.producers.get(name)
        if index is None:
            return False
        node = self.proto.graph.node[index]
        if node.op_type != "Reshape" or node.input[0] not in self.inits:
            return False
        source = self.array(node.input[0])
        axes = [a for a, d in enumerate(source.shape) if d != 1]
        entry = self.shape_entry(node.input[1], position)
        if len(axes) != 1 or source.shape[axes[0]] != len(label.elements) or entry is None:
            return False
        self.graph.edits.append(Edit(node.input[0], axes[0], label.elements, index))
        if self.array(entry[0])[entry[1]] > 0:
            self.graph.shape_edits.append(ShapeEdit(entry[0], entry[1], label.elements))
        return True

    def shape_entry(self, name: str, index: int) -> tuple[str, int] | None:
        """The constant and offset holding entry `index` of the 1-D shape value `name`, followed
        through Concat; None when the entry is computed."""
        if name in self.inits:
            return (name, index) if self.readers(name) == 1 else None
        producer = self.producers.get(name)
        node = self.proto.graph.node[producer] if producer is not None else None
        if node is not None and node.op_type in ("Cast", "Identity"):
            return self.shape_entry(node.input[0], index)
        if node is None or node.op_type != "Concat":
            return None
        offset = 0
        for part in node.input:
            shape = self.array(part).shape if part in self.inits else self.shapes.get(part)
            if shape is None or len(shape) != 1:
                return None
            if index < offset + shape[0]:
                return self.shape_entry(part, index - offset)
            offset += shape[0]
        return None

    def readers(self, name: str) -> int:
        return sum(name in n.input for n in self.proto.graph.node)

    def concat(self, node: NodeProto) -> None:
        rank = self.rank(node.output[0])
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        axis = axis + rank if rank is not None and axis < 0 else axis
        elements: list[int] = []
        for name in node.input:
            label = self.labels.get(name)
            shape = self.shapes.get(name)
            if label is not None and label.axis == axis:
                elements.extend(label.elements)
            elif label is None and shape is not None and rank is not None:
                fixed = self.graph.new_elements(shape[axis])
                self.graph.block(fixed, f"Concat {node.name!r}: an input without channels to follow")
                elements.extend(fixed)
            else:
                self.block_inputs(node, "concatenated along another axis")
                return
        self.labels[node.output[0]] = Label(axis, rank or 0, tuple(elements))

    def reshape(self, node: NodeProto) -> None:
        """A Reshape that keeps the channel axis (shape unchanged there), splits it into attention
        heads, or flattens it into the last axis."""
        x = self.labels[node.input[0]]
        shape, out = self.shapes.get(node.input[0]), self.shapes.get(node.output[0])
        if shape is None or out is None:
            self.block_inputs(node, "a reshape of unknown shapes")
        elif tuple(shape) == tuple(out):
            self.same_shape(node, x)
        elif len(out) == len(shape) + 1 and _splits(shape, out, x.axis):
            self.split_heads(node, x, out[x.axis + 1])
        else:
            self.flatten(node)

    def same_shape(self, node: NodeProto, x: Label) -> None:
        entry = self.shape_entry(node.input[1], x.axis)
        if entry is None or (self.value_at(entry) == 0 and _allows_zero(node)):
            self.block_inputs(node, "a reshape whose size along the channel axis is computed")
            return
        if self.value_at(entry) > 0:
            self.graph.shape_edits.append(ShapeEdit(entry[0], entry[1], x.elements))
        self.labels[node.output[0]] = x

    def split_heads(self, node: NodeProto, x: Label, width: int) -> None:
        """The channel axis split into (heads, width): each head's channels form one class, and
        the head axis carries one element per head (a head is removed whole)."""
        heads, size = self.shape_entry(node.input[1], x.axis), self.shape_entry(node.input[1], x.axis + 1)
        if heads is None or size is None or self.value_at(size) != width or self.value_at(heads) == 0:
            self.block_inputs(node, "a split into heads whose head count or size is not a constant")
            return
        firsts = x.elements[::width]
        for k, element in enumerate(x.elements):
            self.graph.union(firsts[k // width], element)
        if self.value_at(heads) > 0:  # else -1: inferred from the kept width
            self.graph.shape_edits.append(ShapeEdit(heads[0], heads[1], firsts))
        self.graph.heads.update(firsts)
        self.labels[node.output[0]] = Label(x.axis, x.rank + 1, firsts)

    def softmax(self, node: NodeProto) -> None:
        x = self.labels[node.input[0]]
        axis = next((a.i for a in node.attribute if a.name == "axis"), -1 if self.opset() >= 13 else 1)
        axis = axis + x.rank if axis < 0 else axis
        # before opset 13 Softmax normalises over every axis from `axis` on
        if x.axis == axis or (self.opset() < 13 and x.axis > axis):
            self.block_inputs(node, "normalises over the channel axis")
            return
        self.labels[node.output[0]] = x

    def batched_matmul(self, node: NodeProto) -> None:
        """A MatMul of two computed tensors (attention scores and their use of the values): both
        labelled on the same batch axis, whose positions it ties."""
        a, b = self.labels.get(node.input[0]), self.labels.get(node.input[1])
        rank = self.rank(node.output[0])
        if (
            a is None
            or b is None
            or rank is None
            or a.rank != rank
            or b.rank != rank
            or a.axis != b.axis
            or a.axis >= rank - 2
            or len(a.elements) != len(b.elements)
        ):
            self.block_inputs(node, "a MatMul of computed tensors not labelled on one shared batch axis")
            return
        for first, second in zip(a.elements, b.elements):
            self.graph.union(first, second)
        self.labels[node.output[0]] = a

    def value_at(self, entry: tuple[str, int]) -> int:
        """The value of a shape entry found by `shape_entry`."""
        return int(self.array(entry[0])[entry[1]])

    def opset(self) -> int:
        return next((o.version for o in self.proto.opset_import if o.domain in ("", "ai.onnx")), 1)

    def flatten(self, node: NodeProto) -> None:
        x = self.labels[node.input[0]]
        shape, out = self.shapes.get(node.input[0]), self.shapes.get(node.output[0])
        if node.op_type == "Flatten":
            start = next((a.i for a in node.attribute if a.name == "axis"), 1)
        else:
            start = len(out) - 1 if out else 1  # a Reshape merging every axis from `start` on
        flattening = shape is not None and out is not None and len(out) == start + 1 and out[:start] == shape[:start]
        entry = self.reshape_edit(node, start) if node.op_type == "Reshape" else None
        if shape is None or not flattening or x.axis < start or (node.op_type == "Reshape" and entry is None):
            self.block_inputs(node, "a reshape that is not a flatten of the channel axis")
            return
        merged = shape[start:]
        along = [-1 if i == x.axis - start else 1 for i in range(len(merged))]
        positions = np.broadcast_to(np.asarray(x.elements).reshape(along), merged)
        labels = tuple(int(v) for v in positions.reshape(-1))
        if entry is not None and self.array(entry[0])[entry[1]] > 0:
            self.graph.shape_edits.append(ShapeEdit(entry[0], entry[1], labels))
        self.labels[node.output[0]] = Label(start, start + 1, labels)

    def reshape_edit(self, node: NodeProto, start: int) -> tuple[str, int] | None:
        """Where a flattening Reshape's merged size is written, if it is a constant (-1 or a
        count to update); None when it is computed."""
        entry = self.shape_entry(node.input[1], start)
        return entry if entry is not None and self.array(entry[0])[entry[1]] != 0 else None

    def transpose(self, node: NodeProto) -> None:
        x = self.labels[node.input[0]]
        perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), list(range(x.rank))[::-1])
        self.labels[node.output[0]] = Label(perm.index(x.axis), x.rank, x.elements)

    def axes_op(self, node: NodeProto) -> None:
        x = self.labels[node.input[0]]
        axes = next((list(a.ints) for a in node.attribute if a.name == "axes"), None)
        if axes is None and len(node.input) > 1 and node.input[1]:
            value = self.const(node.input[1])
            axes = None if value is None else [int(v) for v in value.reshape(-1)]
        out_rank = self.rank(node.output[0])
        if axes is None or out_rank is None:
            self.block_inputs(node, "axes or shapes unknown")
            return
        if node.op_type == "Unsqueeze":
            axes = [a + out_rank if a < 0 else a for a in axes]
            axis = x.axis
            for a in sorted(axes):
                axis += a <= axis
        else:
            axes = [a + x.rank if a < 0 else a for a in axes]
            if x.axis in axes:
                self.block_inputs(node, "reduces or squeezes the channel axis")
                return
            axis = x.axis if out_rank == x.rank else x.axis - sum(a < x.axis for a in axes)
        self.labels[node.output[0]] = Label(axis, out_rank, x.elements)

    def _check_shared_initializers(self) -> None:
        """An initializer read by a node that does not slice it stays whole; two nodes slicing
        it along the same axis tie their labels position by position."""
        by_name: dict[str, list[Edit]] = {}
        for e in self.graph.edits:
            by_name.setdefault(e.initializer, []).append(e)
        for name, edits in by_name.items():
            readers = {i for i, n in enumerate(self.proto.graph.node) if name in n.input}
            if readers != {e.node for e in edits}:
                for e in edits:
                    self.graph.block(e.labels, f"{name!r} is also read by nodes the trace does not slice it for")
                continue
            first_on_axis: dict[int, Edit] = {}
            for e in edits:
                first = first_on_axis.setdefault(e.axis, e)
                if len(first.labels) != len(e.labels):
                    self.graph.block(e.labels + first.labels, f"{name!r} is sliced two ways")
                for a, b in zip(first.labels, e.labels):
                    self.graph.union(a, b)


def _splits(shape: tuple[int, ...], out: tuple[int, ...], axis: int) -> bool:
    """Whether `out` is `shape` with the dimension at `axis` split in two."""
    return (
        tuple(out[:axis]) == tuple(shape[:axis])
        and tuple(out[axis + 2 :]) == tuple(shape[axis + 1 :])
        and out[axis] * out[axis + 1] == shape[axis]
        and out[axis + 1] > 1
    )


def _allows_zero(node: NodeProto) -> bool:
    """Whether a 0 in the Reshape's shape is a zero-size dimension (else it copies the input's)."""
    return bool(next((a.i for a in node.attribute if a.name == "allowzero"), 0))


def _batch_one(proto: ModelProto) -> dict[str, tuple[int, ...]]:
    """The graph inputs' shapes with every unknown dimension 1 (None where the rank is unknown)."""
    shapes = {}
    inits = {t.name for t in proto.graph.initializer}
    for value in proto.graph.input:
        if value.name in inits or not value.type.tensor_type.HasField("shape"):
            continue
        dims = value.type.tensor_type.shape.dim
        shapes[value.name] = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else 1 for d in dims)
    return shapes
