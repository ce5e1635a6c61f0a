"""Real ONNX files from the onnx package (IR 3, opset 9, caffe2 exports) through the pipeline."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from onnxprune import PruneConfig, prune
from onnxprune.bridge.convert import convert

import onnx_light
from builders import ort_run, randn, save_npz, torch_run


@pytest.mark.parametrize("name", ["light_squeezenet", "light_inception_v1"])
def test_onnx_backend_light_model_round_trips_and_prunes(tmp_path, name):
    path = onnx_light.filled(name, tmp_path / f"{name}.onnx")
    m = onnx.load(str(path))
    assert (m.ir_version, m.opset_import[0].version) == (3, 9)
    converted = convert(m)
    feeds = {converted.input_names[0]: randn(1, 3, 224, 224, seed=1)}
    np.testing.assert_allclose(torch_run(converted, feeds)[0], ort_run(m, feeds)[0], atol=1e-4)

    data = save_npz(tmp_path / "eval.npz", **{converted.input_names[0]: randn(2, 3, 224, 224, seed=2)})
    report = prune(
        PruneConfig(input=path, output=tmp_path / "out.onnx", sparsity=0.5, evaluation=data, method="magnitude")
    )
    assert report.conversion.max_abs_error < 1e-4
    assert abs(report.pruning.sparsity - 0.5) < 1e-6 and len(report.pruning.tensors) == len(converted.prunable)
    out = onnx.load(str(tmp_path / "out.onnx"))
    assert [n.name for n in out.graph.node] == [n.name for n in m.graph.node]
    assert [i.name for i in out.graph.input] == [i.name for i in m.graph.input]
