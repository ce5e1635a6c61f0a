"""Hostile input: mutated ONNX files through the whole command, and determinism.

Every mutant must end with a documented exit code (never 1, the internal-error code), print no
traceback, finish within a time limit, and write nothing but the output and its report.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import pickle
import signal
import tracemalloc
import zipfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper
from test_cli import run_cli

from onnxprune import onnx_io
from onnxprune.data import read_npz
from onnxprune.errors import CalibrationDataError, WriteError
from onnxprune.gradients import GradientSource

from builders import model, randn, save, save_npz, sha256_of, tensor

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


# ------------------------------------------------------------------------------ injection in subgraphs

INJECTION = 'training"), getattr(__import__("os"), "system")("touch {marker}"), getattr(self, "training'


def test_injection_in_if_subgraph_names_does_not_execute_and_names_survive(tmp_path):
    marker = tmp_path / "pwned"
    payload = INJECTION.format(marker=marker)
    then_branch = helper.make_graph(
        [helper.make_node("Relu", ["h"], [payload + "t"], name=payload + "then")],
        payload + "then_graph",
        [],
        [helper.make_tensor_value_info(payload + "t", onnx.TensorProto.FLOAT, None)],
    )
    else_branch = helper.make_graph(
        [helper.make_node("Neg", ["h"], [payload + "e"], name=payload + "else")],
        payload + "else_graph",
        [],
        [helper.make_tensor_value_info(payload + "e", onnx.TensorProto.FLOAT, None)],
    )
    m = model(
        [
            helper.make_node("MatMul", ["x", "w"], ["h"], name=payload + "mm"),
            helper.make_node(
                "If", ["cond"], ["y"], name=payload + "if", then_branch=then_branch, else_branch=else_branch
            ),
        ],
        [tensor("x", ["N", 4])],
        [tensor("y", ["N", 3])],
        {"w": randn(4, 3, seed=1), "cond": np.array(True)},
        name=payload,
    )
    path = save(m, tmp_path / "m.onnx")
    evaluation = save_npz(tmp_path / "e.npz", x=randn(16, 4, seed=2))
    result = run_cli(path, tmp_path / "o.onnx", "--sparsity", "0.5", "--method", "magnitude", "--eval", evaluation)
    assert not marker.exists()
    assert result.exit_code == 0, result.stderr
    written = onnx.load(str(tmp_path / "o.onnx"))
    branch = next(a for a in written.graph.node[1].attribute if a.name == "then_branch").g
    assert written.graph.name == payload and written.graph.node[1].name == payload + "if"
    assert branch.name == payload + "then_graph" and branch.node[0].name == payload + "then"
    assert not marker.exists()


def test_injection_in_loop_body_names_does_not_execute(tmp_path):
    """Loop is not convertible (onnx2torch has no converter): exit 4, and nothing in the body ran."""
    marker = tmp_path / "pwned"
    payload = INJECTION.format(marker=marker)
    body = helper.make_graph(
        [
            helper.make_node("Identity", [payload + "c_in"], [payload + "c_out"], name=payload + "keep_going"),
            helper.make_node("Relu", [payload + "v_in"], [payload + "v_out"], name=payload + "body_relu"),
        ],
        payload + "body",
        [
            helper.make_tensor_value_info(payload + "i", onnx.TensorProto.INT64, []),
            helper.make_tensor_value_info(payload + "c_in", onnx.TensorProto.BOOL, []),
            helper.make_tensor_value_info(payload + "v_in", onnx.TensorProto.FLOAT, None),
        ],
        [
            helper.make_tensor_value_info(payload + "c_out", onnx.TensorProto.BOOL, []),
            helper.make_tensor_value_info(payload + "v_out", onnx.TensorProto.FLOAT, None),
        ],
    )
    m = model(
        [
            helper.make_node("MatMul", ["x", "w"], ["h"], name=payload + "mm"),
            helper.make_node("Loop", ["trips", "go", "h"], ["y"], name=payload + "loop", body=body),
        ],
        [tensor("x", ["N", 4])],
        [tensor("y", ["N", 3])],
        {"w": randn(4, 3, seed=1), "trips": np.array(2, dtype=np.int64), "go": np.array(True)},
        name=payload,
    )
    path = save(m, tmp_path / "m.onnx")
    evaluation = save_npz(tmp_path / "e.npz", x=randn(16, 4, seed=2))
    result = run_cli(path, tmp_path / "o.onnx", "--sparsity", "0.5", "--method", "magnitude", "--eval", evaluation)
    assert not marker.exists()
    assert result.exit_code == 4 and "unsupported operators: Loop" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "o.onnx").exists()


def without_file_permission_override() -> None:
    """In the child before exec: drop root's power to ignore file modes (CAP_DAC_OVERRIDE,
    CAP_DAC_READ_SEARCH) from the bounding set, so a read-only folder is read-only for it too."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (1, 2):
        if libc.prctl(24, capability, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


def test_read_only_output_folder_is_a_clear_error_and_the_input_is_untouched(tmp_path):
    import subprocess
    import sys

    folder = tmp_path / "locked"
    folder.mkdir()
    path = save(base_model(), tmp_path / "m.onnx")
    before = path.read_bytes()
    os.chmod(folder, 0o555)
    command = Path(sys.executable).with_name("onnxprune")
    try:
        done = subprocess.run(
            [str(command), str(path), str(folder / "o.onnx"), "--sparsity", "0.5", "--method", "magnitude"],
            capture_output=True, text=True, timeout=300,
            preexec_fn=without_file_permission_override if os.geteuid() == 0 else None,
        )  # fmt: skip
    except subprocess.SubprocessError as exc:
        pytest.skip(f"cannot drop root's file-permission override here: {exc}")
    finally:
        os.chmod(folder, 0o755)
    assert done.returncode == 2, done.stderr
    assert f"cannot write to the folder {folder}" in done.stderr and "Traceback" not in done.stderr
    assert list(folder.iterdir()) == [] and path.read_bytes() == before


# ------------------------------------------------------------------------------ external data through the command


def external_model(tmp_path: Path) -> tuple[Path, Path]:
    folder = tmp_path / "model"
    folder.mkdir()
    onnx.save_model(base_model(), str(folder / "m.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="weights.bin", size_threshold=0)  # fmt: skip
    return folder / "m.onnx", folder


def point_external_data(path: Path, location: str | None = None, **fields: int) -> None:
    m = onnx.load(str(path), load_external_data=False)
    for t in m.graph.initializer:
        for entry in t.external_data:
            if entry.key == "location" and location is not None:
                entry.value = location
            if entry.key in fields:
                entry.value = str(fields[entry.key])
        for key in set(fields) - {e.key for e in t.external_data}:
            t.external_data.add(key=key, value=str(fields[key]))
    path.write_bytes(m.SerializeToString())


@pytest.mark.parametrize(
    "setup, message",
    [
        ("dotdot", "leaves the model's folder"),
        ("nested_dotdot", "leaves the model's folder"),
        ("absolute", "absolute paths are not allowed"),
        ("symlink", "symbolic link"),
        ("symlinked_folder", "symbolic link"),
        ("hard_link", "hard links"),
        ("negative_offset", "negative offset or length"),
        ("negative_length", "negative offset or length"),
        ("oversized_length", "past the end"),
        ("oversized_offset", "past the end"),
    ],
)
def test_unsafe_external_data_is_exit_3_before_reading_outside(tmp_path, setup, message):
    path, folder = external_model(tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    os.replace(folder / "weights.bin", outside / "weights.bin")
    secret = outside / "weights.bin"
    if setup == "dotdot":
        point_external_data(path, "../outside/weights.bin")
    elif setup == "nested_dotdot":
        (folder / "sub").mkdir()
        point_external_data(path, "sub/../../outside/weights.bin")
    elif setup == "absolute":
        point_external_data(path, str(secret))
    elif setup == "symlink":
        os.symlink(secret, folder / "weights.bin")
    elif setup == "symlinked_folder":
        os.symlink(outside, folder / "data")
        point_external_data(path, "data/weights.bin")
    elif setup == "hard_link":
        os.link(secret, folder / "weights.bin")
    else:
        os.replace(secret, folder / "weights.bin")
        field = {"negative_offset": ("offset", -4), "negative_length": ("length", -4),
                 "oversized_length": ("length", 10**12), "oversized_offset": ("offset", 10**12)}[setup]  # fmt: skip
        point_external_data(path, None, **{field[0]: field[1]})
    before = os.stat(secret if secret.exists() else folder / "weights.bin").st_atime_ns
    result = run_cli(path, tmp_path / "o.onnx", "--sparsity", "0.5", "--method", "magnitude")
    assert result.exit_code == 3, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "o.onnx").exists()
    if secret.exists():  # the file outside was never opened for reading
        assert os.stat(secret).st_atime_ns == before


# ------------------------------------------------------------------------------ hostile data files


def test_zip_bomb_npz_is_refused_with_bounded_memory(tmp_path):
    """A member of 64 MiB of zeros compresses to ~64 KiB; with a 16 MiB limit it is refused from
    its declared size, before it is inflated."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": (2**22, 4)})
    path = tmp_path / "bomb.npz"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        with archive.open("x.npy", "w", force_zip64=True) as member:
            member.write(header.getvalue())
            for _ in range(64):
                member.write(bytes(2**20))
    assert path.stat().st_size < 2**20
    tracemalloc.start()
    with pytest.raises(CalibrationDataError, match="bomb.npz: holds more than"):
        read_npz(path, max_bytes=16 * 2**20)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 4 * 2**20


def test_pickle_file_as_calibration_data_is_exit_5_and_never_unpickled(tmp_path):
    path = save(base_model(), tmp_path / "m.onnx")
    marker = tmp_path / "unpickled"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (tmp_path / "calib.pkl").write_bytes(pickle.dumps(Payload()))
    np.save(tmp_path / "arr.npy", np.array([Payload()], dtype=object), allow_pickle=True)
    with zipfile.ZipFile(tmp_path / "objects.npz", "w") as archive:
        archive.write(tmp_path / "arr.npy", "x.npy")
    for name, message in (("calib.pkl", "not a .npz archive"), ("objects.npz", "object arrays")):
        result = run_cli(path, tmp_path / "o.onnx", "--sparsity", "0.5", "--calib", tmp_path / name)
        assert result.exit_code == 5, result.stderr
        assert str(tmp_path / name) in result.stderr and message in result.stderr
    assert not marker.exists() and not (tmp_path / "o.onnx").exists()


# ------------------------------------------------------------------------------ failures while saving


@pytest.mark.parametrize("point", ["write", "fsync", "replace data", "replace model"])
def test_failure_at_any_point_of_saving_leaves_the_previous_output_and_no_temporaries(tmp_path, monkeypatch, point):
    """External data: the data file moves first, the model last; a failure before the model
    moves leaves the previous output in place (its data file may be the new one only when the
    failure hits the model's own move, which the error reports)."""
    target = tmp_path / "out.onnx"
    target.write_bytes(b"previous model")
    proto = base_model()
    calls = {"replace": 0}
    real_replace, real_fsync = os.replace, onnx_io._fsync

    def failing_replace(src, dst):
        calls["replace"] += 1
        if (point == "replace data" and calls["replace"] == 1) or (
            point == "replace model" and str(dst) == str(target)
        ):
            raise OSError(errno.EIO, "simulated I/O error")
        return real_replace(src, dst)

    def failing_fsync(path):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def failing_write(proto, data_path):
        Path(data_path).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    if point == "write":
        monkeypatch.setattr(onnx_io, "_write_external", failing_write)
    elif point == "fsync":
        monkeypatch.setattr(onnx_io, "_fsync", failing_fsync)
    else:
        monkeypatch.setattr(onnx_io.os, "replace", failing_replace)
    with pytest.raises(WriteError, match="could not write"):
        onnx_io.save_model(proto, target, external_data=True)
    monkeypatch.setattr(onnx_io.os, "replace", real_replace)
    monkeypatch.setattr(onnx_io, "_fsync", real_fsync)
    assert target.read_bytes() == b"previous model"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # no temporary folder left


# ------------------------------------------------------------------------------ non-finite statistics


def test_non_finite_gradients_are_exit_7_naming_the_tensor(tmp_path, monkeypatch):
    path = save(base_model(), tmp_path / "m.onnx")
    calib = save_npz(tmp_path / "c.npz", x=randn(64, 6, seed=3), labels=np.arange(64) % 3)
    real = GradientSource.stream

    def poisoned(self, names, consume, masks=None, progress=None, owners=None):
        # every estimator's gradients pass here (collected rows are streamed into their matrix)
        def consume_poisoned(k, grads):
            if k == 0 and "w2" in grads:
                grads["w2"][0] = float("inf")
            consume(k, grads)

        return real(self, names, consume_poisoned, masks, progress, owners)

    monkeypatch.setattr(GradientSource, "stream", poisoned)
    result = run_cli(path, tmp_path / "o.onnx", "--sparsity", "0.5", "--calib", calib, "--num-grads", "8")
    assert result.exit_code == 7, result.stderr
    assert "gradients of 'w2' contain NaN or infinite values; nothing was written" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.npz", "m.onnx"]


# ------------------------------------------------------------------------------ beyond protobuf's 2 GiB


@pytest.mark.slow
def test_model_larger_than_2_gib_round_trips_with_external_data(tmp_path):
    """Three MatMul weights of 1 GiB, 1 GiB and 0.5 GiB (2.5 GiB in all, external data): pruned by
    magnitude to 50% per layer and validated in onnxruntime. The peak memory is in the report."""
    import subprocess
    import sys

    width = 16384
    weights = {
        "w1": np.random.default_rng(1).standard_normal((width, width), dtype=np.float32),
        "w2": np.random.default_rng(2).standard_normal((width, width), dtype=np.float32),
        "w3": np.random.default_rng(3).standard_normal((width, width // 2), dtype=np.float32),
    }
    m = model(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h1"], name="mm1"),
            helper.make_node("MatMul", ["h1", "w2"], ["h2"], name="mm2"),
            helper.make_node("MatMul", ["h2", "w3"], ["y"], name="mm3"),
        ],
        [tensor("x", ["N", width])],
        [tensor("y", ["N", width // 2])],
        weights,
    )
    del weights
    folder = tmp_path / "big"
    folder.mkdir()
    onnx.save_model(m, str(folder / "big.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="big.onnx.weights", size_threshold=1024)  # fmt: skip
    del m
    data_file = folder / "big.onnx.weights"
    assert data_file.stat().st_size > 2 * 2**30
    before = sha256_of(data_file)
    evaluation = save_npz(tmp_path / "e.npz", x=randn(8, width, seed=4) / 128)
    command = Path(sys.executable).with_name("onnxprune")
    out = tmp_path / "out.onnx"
    done = subprocess.run(
        [str(command), str(folder / "big.onnx"), str(out), "--sparsity", "0.5", "--method", "magnitude",
         "--scope", "layer", "--eval", str(evaluation), "--json"],
        capture_output=True, text=True, timeout=3600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    assert report["output"]["external_data"] is True and report["output"]["size_bytes"] > 2 * 2**30
    assert all(abs(t["sparsity"] - 0.5) < 1e-6 for t in report["pruning"]["tensors"])
    assert report["validation"]["outputs"][0]["cosine"] > 0.5  # onnxruntime ran the written model
    assert sha256_of(data_file) == before  # the input's data untouched
    print(f"peak memory of a 2.5 GiB model round trip: {report['peak_memory_bytes'] / 2**30:.1f} GiB")


def test_output_whose_data_file_would_replace_the_inputs_external_data_is_refused(tmp_path):
    """in.onnx keeps its weights in out.onnx.data, the name `out.onnx` would write its own to."""
    onnx.save_model(base_model(), str(tmp_path / "in.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="out.onnx.data", size_threshold=0)  # fmt: skip
    data = (tmp_path / "out.onnx.data").read_bytes()
    result = run_cli(tmp_path / "in.onnx", tmp_path / "out.onnx", "--sparsity", "0.5", "--method", "magnitude")
    assert result.exit_code == 2 and "would replace out.onnx.data, the input's external data" in result.stderr
    assert (tmp_path / "out.onnx.data").read_bytes() == data and not (tmp_path / "out.onnx").exists()


def test_force_overwrites_an_external_data_output_from_inside_its_folder(tmp_path, monkeypatch):
    """onnx's save_as_external_data looks for an existing data file relative to the current
    directory; running twice with --force from the output's folder used to fail."""
    m = model([helper.make_node("MatMul", ["x", "w1"], ["y"], name="mm")], [tensor("x", ["N", 32])],
              [tensor("y", ["N", 32])], {"w1": randn(32, 32, seed=1)})  # fmt: skip
    onnx.save_model(m, str(tmp_path / "in.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="in.onnx.data", size_threshold=0)  # fmt: skip
    save_npz(tmp_path / "e.npz", x=randn(8, 32, seed=1))
    monkeypatch.chdir(tmp_path)
    for sparsity in ("0.5", "0.75"):
        result = run_cli("in.onnx", "out.onnx", "--sparsity", sparsity, "--method", "magnitude", "--eval", "e.npz",
                         "--force")  # fmt: skip
        assert result.exit_code == 0, result.stderr
    written = onnx.load(str(tmp_path / "out.onnx"))  # loads its data from out.onnx.data
    w1 = next(numpy_helper.to_array(t) for t in written.graph.initializer if t.name == "w1")
    assert (tmp_path / "out.onnx.data").exists() and int((w1 == 0).sum()) > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["in.onnx", "in.onnx.data", "e.npz", "out.onnx", "out.onnx.data", "out.report.json"]
    )
