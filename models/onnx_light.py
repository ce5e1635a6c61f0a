"""The onnx package's `light_*` backend test models with usable weights.

Their weights are a constant 0.02 made by ConstantOfShape nodes (to keep the files small). For
conversion and pruning tests we replace each by a seeded random initializer: He-scaled for
Conv/Gemm weights, within [0.5, 1.5] for BatchNorm scales and variances (which must stay
positive), N(0, 0.1) otherwise.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

LIGHT = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"


def fill_weights(model: onnx.ModelProto, seed: int = 0) -> onnx.ModelProto:
    """A copy of `model` whose ConstantOfShape(constant shape) nodes are random initializers."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    shapes = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    roles: dict[str, tuple[str, int]] = {}
    for node in graph.node:
        for index, value in enumerate(node.input):
            roles.setdefault(value, (node.op_type, index))
    rng = np.random.default_rng(seed)
    kept, filled = [], []
    for node in graph.node:
        if node.op_type != "ConstantOfShape" or node.input[0] not in shapes:
            kept.append(node)
            continue
        shape = tuple(int(d) for d in shapes[node.input[0]])
        op, index = roles.get(node.output[0], ("", -1))
        if op in ("Conv", "Gemm") and index == 1:
            fan_in = int(np.prod(shape[1:])) if op == "Conv" else shape[-1]
            values = rng.standard_normal(shape) * np.sqrt(2.0 / max(1, fan_in))
        elif op == "BatchNormalization" and index in (1, 4):
            values = rng.uniform(0.5, 1.5, shape)
        else:
            values = rng.standard_normal(shape) * 0.1
        filled.append(numpy_helper.from_array(values.astype(np.float32), node.output[0]))
    del graph.node[:]
    graph.node.extend(kept)
    # the shape tensors of the removed ConstantOfShape nodes are now unused
    used = {name for node in kept for name in node.input}
    unused = {t.name for t in graph.initializer if t.name not in used}
    kept_inits = [t for t in graph.initializer if t.name not in unused]
    del graph.initializer[:]
    graph.initializer.extend(kept_inits + filled)
    kept_inputs = [i for i in graph.input if i.name not in unused]
    del graph.input[:]
    graph.input.extend(kept_inputs)
    if out.ir_version < 4:  # IR 3 requires every initializer to be a graph input too
        known = {i.name for i in graph.input}
        graph.input.extend(
            helper.make_tensor_value_info(t.name, t.data_type, t.dims) for t in filled if t.name not in known
        )
    return out


def filled(name: str, target: Path, seed: int = 0) -> Path:
    """Write the filled `light_<name>` model to `target` (once) and return its path."""
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        model = fill_weights(onnx.load(str(LIGHT / f"{name}.onnx")), seed)
        onnx.save_model(model, str(target))
    return target
