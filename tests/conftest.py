import sys
from pathlib import Path

# the helpers that build shipped/derived models live next to them in models/
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))


import numpy as np  # noqa: E402
import pytest  # noqa: E402
from onnx import helper  # noqa: E402

from builders import model, ort_run, randn, save, save_npz, tensor  # noqa: E402


@pytest.fixture
def mlp_files(tmp_path):
    """A 3-layer classifier, calibration data with labels, evaluation data without."""
    m = model(
        [
            helper.make_node("Gemm", ["x", "w1", "b1"], ["h1"], name="fc1", transB=1),
            helper.make_node("Relu", ["h1"], ["r1"], name="relu1"),
            helper.make_node("Gemm", ["r1", "w2", "b2"], ["h2"], name="fc2", transB=0, alpha=0.5),
            helper.make_node("Relu", ["h2"], ["r2"], name="relu2"),
            helper.make_node("MatMul", ["r2", "w3"], ["logits"], name="head"),
        ],
        [tensor("x", ["N", 10])],
        [tensor("logits", ["N", 5])],
        {
            "w1": randn(24, 10, seed=1),
            "b1": randn(24, seed=2),
            "w2": randn(24, 16, seed=3),
            "b2": randn(16, seed=4),
            "w3": randn(16, 5, seed=5),
        },
    )
    path = save(m, tmp_path / "model.onnx")
    x = randn(300, 10, seed=6)
    labels = np.argmax(ort_run(m, {"x": x})[0], axis=1)  # the dense model is right on its own labels
    calib = save_npz(tmp_path / "calib.npz", x=x[:200], labels=labels[:200])
    evaluation = save_npz(tmp_path / "eval.npz", x=x[200:], labels=labels[200:])
    return path, calib, evaluation, tmp_path
