"""The shipped demo: the MNIST CNN pruned to 80% on its shipped data, checked independently."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from onnxprune import PruneConfig, prune

from builders import ort_run

MODELS = Path(__file__).resolve().parents[1] / "models"


def test_demo_prunes_to_80_percent_and_reports_accuracy(tmp_path):
    report = prune(
        PruneConfig(
            input=MODELS / "mnist_cnn.onnx",
            output=tmp_path / "cnn80.onnx",
            sparsity=0.8,
            calibration=MODELS / "mnist_calib.npz",
            evaluation=MODELS / "mnist_eval.npz",
        )
    )
    assert report.pruning.sparsity >= 0.799
    # recount the zeros in the file as written
    tensors = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(tmp_path / "cnn80.onnx")).graph.initializer}
    names = [t.name for t in report.pruning.tensors]
    assert set(names) == {"features.0.weight", "features.3.weight", "classifier.1.weight", "classifier.3.weight"}
    zeros = sum(int((tensors[n] == 0).sum()) for n in names)
    assert zeros == report.pruning.zeros == round(0.8 * sum(tensors[n].size for n in names))

    # accuracy before and after, recomputed here with onnxruntime
    data = np.load(MODELS / "mnist_eval.npz")
    before = np.mean(np.argmax(ort_run(MODELS / "mnist_cnn.onnx", {"input": data["input"]})[0], 1) == data["labels"])
    after = np.mean(np.argmax(ort_run(tmp_path / "cnn80.onnx", {"input": data["input"]})[0], 1) == data["labels"])
    assert report.validation.accuracy_before == before and report.validation.accuracy_after == after
    assert before > 0.9 and report.evaluation.samples == 1000 and report.evaluation.labels
    assert report.conversion.max_abs_error < 1e-4
