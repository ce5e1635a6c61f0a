"""The command line end to end: exit codes, reports, exact sparsity, the gate, files left alone."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx import helper, numpy_helper

from onnxprune.masks import prune_count
from onnxprune_cli.main import main

from builders import model, ort_run, randn, save, save_npz, tensor


def run_cli(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_report(path: Path) -> dict:
    return json.loads(path.read_text())


def written(path: Path) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


# ------------------------------------------------------------------------------ success


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_prunes_to_the_exact_target_and_matches_its_own_report(mlp_files, scope):
    path, calib, evaluation, tmp = mlp_files
    before = sha(path)
    # the statistics correction (on by default) shifts the biases of the layers it corrects
    # (tests/test_repair.py): off here, where every tensor but the pruned ones must stay as it was
    result = run_cli(
        path, tmp / "out.onnx", "--sparsity", "0.7", "--scope", scope, "--calib", calib, "--eval", evaluation,
        "--correct-statistics", "off", "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report == load_report(tmp / "out.report.json")
    assert sha(path) == before

    tensors = written(tmp / "out.onnx")
    sizes = {"w1": 240, "w2": 384, "w3": 80}
    zeros = {name: int((tensors[name] == 0).sum()) for name in sizes}
    if scope == "global":
        assert sum(zeros.values()) == prune_count(sum(sizes.values()), 0.7)
    else:
        assert zeros == {name: prune_count(n, 0.7) for name, n in sizes.items()}
    rows = {row["name"]: row for row in report["pruning"]["tensors"]}
    assert {name: rows[name]["zeros"] for name in sizes} == zeros
    assert report["pruning"]["zeros"] == sum(zeros.values())
    # biases untouched, bit for bit
    original = written(path)
    assert original["b1"].tobytes() == tensors["b1"].tobytes()
    assert report["validation"]["accuracy_before"] == 1.0
    assert report["exit_code"] == 0 and report["schema_version"] == 1
    assert report["conversion"]["max_abs_error"] < 1e-4


def test_written_model_keeps_graph_names_opsets_ir_and_matches_masked_weights(mlp_files):
    path, calib, evaluation, tmp = mlp_files
    result = run_cli(path, tmp / "out.onnx", "--sparsity", "0.5", "--method", "magnitude", "--eval", evaluation)
    assert result.exit_code == 0, result.stderr
    a, b = onnx.load(str(path)), onnx.load(str(tmp / "out.onnx"))
    assert (b.ir_version, list(b.opset_import)) == (a.ir_version, list(a.opset_import))
    assert list(b.graph.node) == list(a.graph.node)
    assert [t.name for t in b.graph.initializer] == [t.name for t in a.graph.initializer]
    # every surviving weight is the original value exactly, and (global magnitude) every pruned
    # weight is no larger than any survivor
    old_tensors, new_tensors = written(path), written(tmp / "out.onnx")
    for name, new in new_tensors.items():
        assert np.array_equal(new[new != 0], old_tensors[name][new != 0])
    weights = ["w1", "w2", "w3"]
    dropped = np.concatenate([np.abs(old_tensors[n][new_tensors[n] == 0]) for n in weights])
    kept = np.concatenate([np.abs(old_tensors[n][new_tensors[n] != 0]) for n in weights])
    assert dropped.size == prune_count(240 + 384 + 80, 0.5) and dropped.max() <= kept.min()


def test_sparsity_zero_reproduces_the_original_outputs_exactly(mlp_files):
    path, calib, evaluation, tmp = mlp_files
    result = run_cli(path, tmp / "out.onnx", "--sparsity", "0", "--eval", evaluation)
    assert result.exit_code == 0, result.stderr
    x = np.load(evaluation)["x"]
    assert ort_run(tmp / "out.onnx", {"x": x})[0].tobytes() == ort_run(path, {"x": x})[0].tobytes()
    assert all(written(path)[k].tobytes() == v.tobytes() for k, v in written(tmp / "out.onnx").items())
    report = load_report(tmp / "out.report.json")
    assert report["validation"]["outputs"][0]["max_abs_error"] == 0.0
    assert report["validation"]["top1_agreement"] == 1.0


def test_exclude_leaves_matching_weights_dense(mlp_files):
    path, calib, evaluation, tmp = mlp_files
    result = run_cli(path, tmp / "out.onnx", "--sparsity", "0.6", "--exclude", "^head$", "--eval", evaluation)
    assert result.exit_code == 0, result.stderr
    assert written(tmp / "out.onnx")["w3"].tobytes() == written(path)["w3"].tobytes()
    report = load_report(tmp / "out.report.json")
    assert report["pruning"]["excluded"] == ["w3"]
    assert report["pruning"]["zeros"] == prune_count(240 + 384, 0.6)


def test_without_any_data_it_synthesizes_and_says_so(mlp_files):
    path, _, _, tmp = mlp_files
    result = run_cli(path, tmp / "out.onnx", "--sparsity", "0.5")
    assert result.exit_code == 0, result.stderr
    assert "synthetic" in result.stderr
    report = load_report(tmp / "out.report.json")
    assert report["evaluation"]["synthetic"] is True
    assert any("synthetic" in w for w in report["warnings"])


def test_calib_without_eval_holds_out_a_quarter(mlp_files):
    path, calib, _, tmp = mlp_files
    assert run_cli(path, tmp / "out.onnx", "--sparsity", "0.5", "--calib", calib).exit_code == 0
    assert load_report(tmp / "out.report.json")["evaluation"]["samples"] == 50


# ------------------------------------------------------------------------------ the gate


def test_max_drop_gate_passes_and_fails_with_output_and_report_written(mlp_files):
    path, calib, evaluation, tmp = mlp_files
    ok = run_cli(path, tmp / "ok.onnx", "--sparsity", "0.3", "--eval", evaluation, "--max-drop", "1.0")
    assert ok.exit_code == 0, ok.stderr
    assert load_report(tmp / "ok.report.json")["gate"]["passed"] is True

    bad = run_cli(path, tmp / "bad.onnx", "--sparsity", "0.9", "--eval", evaluation, "--max-drop", "0.0")
    assert bad.exit_code == 6, bad.stderr
    report = load_report(tmp / "bad.report.json")
    assert report["gate"]["passed"] is False and report["gate"]["metric"] == "accuracy"
    assert report["gate"]["drop"] > 0 and report["exit_code"] == 6
    assert (tmp / "bad.onnx").exists()
    assert "FAILED" in bad.stderr


# ------------------------------------------------------------------------------ exit codes


def test_exit_2_usage_errors(mlp_files):
    path, _, _, tmp = mlp_files
    assert run_cli(path, tmp / "o.onnx", "--sparsity", "1.5").exit_code == 2
    assert run_cli(path, tmp / "o.onnx", "--sparsity", "-0.1").exit_code == 2
    assert run_cli(path, tmp / "o.onnx", "--sparsity", "0.5", "--method", "nope").exit_code == 2
    same = run_cli(path, path, "--sparsity", "0.5")
    assert same.exit_code == 2 and "is the input model" in same.stderr
    (tmp / "exists.onnx").write_bytes(b"keep me")
    exists = run_cli(path, tmp / "exists.onnx", "--sparsity", "0.5")
    assert exists.exit_code == 2 and "--force" in exists.stderr
    assert (tmp / "exists.onnx").read_bytes() == b"keep me"
    assert run_cli(path, tmp / "exists.onnx", "--sparsity", "0.5", "--force").exit_code == 0
    bad_regex = run_cli(path, tmp / "r.onnx", "--sparsity", "0.5", "--exclude", "(")
    assert bad_regex.exit_code == 2 and "regular expression" in bad_regex.stderr
    mix = run_cli(path, tmp / "m.onnx", "--sparsity", "0.5", "--method", "combined", "--mix", "2")
    assert mix.exit_code == 2 and "not in [0, 1]" in mix.stderr and not (tmp / "m.onnx").exists()
    rounds = run_cli(path, tmp / "m.onnx", "--sparsity", "0.5", "--repair-rounds", "0")
    assert rounds.exit_code == 2 and "--repair-rounds" in rounds.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_exit_2_cuda_requested_without_a_gpu(mlp_files):
    path, _, _, tmp = mlp_files
    result = run_cli(path, tmp / "o.onnx", "--sparsity", "0.5", "--device", "cuda")
    assert result.exit_code == 2 and "no usable CUDA device" in result.stderr
    assert not (tmp / "o.onnx").exists()


def test_exit_3_not_an_onnx_file(tmp_path):
    (tmp_path / "junk.onnx").write_bytes(b"this is not a protobuf \xff\xff\xff")
    result = run_cli(tmp_path / "junk.onnx", tmp_path / "o.onnx", "--sparsity", "0.5")
    assert result.exit_code == 3 and "not an ONNX model" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "o.onnx").exists()


def test_exit_4_unsupported_operator_lists_what_is_missing(tmp_path):
    m = model(
        [helper.make_node("MatMul", ["x", "w"], ["a"]), helper.make_node("Hardmax", ["a"], ["y"], name="hm")],
        [tensor("x", ["n", 3])],
        [tensor("y", ["n", 3])],
        {"w": randn(3, 3)},
    )
    path = save(m, tmp_path / "m.onnx")
    result = run_cli(path, tmp_path / "o.onnx", "--sparsity", "0.5")
    assert result.exit_code == 4
    assert "Hardmax (ai.onnx, opset 17) x1" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "o.onnx").exists()


def test_exit_5_bad_calibration_data(mlp_files):
    path, _, _, tmp = mlp_files
    bad = save_npz(tmp / "bad.npz", x=np.zeros((4, 7), np.float32))
    result = run_cli(path, tmp / "o.onnx", "--sparsity", "0.5", "--calib", bad)
    assert result.exit_code == 5 and "bad.npz" in result.stderr and "should be 10, is 7" in result.stderr
    assert not (tmp / "o.onnx").exists()


def test_exit_7_non_finite_weights(tmp_path):
    w = randn(4, 3)
    w[1, 2] = np.nan
    m = model(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
        [tensor("x", ["n", 4])],
        [tensor("y", ["n", 3])],
        {"w": w},
    )
    path = save(m, tmp_path / "m.onnx")
    result = run_cli(path, tmp_path / "o.onnx", "--sparsity", "0.5")
    assert result.exit_code == 7 and "'w'" in result.stderr and "NaN" in result.stderr
    assert not (tmp_path / "o.onnx").exists() and not (tmp_path / "o.report.json").exists()


def test_exit_1_internal_error_is_one_line_without_traceback(mlp_files, monkeypatch):
    path, _, evaluation, tmp = mlp_files

    def broken(*args, **kwargs):
        raise RuntimeError("simulated bug")

    monkeypatch.setattr("onnxprune.pipeline.write_back", broken)
    result = run_cli(path, tmp / "o.onnx", "--sparsity", "0.5", "--eval", evaluation)
    assert result.exit_code == 1
    assert "internal error: RuntimeError: simulated bug" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp / "o.onnx").exists()


def test_installed_command_keeps_stdout_for_json_only(mlp_files):
    path, calib, evaluation, tmp = mlp_files
    command = Path(sys.executable).with_name("onnxprune")
    done = subprocess.run(
        [str(command), str(path), str(tmp / "o.onnx"), "--sparsity", "0.5", "--eval", str(evaluation), "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)  # exactly one JSON document, nothing else
    assert report["pruning"]["target_sparsity"] == 0.5
    assert "pruned tensor" in done.stderr


def test_injection_names_through_the_command_nothing_runs_and_names_survive(tmp_path):
    marker = tmp_path / "pwned"
    payload = 'training"), getattr(__import__("os"), "system")("touch ' + str(marker) + '"), getattr(self, "training'
    m = model(
        [
            helper.make_node("MatMul", ["x", payload + "w"], [payload + "h"], name=payload),
            helper.make_node("Relu", [payload + "h"], ["y"], name=payload + "relu"),
        ],
        [tensor("x", ["n", 6])],
        [tensor("y", ["n", 6])],
        {payload + "w": randn(6, 6)},
        name=payload,
    )
    path = save(m, tmp_path / "m.onnx")
    result = run_cli(path, tmp_path / "o.onnx", "--sparsity", "0.5")
    assert result.exit_code == 0, result.stderr
    assert not marker.exists()
    out = onnx.load(str(tmp_path / "o.onnx"))
    assert [n.name for n in out.graph.node] == [payload, payload + "relu"]
    assert out.graph.initializer[0].name == payload + "w"
    assert int((numpy_helper.to_array(out.graph.initializer[0]) == 0).sum()) == 18


def test_metric_choice_is_checked_against_the_data_before_writing(mlp_files):
    path, calib, evaluation, tmp = mlp_files
    unlabelled = save_npz(tmp / "unlabelled.npz", x=np.load(evaluation)["x"])
    result = run_cli(path, tmp / "o.onnx", "--sparsity", "0.5", "--eval", unlabelled, "--metric", "accuracy")
    assert result.exit_code == 2 and "needs a classifier output and integer class labels" in result.stderr
    assert not (tmp / "o.onnx").exists()
    cosine = run_cli(
        path, tmp / "c.onnx", "--sparsity", "0.5", "--eval", evaluation, "--metric", "cosine", "--max-drop", "1"
    )
    assert cosine.exit_code == 0
    report = load_report(tmp / "c.report.json")
    assert report["validation"]["quality"]["metric"] == "cosine" == report["gate"]["metric"]
    assert report["validation"]["quality"]["after"] == report["validation"]["outputs"][0]["cosine"]


def test_gradual_with_finetuning_from_the_command_line(mlp_files):
    path, calib, evaluation, folder = mlp_files
    out = folder / "gradual.onnx"
    result = run_cli(
        path, out, "--sparsity", "0.8", "--method", "fishleg", "--schedule", "gradual", "--prune-steps", "3",
        "--finetune-steps", "9", "--lr", "1e-3", "--num-grads", "16", "--fishleg-steps", "10",
        "--calib", calib, "--eval", evaluation, "--json", "-q",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["schedule"]["name"] == "gradual" and len(report["schedule"]["sparsities"]) == 3
    assert report["schedule"]["finetune_steps"] == [3, 3, 3]
    assert report["finetune"]["steps"] == 9
    assert len(report["fisher"]["estimator"]["auxiliary_loss"]) == 10 + 2 * 20  # first + two online updates
    assert report["schedule"]["torch_vs_onnxruntime_max_abs_error"] < 1e-4
    assert not (folder / "gradual.onnx.ckpt").exists()
    written = onnx.load(out)
    pruned = sum(
        int((numpy_helper.to_array(t) == 0).sum()) for t in written.graph.initializer if t.name.startswith("w")
    )
    total = sum(numpy_helper.to_array(t).size for t in written.graph.initializer if t.name.startswith("w"))
    assert pruned == prune_count(total, 0.8)


def test_resume_without_a_checkpoint_is_a_usage_error(mlp_files):
    path, calib, _, folder = mlp_files
    result = run_cli(
        path, folder / "o.onnx", "--sparsity", "0.5", "--schedule", "gradual", "--resume", "--calib", calib
    )
    assert result.exit_code == 2
    assert "no checkpoint" in result.output and not (folder / "o.onnx").exists()
