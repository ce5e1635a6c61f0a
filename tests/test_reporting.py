"""What pipelines and people read: the JSON schema, clean stdout, the dry run, --version, the
Python API, the HTML page and the sweep."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import zlib
from dataclasses import replace
from pathlib import Path

import jsonschema
import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper
from test_cli import load_report, run_cli

import onnxprune
from onnxprune.report import SCHEMA_VERSION, schema
from onnxprune.reporting import compressed_size
from onnxprune.sweeps import SweepConfig, format_sweep, sweep
from onnxprune.validate import error_distribution

from builders import model, randn, save, save_npz, tensor

MODELS = Path(__file__).resolve().parents[1] / "models"
COMMAND = Path(sys.executable).with_name("onnxprune")


def validator() -> jsonschema.Draft202012Validator:
    document = schema()
    jsonschema.Draft202012Validator.check_schema(document)
    return jsonschema.Draft202012Validator(document)


def problems(document: dict) -> list[str]:
    """Every schema violation, including those under the branches of the top-level oneOf."""
    messages = []
    for error in validator().iter_errors(document):
        messages += [error.message] + [inner.message for inner in error.context or ()]
    return messages


# ------------------------------------------------------------------------------ schema


def test_schema_version_is_the_one_the_reports_carry():
    defs = schema()["$defs"]
    for kind in ("Report", "DryRun", "SweepReport"):
        assert defs[kind]["properties"]["schema_version"]["const"] == SCHEMA_VERSION


def test_reports_of_every_kind_validate_against_the_schema_and_broken_ones_do_not(mlp_files):
    path, calib, evaluation, tmp = mlp_files
    plain = run_cli(path, tmp / "plain.onnx", "--sparsity", "0.5", "--method", "magnitude", "--eval", evaluation)
    assert plain.exit_code == 0, plain.stderr
    full = run_cli(
        path, tmp / "full.onnx", "--sparsity", "0.6", "--method", "woodfisher", "--calib", calib, "--eval", evaluation,
        "--num-grads", "16", "--finetune-steps", "4", "--max-drop", "1", "--schedule", "gradual", "--prune-steps", "2",
    )  # fmt: skip
    assert full.exit_code == 0, full.stderr
    dry = run_cli(path, tmp / "dry.onnx", "--sparsity", "0.5", "--calib", calib, "--dry-run", "--json")
    assert dry.exit_code == 0, dry.stderr
    swept = run_cli("sweep", path, "--sparsity", "0.3,0.6", "--method", "magnitude", "--eval", evaluation,
                    "-o", tmp / "grid", "--json")  # fmt: skip
    assert swept.exit_code == 0, swept.stderr

    plain_report, full_report = load_report(tmp / "plain.report.json"), load_report(tmp / "full.report.json")
    assert plain_report["fisher"] is None and plain_report["finetune"] is None and plain_report["gate"] is None
    assert full_report["fisher"] is not None and full_report["finetune"] is not None and full_report["gate"]
    for document in (plain_report, full_report, json.loads(dry.stdout), json.loads(swept.stdout)):
        assert problems(document) == []

    missing = dict(full_report)
    del missing["pruning"]
    assert any("'pruning' is a required property" in p for p in problems(missing))
    wrong = json.loads(json.dumps(full_report))
    wrong["pruning"]["sparsity"] = "0.6"
    assert problems(wrong)
    unknown = dict(plain_report, surprise=1)
    assert problems(unknown)


def test_installed_command_json_is_one_document_even_when_onnxruntime_prints(mlp_files, tmp_path):
    """onnxruntime's Python wrapper print()s (e.g. on provider fallback) and its C++ side can
    write to fd 1; a sitecustomize makes both happen in every session and every run."""
    path, calib, evaluation, tmp = mlp_files
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(
        "import os\n"
        "import onnxruntime\n"
        "_init, _run = onnxruntime.InferenceSession.__init__, onnxruntime.InferenceSession.run\n"
        "def __init__(self, *a, **k):\n"
        "    print('EP Error: simulated provider failure; Falling back to CPUExecutionProvider')\n"
        "    os.write(1, b'[W:onnxruntime] simulated native warning\\n')\n"
        "    _init(self, *a, **k)\n"
        "def run(self, *a, **k):\n"
        "    print('simulated print during run')\n"
        "    return _run(self, *a, **k)\n"
        "onnxruntime.InferenceSession.__init__, onnxruntime.InferenceSession.run = __init__, run\n"
    )
    env = dict(os.environ, PYTHONPATH=f"{hooks}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    args = [str(COMMAND), str(path), str(tmp / "o.onnx"), "--sparsity", "0.9", "--eval", str(evaluation)]
    done = subprocess.run([*args, "--json", "--max-drop", "0"], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 6, done.stderr  # the gate fails: still exactly one JSON document on stdout
    assert "simulated provider failure" in done.stderr and "simulated native warning" in done.stderr
    assert "simulated print during run" in done.stderr
    report = json.loads(done.stdout)
    assert report["exit_code"] == 6 and report["gate"]["passed"] is False
    assert problems(report) == []


# ------------------------------------------------------------------------------ dry run, version, API


def test_dry_run_lists_the_tensors_and_memory_and_writes_nothing(mlp_files):
    path, calib, evaluation, tmp = mlp_files
    before = sorted(p.name for p in tmp.iterdir())
    result = run_cli(path, tmp / "o.onnx", "--sparsity", "0.5", "--calib", calib, "--dry-run", "--json")
    assert result.exit_code == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["kind"] == "dry-run" and plan["method"] == "woodfisher"
    assert [t["name"] for t in plan["tensors"]] == ["w1", "w2", "w3"]
    assert plan["params"] == 24 * 10 + 24 * 16 + 16 * 5 and plan["params_to_prune"] == round(0.5 * plan["params"])
    assert plan["memory"]["fits"] is True and plan["memory"]["estimate_bytes"] > 0
    assert "would be pruned" in result.stderr
    assert sorted(p.name for p in tmp.iterdir()) == before

    tight = run_cli(path, tmp / "o.onnx", "--sparsity", "0.5", "--calib", calib, "--dry-run", "--max-memory", "1e-6")
    assert tight.exit_code == 8 and "would fail (exit 8)" in tight.stderr and "--max-memory" in tight.stderr
    assert sorted(p.name for p in tmp.iterdir()) == before


def test_version_names_the_libraries_and_onnxruntime_providers():
    result = run_cli("--version")
    assert result.exit_code == 0
    import onnx as onnx_module
    import torch

    assert f"torch {torch.__version__}" in result.stdout and f"onnx {onnx_module.__version__}" in result.stdout
    assert "CPUExecutionProvider" in result.stdout and "onnxprune 0.1.0" in result.stdout


def test_python_api_takes_the_command_line_arguments_as_keywords(mlp_files):
    path, calib, evaluation, tmp = mlp_files
    report = onnxprune.prune(path, tmp / "api.onnx", sparsity=0.5, method="magnitude", evaluation=evaluation)
    assert isinstance(report, onnxprune.Report) and report.exit_code == 0
    assert report.pruning.zeros == round(0.5 * report.pruning.params)
    assert load_report(tmp / "api.report.json")["pruning"]["zeros"] == report.pruning.zeros
    config = onnxprune.PruneConfig(input=path, output=tmp / "x.onnx", sparsity=0.5)
    with pytest.raises(onnxprune.UsageError, match="either a PruneConfig"):
        onnxprune.prune(config, sparsity=0.7)
    with pytest.raises(onnxprune.UsageError, match="unknown estimator 'nope'; valid: .*woodfisher"):
        onnxprune.prune(path, tmp / "y.onnx", sparsity=0.5, method="nope")


# ------------------------------------------------------------------------------ report pieces


def test_error_distribution_by_hand():
    reference = np.zeros((3, 2))
    candidate = np.array([[0.1, -0.3], [0.0, 0.0], [2.0, 1.0]])
    d = error_distribution("y", reference, candidate, bins=4)
    # per-sample max abs error: 0.3, 0, 2 (spans less than 100x: linear bins over the positive ones)
    assert d.quantiles["max"] == 2.0 and d.quantiles["p50"] == pytest.approx(0.3)
    assert d.bin_edges[0] == pytest.approx(0.3) and d.bin_edges[-1] == pytest.approx(2.0)
    assert sum(d.counts) == 3 and d.counts[0] == 2 and d.counts[-1] == 1  # the 0 is clipped into the first bin


def test_compressed_size_is_zlib_level_1_of_the_files(tmp_path):
    data = np.zeros(100_000, dtype=np.float32).tobytes() + randn(1000).tobytes()
    (tmp_path / "a.bin").write_bytes(data)
    assert compressed_size([tmp_path / "a.bin"]) == len(zlib.compress(data, 1))
    assert compressed_size([tmp_path / "a.bin"], chunk=4096) == len(zlib.compress(data, 1))
    assert compressed_size([tmp_path / "a.bin"]) < len(data) / 10


def hostile_model(tmp_path: Path) -> tuple[Path, Path]:
    """A classifier whose node and tensor names are HTML."""
    name = "<script>alert('x')</script>&w"
    m = model(
        [helper.make_node("Gemm", ["x", name], ["logits"], name="<img src=x onerror=alert(1)>", transB=1)],
        [tensor("x", ["N", 6])],
        [tensor("logits", ["N", 3])],
        {name: randn(3, 6, seed=3)},
    )
    return save(m, tmp_path / "m.onnx"), save_npz(tmp_path / "e.npz", x=randn(40, 6, seed=4))


def test_html_report_is_self_contained_and_escapes_names(tmp_path):
    path, evaluation = hostile_model(tmp_path)
    out = tmp_path / "o.onnx"
    result = run_cli(path, out, "--sparsity", "0.5", "--method", "magnitude", "--eval", evaluation,
                     "--html", tmp_path / "page.html")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    page = (tmp_path / "page.html").read_text()
    assert "<script>" not in page and "<img src=x" not in page
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;&amp;w" in page
    assert page.count("src='data:image/png;base64,") >= 2  # sparsity bars, error histogram
    assert "http://" not in page and "https://" not in page  # nothing to fetch
    report = load_report(tmp_path / "o.report.json")
    assert report["html_path"] == str(tmp_path / "page.html")
    for needle in ("Per-tensor sparsity", "Models", "Conversion check", "Timings", "Environment", "top-1 agreement"):
        assert needle in page
    assert f"{report['pruning']['sparsity']:.4f}" in page


@pytest.mark.slow
def test_html_report_renders_in_headless_chromium(tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    out = tmp_path / "demo.onnx"
    result = run_cli(MODELS / "mnist_cnn.onnx", out, "--sparsity", "0.8", "--method", "magnitude",
                     "--calib", MODELS / "mnist_calib.npz", "--eval", MODELS / "mnist_eval.npz",
                     "--html", tmp_path / "page.html")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    shot = tmp_path / "shot.png"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run(
            [browser, *flags, f"--user-data-dir={profile}", "--window-size=1200,2400", f"--screenshot={shot}",
             (tmp_path / "page.html").as_uri()],
            capture_output=True, timeout=120, check=True,
        )  # fmt: skip
    import matplotlib.image

    pixels = matplotlib.image.imread(str(shot))
    assert pixels.shape[:2] == (2400, 1200)
    # a rendered page, not a blank one: text and figures give many distinct colours
    assert len(np.unique(pixels.reshape(-1, pixels.shape[-1])[::97], axis=0)) > 50


# ------------------------------------------------------------------------------ sweep


def test_sweep_on_the_demo_model_reuses_scores_and_matches_single_runs(tmp_path):
    settings = onnxprune.PruneConfig(
        input=MODELS / "mnist_cnn.onnx",
        output=tmp_path / "cnn.onnx",
        sparsity=0.9,
        calibration=MODELS / "mnist_calib.npz",
        evaluation=MODELS / "mnist_eval.npz",
        num_grads=32,
    )
    grid = SweepConfig(settings, sparsities=(0.9, 0.5), methods=("magnitude", "woodfisher"), keep_models=True)
    report = sweep(grid)
    assert [(p.method, p.target_sparsity) for p in report.points] == [
        ("magnitude", 0.5), ("magnitude", 0.9), ("woodfisher", 0.5), ("woodfisher", 0.9)
    ]  # fmt: skip
    assert all(r.scores_reused for r in report.methods)
    assert all(abs(p.sparsity - p.target_sparsity) < 1e-5 for p in report.points)
    assert report.metric == "accuracy" and all(p.before == pytest.approx(0.956) for p in report.points)
    assert Path(report.plot_path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert problems(json.loads(Path(report.report_path).read_text())) == []

    # a sweep point is the same model a single run writes (scores computed once, then reused)
    for method in ("magnitude", "woodfisher"):
        config = grid.point(method, 0.9)
        alone = onnxprune.prune(replace(config, output=tmp_path / f"alone-{method}.onnx"))
        swept = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(config.output)).graph.initializer}
        written = {
            t.name: numpy_helper.to_array(t)
            for t in onnx.load(str(tmp_path / f"alone-{method}.onnx")).graph.initializer
        }
        assert swept.keys() == written.keys()
        for name in swept:
            np.testing.assert_array_equal(swept[name], written[name], err_msg=f"{method} {name}")
        assert report.value(method, 0.9) == alone.validation.quality.after
        point = next(p for p in report.points if p.method == method and p.target_sparsity == 0.9)
        # auto's choice, made once at the highest sparsity; never per layer on this CNN (its held-out
        # loss is ten times the others')
        assert point.allocation == alone.pruning.allocation != "layer"
    chosen = next(p.allocation for p in report.points if p.method == "woodfisher")
    assert f"woodfisher: scores reused across sparsities; {chosen} allocation" in format_sweep(report)
    wf, mag = report.value("woodfisher", 0.9), report.value("magnitude", 0.9)
    assert wf > mag  # the point of second-order scores at high sparsity (0.94 vs 0.92 here)


def test_sweep_with_several_steps_runs_each_point_and_leaves_only_its_files(mlp_files):
    path, calib, evaluation, tmp = mlp_files
    out = tmp / "grid"
    out.mkdir()
    settings = onnxprune.PruneConfig(input=path, output=out / "m.onnx", sparsity=0.6, evaluation=evaluation, steps=2)
    report = sweep(SweepConfig(settings, sparsities=(0.3, 0.6), methods=("magnitude",)))
    assert [r.scores_reused for r in report.methods] == [False]
    assert [p.target_sparsity for p in report.points] == [0.3, 0.6]
    assert all(abs(p.sparsity - p.target_sparsity) <= 0.5 / 704 for p in report.points)  # to the nearest weight
    assert sorted(p.name for p in out.iterdir()) == ["m.sweep.json", "m.sweep.png"]  # no checkpoint, no model
