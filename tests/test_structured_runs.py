"""`--structure channels` end to end: the written model is the original graph with smaller
tensors, computes what the pruned torch model computed, is reported (channels kept per layer,
what stayed and why, speed), and bad requests stop before anything is written."""

from __future__ import annotations

import json

import jsonschema
import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import helper, numpy_helper

from onnxprune import PruneConfig, prune
from onnxprune.oneshot import Pruner
from onnxprune.report import schema
from onnxprune.speed import footprint
from onnxprune.structure import STRUCTURES
from onnxprune_cli.main import main

from builders import attention_block, model, ort_run, randn, save, save_npz, tensor


def residual_cnn():
    """conv a -> relu -> (conv b + conv c) -> relu -> global pool -> flatten -> gemm (logits)."""
    inits = {
        "wa": randn(8, 3, 3, 3, seed=1),
        "ba": randn(8, seed=2),
        "wb": randn(8, 8, 3, 3, seed=3) * 0.3,
        "bb": randn(8, seed=4),
        "wc": randn(8, 8, 1, 1, seed=5),
        "bc": randn(8, seed=6),
        "wf": randn(8, 4, seed=7),
        "bf": randn(4, seed=8),
    }
    nodes = [
        helper.make_node("Conv", ["x", "wa", "ba"], ["ya"], name="a", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["ya"], ["ra"], name="ra"),
        helper.make_node("Conv", ["ra", "wb", "bb"], ["yb"], name="b", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["ra", "wc", "bc"], ["yc"], name="c"),
        helper.make_node("Add", ["yb", "yc"], ["s"], name="add"),
        helper.make_node("Relu", ["s"], ["rs"], name="rs"),
        helper.make_node("GlobalAveragePool", ["rs"], ["p"], name="pool"),
        helper.make_node("Flatten", ["p"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "wf", "bf"], ["logits"], name="fc"),
    ]
    return model(nodes, [tensor("x", ["n", 3, 8, 8])], [tensor("logits", ["n", 4])], inits)


@pytest.fixture
def cnn_files(tmp_path):
    proto = residual_cnn()
    path = save(proto, tmp_path / "cnn.onnx")
    x = randn(160, 3, 8, 8, seed=9)
    labels = np.argmax(ort_run(proto, {"x": x})[0], axis=1)
    calib = save_npz(tmp_path / "calib.npz", x=x[:120], labels=labels[:120])
    evaluation = save_npz(tmp_path / "eval.npz", x=x[120:], labels=labels[120:])
    return path, calib, evaluation, tmp_path


@pytest.mark.parametrize("method", ["magnitude", "woodfisher", "fishleg", "sparsegpt", "wanda"])
def test_channels_are_removed_physically_and_the_graph_is_kept(cnn_files, method):
    path, calib, evaluation, tmp = cnn_files
    out = tmp / f"{method}.onnx"
    report = prune(
        PruneConfig(
            input=path, output=out, sparsity=0.5, structure="channels", method=method, allocation="layer",
            calibration=calib, evaluation=evaluation, damp=0.01, speed_runs=3,
        )
    )  # fmt: skip
    original, written = onnx.load(str(path)), onnx.load(str(out))
    onnx.checker.check_model(written, full_check=True)
    assert written.ir_version == original.ir_version and written.opset_import == original.opset_import
    assert [(n.name, n.op_type, list(n.input), list(n.output)) for n in written.graph.node] == [
        (n.name, n.op_type, list(n.input), list(n.output)) for n in original.graph.node
    ]
    dims = {t.name: tuple(t.dims) for t in written.graph.initializer}
    ka, kb = dims["wa"][0], dims["wb"][0]  # channels kept by conv a and by the tied b/c pair
    assert dims["wa"] == (ka, 3, 3, 3) and dims["wb"] == (kb, ka, 3, 3) and dims["wc"] == (kb, ka, 1, 1)
    assert dims["wf"] == (kb, 4) and dims["bb"] == (kb,) and dims["bc"] == (kb,) and dims["bf"] == (4,)
    # layer allocation: both layers lose the same number of channels, give or take one, and
    # removing f of the channels of a producer and its consumer removes 1 - (1 - f)^2 of their
    # entries: half the 888 removable entries go with 2 or 3 of 8 channels
    assert ka in (5, 6) and kb in (5, 6)
    removed = (8 - ka) * 27 + (8 * 8 - kb * ka) * (9 + 1) + (8 - kb) * 4
    assert report.pruning.zeros == removed and abs(removed - 444) <= 107 / 2
    channels = report.pruning.channels
    assert report.pruning.structure == "channels"
    assert {row["node"]: (row["kept"], row["before"]) for row in channels["layers"]} == {
        "a": (ka, 8), "b": (kb, 8), "c": (kb, 8)
    }  # fmt: skip
    assert channels["left_in_place"] == [{"reason": "reaches the graph output 'logits'", "channels": 4}]
    # the smaller graph computes what the pruned torch model computed (checked in the run)
    assert report.schedule.torch_vs_onnxruntime_max_abs_error < 1e-4
    speed = report.speed
    assert speed.original.parameters - speed.output.parameters == removed + (8 - ka) + 2 * (8 - kb)  # and biases
    assert speed.output.layer_flops < speed.original.layer_flops and speed.runs == 3
    assert speed.output.file_bytes == out.stat().st_size


def test_the_cli_reports_channels_and_speed_in_json(cnn_files):
    path, calib, evaluation, tmp = cnn_files
    out = tmp / "cli.onnx"
    args = [str(path), str(out), "--sparsity", "0.4", "--structure", "channels", "--method", "magnitude"]
    args += ["--calib", str(calib), "--eval", str(evaluation), "--speed-runs", "2", "--json", "-q"]
    result = CliRunner().invoke(main, ["prune", *args])
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    jsonschema.Draft202012Validator(schema()).validate(document)
    assert document["pruning"]["structure"] == "channels" and document["pruning"]["channels"]["layers"]
    assert document["speed"]["original"]["latency"]["median_ms"] > 0 and document["speed"]["speedup"] > 0


def test_the_dry_run_shows_what_the_trace_found_and_writes_nothing(cnn_files):
    path, calib, _, tmp = cnn_files
    out = tmp / "dry.onnx"
    args = [str(path), str(out), "--sparsity", "0.5", "--structure", "channels", "--calib", str(calib)]
    result = CliRunner().invoke(main, ["prune", *args, "--dry-run", "--json", "-q"])
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    jsonschema.Draft202012Validator(schema()).validate(document)
    # conv a's 8 channels and the 8 tied channels of b and c; the Gemm's 4 are the graph output
    assert document["channels"]["classes"] == 16 and document["channels"]["layers_traced"] == 4
    assert document["channels"]["left_in_place"] == [{"reason": "reaches the graph output 'logits'", "channels": 4}]
    assert not out.exists()


def test_a_model_with_nothing_removable_stops_with_exit_2_and_writes_nothing(tmp_path):
    # one Gemm whose outputs are the graph's outputs: no channel can go
    proto = model(
        [helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="fc")],
        [tensor("x", ["n", 6])],
        [tensor("y", ["n", 3])],
        {"w": randn(6, 3, seed=1), "b": randn(3, seed=2)},
    )
    path = save(proto, tmp_path / "fc.onnx")
    out = tmp_path / "out.onnx"
    result = CliRunner().invoke(main, ["prune", str(path), str(out), "--sparsity", "0.5", "--structure", "channels"])
    assert result.exit_code == 2
    assert "no channel of fc.onnx can be removed" in result.output and "graph output 'y'" in result.output
    assert not out.exists() and not (tmp_path / "out.report.json").exists()


def test_structure_choices_come_from_the_registry_and_bad_combinations_say_what_to_do(cnn_files):
    path, calib, _, tmp = cnn_files
    assert STRUCTURES.names() == ("unstructured", "channels", "heads", "ffn")
    runner = CliRunner()
    result = runner.invoke(main, ["prune", str(path), str(tmp / "o.onnx"), "--sparsity", "0.5", "--structure", "rows"])
    assert result.exit_code == 2 and "unstructured" in result.output and "channels" in result.output
    common = [str(path), str(tmp / "o.onnx"), "--structure", "channels"]
    result = runner.invoke(main, ["prune", *common, "--sparsity", "0.5", "--pattern", "2:4"])
    assert result.exit_code == 2 and "--structure unstructured" in result.output
    result = runner.invoke(main, ["prune", *common, "--sparsity", "0.5", "--allocation", "magnitude"])
    assert result.exit_code == 2 and "global, layer" in result.output


def test_unstructured_runs_report_speed_with_dense_latency_and_a_smaller_compressed_file(cnn_files):
    path, calib, evaluation, tmp = cnn_files
    out = tmp / "unstructured.onnx"
    report = prune(
        PruneConfig(
            input=path, output=out, sparsity=0.8, method="magnitude", calibration=calib, evaluation=evaluation,
            speed_runs=2,
        )
    )  # fmt: skip
    speed = report.speed
    assert speed.original.parameters == speed.output.parameters  # same shapes
    assert speed.output.layer_flops == speed.original.layer_flops
    assert speed.output.nonzero_parameters < speed.original.nonzero_parameters
    assert speed.output.compressed_bytes < speed.original.compressed_bytes
    assert report.pruning.structure == "unstructured" and report.pruning.channels is None
    # hand-computed FLOPs at batch 1: conv a, conv b, conv c at 8x8, the Gemm
    assert speed.original.layer_flops == 2 * (64 * 8 * 27 + 64 * 8 * 72 + 64 * 8 * 8 + 4 * 8)
    w = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(out)).graph.initializer}
    assert speed.output.nonzero_parameters == sum(int(np.count_nonzero(a)) for a in w.values())


@pytest.mark.parametrize("arrays", ["shared", "copied"])
def test_a_structured_sweep_reports_the_measured_speed_up_of_every_point(cnn_files, monkeypatch, arrays):
    # the pruned values share the parameters' memory on the CPU and are copies on a GPU; taken
    # before the repair changed the weights, only the sharing hid it (on a GPU: exit 10)
    if arrays == "copied":
        shared = Pruner.arrays
        monkeypatch.setattr(Pruner, "arrays", lambda self: {k: v.copy() for k, v in shared(self).items()})
    path, calib, evaluation, tmp = cnn_files
    args = [str(path), "-o", str(tmp / "sweep"), "--sparsity", "0.3,0.6", "--method", "magnitude"]
    args += ["--structure", "channels"]
    args += ["--calib", str(calib), "--eval", str(evaluation), "--speed-runs", "2", "--json", "-q"]
    result = CliRunner().invoke(main, ["sweep", *args])
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    jsonschema.Draft202012Validator(schema()).validate(document)
    points = document["points"]
    assert [p["target_sparsity"] for p in points] == [0.3, 0.6]
    assert all(p["speedup"] > 0 for p in points)
    # more removed at 0.6 than at 0.3, each point's smaller graph checked against its torch model
    assert points[1]["sparsity"] > points[0]["sparsity"] > 0.2
    assert all(p["torch_vs_onnxruntime_max_abs_error"] < 1e-4 for p in points)
    assert (tmp / "sweep.sweep.png").exists()


def test_speed_counts_weights_held_in_constant_nodes_and_their_flops(tmp_path):
    # PaddlePaddle's form: the weight is a Constant node's value, the batch dimension symbolic
    weight = numpy_helper.from_array(randn(4, 2, 3, 3, seed=1), "w_value")
    proto = model(
        [
            helper.make_node("Constant", [], ["w"], name="w_const", value=weight),
            helper.make_node("Conv", ["x", "w"], ["y"], name="conv", pads=[1, 1, 1, 1]),
        ],
        [tensor("x", ["n", 2, 5, 5])],
        [tensor("y", ["n", 4, 5, 5])],
    )
    path = save(proto, tmp_path / "constant.onnx")
    f = footprint(path, {"x": randn(3, 2, 5, 5, seed=2)}, None)
    assert f.parameters == 4 * 2 * 9 and f.nonzero_parameters == 72
    assert f.layer_flops == 2 * (3 * 4 * 25) * (2 * 9)  # batch 3: every output element a dot of 18


def test_the_statistics_correction_gives_consumers_of_removed_channels_their_mean_back(tmp_path):
    # conv a's outputs are far from zero mean (bias +2 before the Relu): removing some of them
    # takes a large mean from conv b, which has no bias of its own
    inits = {
        "wa": randn(8, 3, 3, 3, seed=1) * 0.3,
        "ba": np.full(8, 2.0, dtype=np.float32),
        "wb": randn(8, 8, 3, 3, seed=3) * 0.2,
        "wf": randn(8, 4, seed=7),
        "bf": randn(4, seed=8),
    }
    nodes = [
        helper.make_node("Conv", ["x", "wa", "ba"], ["ya"], name="a", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["ya"], ["ra"], name="ra"),
        helper.make_node("Conv", ["ra", "wb"], ["yb"], name="b", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["yb"], ["rb"], name="rb"),
        helper.make_node("GlobalAveragePool", ["rb"], ["p"], name="pool"),
        helper.make_node("Flatten", ["p"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "wf", "bf"], ["logits"], name="fc"),
    ]
    proto = model(nodes, [tensor("x", ["n", 3, 8, 8])], [tensor("logits", ["n", 4])], inits)
    path = save(proto, tmp_path / "nobias.onnx")
    x = randn(200, 3, 8, 8, seed=9)
    labels = np.argmax(ort_run(proto, {"x": x})[0], axis=1)
    calib = save_npz(tmp_path / "calib.npz", x=x[:160], labels=labels[:160])
    evaluation = save_npz(tmp_path / "eval.npz", x=x[160:], labels=labels[160:])
    runs = {}
    for mode in ("mean", "off"):
        runs[mode] = prune(
            PruneConfig(
                input=path, output=tmp_path / f"{mode}.onnx", sparsity=0.4, structure="channels",
                method="magnitude", allocation="layer", calibration=calib, evaluation=evaluation,
                solve_weights=False, correct_statistics=mode, speed_runs=0,
            )
        )  # fmt: skip
    steps = runs["mean"].pruning.repair["steps"]
    assert [(s["addition"], s["kept"]) for s in steps] == [("statistics", True)]
    assert steps[0]["loss_after"] < steps[0]["loss_before"]
    written = onnx.load(str(tmp_path / "mean.onnx"))
    onnx.checker.check_model(written, full_check=True)
    b = next(n for n in written.graph.node if n.name == "b")
    dims = {t.name: tuple(t.dims) for t in written.graph.initializer}
    assert len(b.input) == 3 and dims[b.input[2]] == (dims["wb"][0],)  # the added bias, cut to b's kept outputs
    assert dims["wb"][0] < 8 and dims["wa"][0] < 8
    # the written file computes what the corrected torch model computed (no exit 10), and is closer to dense
    mean, off = (runs[m].validation.outputs[0] for m in ("mean", "off"))
    assert mean.cosine > off.cosine


@pytest.mark.parametrize("structure", STRUCTURES.names())
def test_every_structure_kind_prunes_an_attention_block_end_to_end(tmp_path, structure):
    """The registry's contract: each kind prunes through the whole pipeline (torch conversion,
    pruning, writing, validation in onnxruntime), keeps the graph's nodes, names and opsets, and
    removes exactly what it names: whole heads for `heads`, FFN neurons and projection channels
    for `ffn`, both for `channels`, zeros in unchanged shapes for `unstructured`."""
    proto = attention_block(ffn=True, batch="n")
    path = save(proto, tmp_path / "attention.onnx")
    x = randn(96, 4, 6, seed=3)
    calib = save_npz(tmp_path / "calib.npz", x=x[:64])
    evaluation = save_npz(tmp_path / "eval.npz", x=x[64:])
    out = tmp_path / "out.onnx"
    report = prune(
        PruneConfig(
            input=path, output=out, sparsity=0.5, method="magnitude", structure=structure, calibration=calib,
            evaluation=evaluation, speed_runs=0,
        )
    )  # fmt: skip
    written = onnx.load(str(out))
    onnx.checker.check_model(written, full_check=True)
    assert [(n.name, n.op_type) for n in written.graph.node] == [(n.name, n.op_type) for n in proto.graph.node]
    assert written.opset_import == proto.opset_import and written.ir_version == proto.ir_version
    before = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    after = {t.name: numpy_helper.to_array(t) for t in written.graph.initializer}
    changed = {name for name in before if after[name].shape != before[name].shape}
    assert report.pruning.structure == structure
    heads_gone = 6 - after["wq"].shape[1]
    assert heads_gone % 2 == 0  # a head is removed whole: its 2 channels of Q, K and V
    assert after["wq"].shape == after["wk"].shape == after["wv"].shape
    if structure == "unstructured":
        assert not changed and (after["w1"] == 0).any()
    elif structure == "heads":
        assert heads_gone > 0 and changed == {"wq", "wk", "wv", "bq", "bk", "bv", "wo"}
    elif structure == "ffn":
        assert heads_gone == 0 and changed and not changed & {"wq", "wk", "wv"}
    else:
        assert heads_gone > 0 and {"w1", "w2"} & changed
    # the head count written in two of the splits, and the merged width, follow the heads kept
    kept_width = after["wq"].shape[1]
    assert after["shape_q"][2] == after["shape_v"][2] == kept_width // 2 and after["merge"][2] == kept_width


@pytest.mark.parametrize("structure, code", [("channels", 10), ("unstructured", 1)])
def test_a_written_model_onnxruntime_cannot_run_is_our_error_not_the_data_and_nothing_stays(
    cnn_files, monkeypatch, structure, code
):
    from onnxprune import compare
    from onnxprune.errors import CalibrationDataError

    path, calib, evaluation, tmp = cnn_files
    out = tmp / "broken.onnx"

    class BrokenWrittenModel(compare.OrtModel):
        def run(self, dataset, specs, batch_size, limit=None):
            if self.path != path:  # the original still runs: only what we wrote breaks
                raise CalibrationDataError(
                    "onnxruntime rejected the data from eval.npz on broken.onnx: shape (8) != (6)"
                )
            return super().run(dataset, specs, batch_size, limit)

    monkeypatch.setattr(compare, "OrtModel", BrokenWrittenModel)
    arguments = ["prune", str(path), str(out), "--sparsity", "0.5", "--structure", structure]
    result = CliRunner().invoke(main, [*arguments, "--calib", str(calib), "--eval", str(evaluation)])
    assert result.exit_code == code, result.output
    assert "the pruned model fails in onnxruntime where the original ran" in result.output
    assert ("channel trace missed" in result.output) == (structure == "channels")
    assert not out.exists() and not (tmp / "broken.report.json").exists()
    assert not [p for p in tmp.iterdir() if p.name.startswith(".") or "broken" in p.name]
