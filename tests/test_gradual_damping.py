"""Under a gradual schedule the automatic damping does not run one-shot trials: they chose 1e-4 on
a digits MLP whose gradual run then ended far below magnitude pruning."""

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxprune import PruneConfig, prune
from onnxprune.estimators.base import DEFAULT_DAMP


def _mlp(path: Path) -> None:
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.normal(size=(16, 32)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.normal(size=(32, 4)).astype(np.float32), "w2")
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
            helper.make_node("Relu", ["h"], ["r"], name="relu"),
            helper.make_node("MatMul", ["r", "w2"], ["logits"], name="fc2"),
        ],
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 4])],
        [w1, w2],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.save(model, path)


def test_gradual_runs_use_the_default_damping_without_trials_and_one_shot_runs_search(tmp_path):
    _mlp(tmp_path / "m.onnx")
    rng = np.random.default_rng(1)
    x = rng.normal(size=(64, 16)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x, labels=rng.integers(0, 4, 64))
    common = dict(input=tmp_path / "m.onnx", sparsity=0.5, method="woodfisher", calibration=tmp_path / "calib.npz",
                  progress="off", num_grads=16, force=True)  # fmt: skip
    gradual = prune(PruneConfig(output=tmp_path / "g.onnx", schedule="gradual", prune_steps=2, **common))
    search = gradual.fisher.estimator["damp_search"]
    assert search["searched"] is False and search["losses"] == []
    assert gradual.fisher.estimator["damp"] == DEFAULT_DAMP
    oneshot = prune(PruneConfig(output=tmp_path / "o.onnx", damp_search_seconds=10**6, **common))  # any machine
    assert oneshot.fisher.estimator["damp_search"]["searched"] is True
    assert (
        len(oneshot.fisher.estimator["damp_search"]["losses"])
        == len(oneshot.fisher.estimator["damp_search"]["grid"])
        > 1
    )
