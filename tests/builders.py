"""Small ONNX models built in code, and helpers to run them in onnxruntime and in the bridge."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper

MODELS = Path(__file__).resolve().parents[1] / "models"

# onnx >= 1.23 writes IR 14 by default, which onnxruntime 1.31 rejects.
IR_VERSION = 8
OPSET = 17


def model(
    nodes,
    inputs,
    outputs,
    initializers=(),
    opset: int = OPSET,
    ir_version: int = IR_VERSION,
    name: str = "test",
    extra_opsets: Sequence[tuple[str, int]] = (),
) -> onnx.ModelProto:
    graph = helper.make_graph(
        list(nodes),
        name,
        list(inputs),
        list(outputs),
        initializer=[numpy_helper.from_array(np.asarray(a), n) for n, a in dict(initializers).items()],
    )
    opsets = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, v) for d, v in extra_opsets]
    m = helper.make_model(graph, opset_imports=opsets, ir_version=ir_version, producer_name="onnxprune-tests")
    return m


def tensor(name: str, shape, elem=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, elem, shape)


def save(m: onnx.ModelProto, path: Path) -> Path:
    onnx.checker.check_model(m)
    path.write_bytes(m.SerializeToString())
    return path


def ort_run(model_or_path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    source = model_or_path.SerializeToString() if isinstance(model_or_path, onnx.ModelProto) else str(model_or_path)
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def torch_run(torch_model, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    with torch.no_grad():
        outputs = torch_model(*[torch.from_numpy(np.asarray(feeds[n])) for n in torch_model.input_names])
    return [o.numpy() for o in outputs]


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def randn(*shape, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def mlp(hidden: int = 16, inputs: int = 8, classes: int = 4, seed: int = 0) -> onnx.ModelProto:
    """x[N, inputs] -> Gemm(transB=1) -> Relu -> Gemm(transB=1) -> logits[N, classes]."""
    return model(
        [
            helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="fc1", transB=1),
            helper.make_node("Relu", ["h"], ["r"], name="relu"),
            helper.make_node("Gemm", ["r", "w2", "b2"], ["logits"], name="fc2", transB=1),
        ],
        [tensor("x", ["N", inputs])],
        [tensor("logits", ["N", classes])],
        {
            "w1": randn(hidden, inputs, seed=seed),
            "b1": randn(hidden, seed=seed + 1),
            "w2": randn(classes, hidden, seed=seed + 2),
            "b2": randn(classes, seed=seed + 3),
        },
    )


def save_npz(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)
    return path
