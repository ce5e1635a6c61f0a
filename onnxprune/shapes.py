"""The static shape of every value of a graph: from ONNX shape inference with the inputs' shapes
fixed, completed by one onnxruntime run that exposes every value (exporters' dynamic reshapes
leave shape inference without answers)."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import onnx
from onnx import ModelProto

from .sessions import cpu_session

_MAX_OBSERVED_BYTES = 1 << 30  # models above this are not copied for an observing run


def static_shapes(proto: ModelProto, input_shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """Every value's static shape after shape inference with the inputs fixed to `input_shapes`."""
    graph = onnx.GraphProto()
    graph.CopyFrom(proto.graph)
    # only the shapes matter: the inference reads the constant inputs (Reshape's shape, ...)
    # from initializers, so large weights keep their dims and drop their data
    del graph.initializer[:]
    declared = {value.name for value in graph.input}
    for t in proto.graph.initializer:
        if t.data_location != onnx.TensorProto.EXTERNAL and int(np.prod(t.dims)) <= 4096:
            graph.initializer.append(t)
        elif t.name not in declared:
            graph.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    for value in graph.input:
        if value.name in input_shapes:
            dims = value.type.tensor_type.shape.dim
            for dim, size in zip(dims, input_shapes[value.name]):
                dim.Clear()
                dim.dim_value = int(size)
    model = onnx.helper.make_model(graph, opset_imports=proto.opset_import, ir_version=proto.ir_version)
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:
        return {}
    shapes = {}
    values = [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]
    for value in values:
        dims = value.type.tensor_type.shape.dim
        if dims and all(d.HasField("dim_value") and d.dim_value > 0 for d in dims):
            shapes[value.name] = tuple(d.dim_value for d in dims)
    return shapes


def observed_shapes(proto: ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, tuple[int, ...]]:
    """The shape of every node output of the main graph in one onnxruntime run on `feeds`
    ({} when the model is too large to copy or the run fails)."""
    if proto.ByteSize() > _MAX_OBSERVED_BYTES:
        return {}
    copy = ModelProto()
    copy.CopyFrom(proto)
    declared = {o.name for o in copy.graph.output}
    names = [name for node in copy.graph.node for name in node.output if name and name not in declared]
    copy.graph.output.extend(onnx.ValueInfoProto(name=name) for name in names)
    try:
        session = cpu_session(copy.SerializeToString())
        with contextlib.redirect_stdout(io.StringIO()):
            values = session.run(None, feeds)
    except Exception:
        return {}
    outputs = [o.name for o in session.get_outputs()]
    return {name: tuple(np.shape(v)) for name, v in zip(outputs, values)}
