"""Small ONNX models built in code, and helpers to run them in onnxruntime and in the bridge."""

from __future__ import annotations

import hashlib
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


def attention_block(ffn: bool = False, batch: int | str = 1) -> onnx.ModelProto:
    """One self-attention block as exporters write it: Q, K, V projections with biases, each split
    into 3 heads of 2 (the head count a constant 3, or -1), scores Q·Kᵀ scaled, a Softmax with the
    IsNaN/Where guard of torch exports, the heads merged by a Reshape to 6 and the output
    projection; with `ffn`, a hidden layer of 5 neurons after it."""
    d_model, heads, width = 6, 3, 2
    inits = {
        "wq": randn(d_model, d_model, seed=1), "bq": randn(d_model, seed=2),
        "wk": randn(d_model, d_model, seed=3), "bk": randn(d_model, seed=4),
        "wv": randn(d_model, d_model, seed=5), "bv": randn(d_model, seed=6),
        "wo": randn(d_model, d_model, seed=7), "bo": randn(d_model, seed=8),
        "shape_q": np.array([0, 0, heads, width], dtype=np.int64),
        "shape_k": np.array([0, 0, -1, width], dtype=np.int64),
        "shape_v": np.array([0, 0, heads, width], dtype=np.int64),
        "merge": np.array([0, 0, d_model], dtype=np.int64),
        "scale": np.array(np.sqrt(width), dtype=np.float32),
        "zero": np.array(0.0, dtype=np.float32),
        "w1": randn(d_model, 5, seed=9), "w2": randn(5, 4, seed=10),
    }  # fmt: skip
    nodes = []
    for p in "qkv":
        nodes += [
            helper.make_node("MatMul", ["x", f"w{p}"], [f"{p}0"], name=p),
            helper.make_node("Add", [f"{p}0", f"b{p}"], [f"{p}1"], name=f"{p}_bias"),
            helper.make_node("Reshape", [f"{p}1", f"shape_{p}"], [f"{p}2"], name=f"{p}_split"),
        ]
    nodes += [
        helper.make_node("Transpose", ["q2"], ["qt"], perm=[0, 2, 1, 3]),
        helper.make_node("Transpose", ["k2"], ["kt"], perm=[0, 2, 3, 1]),
        helper.make_node("Transpose", ["v2"], ["vt"], perm=[0, 2, 1, 3]),
        helper.make_node("MatMul", ["qt", "kt"], ["scores"], name="scores"),
        helper.make_node("Div", ["scores", "scale"], ["scaled"]),
        helper.make_node("Softmax", ["scaled"], ["p"], axis=-1),
        helper.make_node("IsNaN", ["p"], ["nan"]),
        helper.make_node("Where", ["nan", "zero", "p"], ["p_safe"]),
        helper.make_node("MatMul", ["p_safe", "vt"], ["context"], name="context"),
        helper.make_node("Transpose", ["context"], ["ct"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["ct", "merge"], ["merged"], name="merge"),
        helper.make_node("MatMul", ["merged", "wo"], ["o0"], name="o"),
        helper.make_node("Add", ["o0", "bo"], ["attended" if ffn else "out"], name="o_bias"),
    ]
    if ffn:
        nodes += [
            helper.make_node("MatMul", ["attended", "w1"], ["h"], name="fc1"),
            helper.make_node("Relu", ["h"], ["r"]),
            helper.make_node("MatMul", ["r", "w2"], ["out"], name="fc2"),
        ]
    else:
        del inits["w1"], inits["w2"]
    out_width = 4 if ffn else d_model
    return model(nodes, [tensor("x", [batch, 4, d_model])], [tensor("out", [batch, 4, out_width])], inits)


def sha256_of(path: Path) -> str:
    """The file's digest, read in chunks (a 2.5 GiB file is not held in the test's memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()
