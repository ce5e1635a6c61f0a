"""Hostile input: mutated ONNX files through the whole command, and determinism.

Every mutant must end with a documented exit code (never 1, the internal-error code), print no
traceback, finish within a time limit, and write nothing but the output and its report.
"""

from __future__ import annotations

import errno
import hashlib
import os
import signal
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper
from test_cli import run_cli

from onnxprune import onnx_io

from builders import model, randn, save, save_npz, tensor

DOCUMENTED = {0, 2, 3, 4, 5, 6, 7, 8, 9}
FUZZ_RUNS = int(os.environ.get("ONNXPRUNE_FUZZ_RUNS", "200"))
SECONDS_PER_RUN = 60


def base_model() -> onnx.ModelProto:
    return model(
        [
            helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="fc1", transB=1),
            helper.make_node("Relu", ["h"], ["r"], name="relu"),
            helper.make_node("MatMul", ["r", "w2"], ["logits"], name="head"),
        ],
        [tensor("x", ["N", 6])],
        [tensor("logits", ["N", 3])],
        {"w1": randn(8, 6, seed=1), "b1": randn(8, seed=2), "w2": randn(8, 3, seed=3)},
    )


# ------------------------------------------------------------------------------ mutations


def flip_bytes(data: bytes, rng: np.random.Generator) -> bytes:
    out = bytearray(data)
    for _ in range(int(rng.integers(1, 12))):
        i = int(rng.integers(len(out)))
        out[i] ^= int(rng.integers(1, 256))
    return bytes(out)


def truncate(data: bytes, rng: np.random.Generator) -> bytes:
    return data[: int(rng.integers(0, len(data)))]


def structural(proto: onnx.ModelProto, rng: np.random.Generator) -> bytes:
    """One edit a broken exporter or an attacker could make, on a parsed copy."""
    m = onnx.ModelProto()
    m.CopyFrom(proto)
    g = m.graph
    node = g.node[int(rng.integers(len(g.node)))]
    init = g.initializer[int(rng.integers(len(g.initializer)))]
    edit = int(rng.integers(14))
    if edit == 0:
        del node.input[int(rng.integers(len(node.input)))]
    elif edit == 1:
        node.op_type = rng.choice(["Conv", "Foo", "", "Gemm", "MatMul", "If", "Loop"])
    elif edit == 2:
        node.input[int(rng.integers(len(node.input)))] = rng.choice(["missing", "", "x", "logits", "h"])
    elif edit == 3:
        g.initializer.remove(init)
    elif edit == 4:
        init.dims[int(rng.integers(len(init.dims)))] = int(rng.choice([0, -1, 7, 10**12]))
    elif edit == 5:
        init.raw_data = init.raw_data[: int(rng.integers(len(init.raw_data)))]
    elif edit == 6:
        init.data_type = int(rng.choice([0, 2, 7, 8, 11, 16, 99]))
    elif edit == 7:
        node.output[0] = rng.choice(["x", "r", "w1", "logits"])
    elif edit == 8:
        m.ir_version = int(rng.choice([0, 1, 3, 99]))
    elif edit == 9:
        m.opset_import[0].version = int(rng.choice([0, 1, 6, 99]))
    elif edit == 10:
        node.attribute.append(helper.make_attribute("transB", int(rng.choice([2, -1]))))
    elif edit == 11:
        g.input[0].type.tensor_type.shape.dim[1].dim_value = int(rng.choice([0, 1, 5, 7]))
    elif edit == 12:
        g.node.append(helper.make_node("Gemm", ["r", "w1"], ["r"], name="cycle"))
    else:
        init.data_location = onnx.TensorProto.EXTERNAL
        init.external_data.add(key="location", value=rng.choice(["../x", "/etc/passwd", "missing.bin"]))
    return m.SerializeToString()


def mutant(index: int, proto: onnx.ModelProto, data: bytes) -> bytes:
    rng = np.random.default_rng(index)
    kind = index % 3
    if kind == 0:
        return flip_bytes(data, rng)
    if kind == 1:
        return truncate(data, rng)
    return structural(proto, rng)


@contextmanager
def time_limit(seconds: int):
    def expire(signum, frame):
        raise TimeoutError(f"a run took more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def fuzz(tmp_path: Path, runs: int) -> dict[int, int]:
    proto = base_model()
    proto.ir_version = 8
    data = proto.SerializeToString()
    evaluation = save_npz(tmp_path / "eval.npz", x=randn(16, 6, seed=9))
    codes: dict[int, int] = {}
    for index in range(runs):
        folder = tmp_path / f"m{index}"
        folder.mkdir()
        (folder / "in.onnx").write_bytes(mutant(index, proto, data))
        before = (folder / "in.onnx").read_bytes()
        with time_limit(SECONDS_PER_RUN):
            result = run_cli(folder / "in.onnx", folder / "out.onnx", "--sparsity", "0.5", "--method", "magnitude",
                             "--eval", evaluation, "--progress", "off")  # fmt: skip
        context = f"mutant {index}: exit {result.exit_code}: {result.stderr[-600:]}"
        assert result.exit_code in DOCUMENTED, context
        assert "Traceback" not in result.stderr and "internal error" not in result.stderr, context
        assert (folder / "in.onnx").read_bytes() == before, context
        allowed = {"in.onnx"} | ({"out.onnx", "out.report.json"} if result.exit_code in (0, 6) else set())
        assert {p.name for p in folder.iterdir()} <= allowed, context
        if result.exit_code != 0:
            assert "onnxprune: error:" in result.stderr, context
        codes[result.exit_code] = codes.get(result.exit_code, 0) + 1
    return codes


def test_fuzzed_models_end_with_documented_exit_codes(tmp_path):
    codes = fuzz(tmp_path, FUZZ_RUNS)
    # the mutations must reach past the parser: some runs fail late, some still succeed
    assert codes.get(3, 0) > 0 and sum(codes.values()) == FUZZ_RUNS


@pytest.mark.slow
def test_fuzzed_models_many(tmp_path):
    codes = fuzz(tmp_path, 2000)
    assert sum(codes.values()) == 2000


# ------------------------------------------------------------------------------ determinism


def test_same_seed_twice_gives_byte_identical_outputs(tmp_path):
    path = save(base_model(), tmp_path / "m.onnx")
    x = randn(120, 6, seed=5)
    calib = save_npz(tmp_path / "c.npz", x=x[:80], labels=np.arange(80) % 3)
    evaluation = save_npz(tmp_path / "e.npz", x=x[80:])
    digests = []
    for run in range(2):
        out = tmp_path / f"o{run}.onnx"
        result = run_cli(path, out, "--sparsity", "0.6", "--method", "fishleg", "--calib", calib, "--eval", evaluation,
                         "--num-grads", "16", "--fishleg-steps", "20", "--schedule", "gradual", "--prune-steps", "2",
                         "--finetune-steps", "4", "--seed", "7")  # fmt: skip
        assert result.exit_code == 0, result.stderr
        digests.append(hashlib.sha256(out.read_bytes()).hexdigest())
    assert digests[0] == digests[1]
    weights = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(tmp_path / "o0.onnx")).graph.initializer}
    assert (weights["w1"] == 0).any()  # it did prune (the digests compare real work)


# ------------------------------------------------------------------------------ non-finite outputs


def test_input_model_with_nan_outputs_is_exit_7_before_anything_is_written(tmp_path):
    m = base_model()
    bias = next(t for t in m.graph.initializer if t.name == "b1")
    bias.CopyFrom(numpy_helper.from_array(np.full(8, np.nan, dtype=np.float32), "b1"))
    path = save(m, tmp_path / "m.onnx")
    evaluation = save_npz(tmp_path / "e.npz", x=randn(8, 6, seed=1))
    result = run_cli(path, tmp_path / "o.onnx", "--sparsity", "0.5", "--method", "magnitude", "--eval", evaluation)
    assert result.exit_code == 7, result.stderr
    assert "input model's output 'logits' is NaN or infinite" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.npz", "m.onnx"]


def test_pruned_model_with_infinite_outputs_is_exit_7_and_its_file_is_removed(tmp_path):
    """y = 1 / (x @ w): with x = [1, 0], pruning w's smaller entry (0.5) leaves x @ w = 0."""
    m = model(
        [
            helper.make_node("MatMul", ["x", "w"], ["d"], name="mm"),
            helper.make_node("Div", ["one", "d"], ["y"], name="div"),
        ],
        [tensor("x", ["N", 2])],
        [tensor("y", ["N", 1])],
        {"w": np.array([[0.5], [3.0]], dtype=np.float32), "one": np.ones(1, dtype=np.float32)},
    )
    path = save(m, tmp_path / "m.onnx")
    evaluation = save_npz(tmp_path / "e.npz", x=np.tile(np.array([[1.0, 0.0]], dtype=np.float32), (8, 1)))
    result = run_cli(path, tmp_path / "o.onnx", "--sparsity", "0.5", "--method", "magnitude", "--eval", evaluation)
    assert result.exit_code == 7, result.stderr
    assert "pruned model's output 'y' is NaN or infinite" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.npz", "m.onnx"]


# ------------------------------------------------------------------------------ the input is never modified


def test_outputs_aliasing_the_input_are_refused_and_the_input_is_untouched(tmp_path):
    path = save(base_model(), tmp_path / "m.onnx")
    original = path.read_bytes()
    (tmp_path / "link.onnx").symlink_to(path)
    os.link(path, tmp_path / "hard.onnx")
    for output in (path, tmp_path / "link.onnx", tmp_path / "hard.onnx"):
        result = run_cli(path, output, "--sparsity", "0.5", "--method", "magnitude", "--force")
        assert result.exit_code == 2 and "is the input model" in result.stderr, (output, result.stderr)
        assert path.read_bytes() == original
    report_on_input = run_cli(path, tmp_path / "o.onnx", "--sparsity", "0.5", "--report", tmp_path / "hard.onnx")
    assert report_on_input.exit_code == 2 and "collides with the input" in report_on_input.stderr
    assert path.read_bytes() == original and not (tmp_path / "o.onnx").exists()


def test_disk_full_while_saving_is_exit_9_with_no_partial_or_temporary_file(tmp_path, monkeypatch):
    path = save(base_model(), tmp_path / "m.onnx")
    original = path.read_bytes()

    def full_disk(path: Path) -> None:  # fsync is where a full disk shows with delayed allocation
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(onnx_io, "_fsync", full_disk)
    result = run_cli(path, tmp_path / "o.onnx", "--sparsity", "0.5", "--method", "magnitude")
    assert result.exit_code == 9, result.stderr
    assert f"could not write {tmp_path / 'o.onnx'}: No space left on device" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]  # no output, report or temporary folder
    assert path.read_bytes() == original
