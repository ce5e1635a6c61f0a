"""Safe loading (external data stays inside the model's folder), atomic saving, write-back."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from onnxprune.bridge.bindings import find_prunable, write_back
from onnxprune.errors import InvalidModelError, UsageError, WriteError
from onnxprune.onnx_io import atomic_write, is_lazy, load_model, save_model, tensor_values

from builders import mlp, ort_run, randn


def _external(tmp_path, location="weights.bin"):
    """The mlp saved with its tensors in an external file; returns (model path, folder)."""
    folder = tmp_path / "model"
    folder.mkdir()
    m = mlp()
    onnx.save_model(
        m,
        str(folder / "m.onnx"),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=location,
        size_threshold=0,
    )
    return folder / "m.onnx", folder


def _set_location(path, location: str, **fields):
    m = onnx.load(str(path), load_external_data=False)
    for t in m.graph.initializer:
        for entry in t.external_data:
            if entry.key == "location":
                entry.value = location
            if entry.key in fields:
                entry.value = str(fields[entry.key])
    path.write_bytes(m.SerializeToString())


def test_external_data_inside_the_folder_loads(tmp_path):
    path, _ = _external(tmp_path)
    loaded = load_model(path)
    assert loaded.uses_external_data
    arrays = {t.name: numpy_helper.to_array(t) for t in loaded.proto.graph.initializer}
    expected = {t.name: numpy_helper.to_array(t) for t in mlp().graph.initializer}
    assert arrays.keys() == expected.keys() and all(np.array_equal(arrays[k], expected[k]) for k in arrays)


@pytest.mark.parametrize("location", ["../weights.bin", "sub/../../weights.bin", "/etc/passwd"])
def test_external_data_outside_the_folder_is_refused(tmp_path, location):
    path, folder = _external(tmp_path)
    (tmp_path / "weights.bin").write_bytes((folder / "weights.bin").read_bytes())
    _set_location(path, location)
    with pytest.raises(InvalidModelError, match="external data"):
        load_model(path)


def test_external_data_through_a_symlink_or_hard_link_is_refused(tmp_path):
    path, folder = _external(tmp_path)
    outside = tmp_path / "outside.bin"
    os.replace(folder / "weights.bin", outside)
    os.symlink(outside, folder / "weights.bin")
    with pytest.raises(InvalidModelError, match="symbolic link"):
        load_model(path)
    os.remove(folder / "weights.bin")
    os.link(outside, folder / "weights.bin")
    with pytest.raises(InvalidModelError, match="hard links"):
        load_model(path)


def test_external_data_past_the_end_of_the_file_is_refused(tmp_path):
    path, _ = _external(tmp_path)
    _set_location(path, "weights.bin", offset=10**9)
    with pytest.raises(InvalidModelError, match="past the end"):
        load_model(path)


def test_not_onnx_and_missing_file(tmp_path):
    (tmp_path / "x.onnx").write_bytes(b"\xff\xfe garbage \x00" * 10)
    with pytest.raises(InvalidModelError, match="not an ONNX model"):
        load_model(tmp_path / "x.onnx")
    (tmp_path / "empty.onnx").write_bytes(b"")
    with pytest.raises(InvalidModelError):
        load_model(tmp_path / "empty.onnx")
    with pytest.raises(UsageError, match="does not exist"):
        load_model(tmp_path / "nope.onnx")


def test_invalid_graph_is_refused_by_the_checker(tmp_path):
    m = mlp()
    m.graph.node[1].input[0] = "undefined_value"
    (tmp_path / "bad.onnx").write_bytes(m.SerializeToString())
    with pytest.raises(InvalidModelError, match="not a valid ONNX model"):
        load_model(tmp_path / "bad.onnx")


def test_atomic_write_failure_leaves_previous_file_and_no_temporaries(tmp_path):
    target = tmp_path / "out.onnx"
    target.write_bytes(b"previous")

    def failing(tmp):
        (tmp / "out.onnx").write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(WriteError, match="could not write .*out.onnx: disk full"):
        atomic_write(target, failing)
    assert target.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx"]


def test_save_with_external_data_round_trips(tmp_path):
    save_model(mlp(hidden=64, inputs=32), tmp_path / "out.onnx", external_data=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx", "out.onnx.data"]
    loaded = load_model(tmp_path / "out.onnx")
    assert loaded.uses_external_data
    x = randn(3, 32)
    np.testing.assert_array_equal(ort_run(loaded.proto, {"x": x})[0], ort_run(mlp(hidden=64, inputs=32), {"x": x})[0])
    np.testing.assert_array_equal(ort_run(tmp_path / "out.onnx", {"x": x})[0], ort_run(loaded.proto, {"x": x})[0])


def test_large_external_tensors_stay_in_their_file_until_read_and_are_copied_when_saved(tmp_path, monkeypatch):
    """Tensors of external data from LAZY_BYTES up are read when used (the proto never holds a
    large model's weights); saved, their bytes are copied into the output's own data file."""
    import onnxprune.onnx_io as onnx_io

    monkeypatch.setattr(onnx_io, "LAZY_BYTES", 4 * 16 * 4)  # w2 (4x16 float32) and up: both weights
    path, folder = _external(tmp_path)
    loaded = load_model(path)
    expected = {t.name: numpy_helper.to_array(t) for t in mlp().graph.initializer}
    lazy = {t.name for t in loaded.proto.graph.initializer if is_lazy(t)}
    assert lazy == {"w1", "w2"}
    for t in loaded.proto.graph.initializer:
        assert np.array_equal(tensor_values(t), expected[t.name])
        assert is_lazy(t) or not t.external_data  # small ones are in memory
    new = np.full((16, 8), 0.5, np.float32)
    out = write_back(loaded.proto, {"w1": new})
    save_model(out, tmp_path / "out.onnx", external_data=True)
    (folder / "weights.bin").unlink()  # the output must not read the input's data
    written = onnx.load(str(tmp_path / "out.onnx"))
    arrays = {t.name: numpy_helper.to_array(t) for t in written.graph.initializer}
    assert np.array_equal(arrays["w1"], new)
    assert all(np.array_equal(arrays[n], expected[n]) for n in expected if n != "w1")
    x = randn(3, 8)
    reference = mlp()
    reference.graph.initializer[0].CopyFrom(numpy_helper.from_array(new, "w1"))
    np.testing.assert_allclose(ort_run(tmp_path / "out.onnx", {"x": x})[0], ort_run(reference, {"x": x})[0], rtol=1e-6)


def test_write_back_keeps_everything_but_the_replaced_tensor():
    m = mlp()
    m.metadata_props.add(key="author", value="someone")
    m.graph.initializer[0].doc_string = "first layer"
    m.doc_string = "a model"
    new = np.zeros((16, 8), np.float32)
    out = write_back(m, {"w1": new})
    assert out.ir_version == m.ir_version and list(out.opset_import) == list(m.opset_import)
    assert [n.name for n in out.graph.node] == [n.name for n in m.graph.node]
    assert list(out.graph.node) == list(m.graph.node)
    assert out.metadata_props[0].value == "someone" and out.doc_string == "a model"
    assert out.graph.initializer[0].doc_string == "first layer"
    assert not out.graph.initializer[0].HasField("data_location")  # not set to its default: same bytes
    assert np.array_equal(numpy_helper.to_array(out.graph.initializer[0]), new)
    for before, after in zip(m.graph.initializer[1:], out.graph.initializer[1:]):
        assert before == after
    # the input proto itself is untouched
    assert not np.array_equal(numpy_helper.to_array(m.graph.initializer[0]), new)


def test_write_back_with_the_same_values_is_bit_identical_in_onnxruntime():
    m = mlp()
    same = {
        t.name: numpy_helper.to_array(t) for t in m.graph.initializer if t.name in {p.name for p in find_prunable(m)}
    }
    out = write_back(m, same)
    x = randn(7, 8, seed=9)
    assert ort_run(out, {"x": x})[0].tobytes() == ort_run(m, {"x": x})[0].tobytes()


def test_write_back_refuses_wrong_shapes_and_unknown_names():
    with pytest.raises(ValueError, match="shape"):
        write_back(mlp(), {"w1": np.zeros((8, 16), np.float32)})
    with pytest.raises(KeyError):
        write_back(mlp(), {"nope": np.zeros(1)})
