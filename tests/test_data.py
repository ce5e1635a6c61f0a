"""Calibration/evaluation data: reading, validation against graph inputs, synthesis, feeding."""

from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest
from onnx import helper

from onnxprune.data import (
    Dataset,
    InputSpec,
    feed_plan,
    input_specs,
    iter_feeds,
    load_dataset,
    read_npz,
    run_batches,
    split,
    synthesize,
)
from onnxprune.errors import CalibrationDataError

from builders import model, randn, save_npz, tensor

IMAGE = InputSpec("image", np.dtype("float32"), ("batch", 1, 4, 4))


def test_input_specs_skip_initializers_listed_as_inputs():
    m = model(
        [helper.make_node("Add", ["x", "w"], ["y"])],
        [tensor("x", ["n", 3]), tensor("w", [3])],
        [tensor("y", ["n", 3])],
        {"w": np.ones(3, np.float32)},
    )
    (spec,) = input_specs(m)
    assert spec == InputSpec("x", np.dtype("float32"), ("n", 3))


def test_npz_with_labels_round_trips(tmp_path):
    x, labels = randn(6, 1, 4, 4), np.arange(6) % 3
    ds = load_dataset(save_npz(tmp_path / "d.npz", image=x, labels=labels), [IMAGE])
    assert len(ds) == 6 and np.array_equal(ds.arrays["image"], x) and np.array_equal(ds.labels, labels)


def test_folder_of_npz_is_concatenated_in_name_order(tmp_path):
    (tmp_path / "data").mkdir()
    save_npz(tmp_path / "data" / "b.npz", image=np.ones((2, 1, 4, 4), np.float32))
    save_npz(tmp_path / "data" / "a.npz", image=np.zeros((3, 1, 4, 4), np.float32))
    ds = load_dataset(tmp_path / "data", [IMAGE])
    assert len(ds) == 5 and ds.arrays["image"][:3].sum() == 0 and ds.arrays["image"][3:].min() == 1


def test_float64_is_cast_to_float32_with_a_note(tmp_path):
    ds = load_dataset(save_npz(tmp_path / "d.npz", image=np.zeros((2, 1, 4, 4))), [IMAGE])
    assert ds.arrays["image"].dtype == np.float32 and "float64 to float32" in ds.notes[0]


@pytest.mark.parametrize(
    "arrays, message",
    [
        ({"image": np.zeros((2, 1, 5, 4), np.float32)}, r"dimension 2 should be 4, is 5"),
        ({"image": np.zeros((2, 4, 4), np.float32)}, r"give samples on the first axis"),
        ({"image": np.zeros((2, 1, 4, 4), np.int64)}, r"has dtype int64, the model expects float32"),
        ({"imag": np.zeros((2, 1, 4, 4), np.float32)}, r"\['imag'\] are not graph inputs"),
        ({"image": np.full((2, 1, 4, 4), np.nan, np.float32)}, r"NaN or infinite"),
        ({"image": np.zeros((2, 1, 4, 4), np.float32), "labels": np.zeros(3, np.int64)}, r"different sample counts"),
        ({"image": np.zeros((0, 1, 4, 4), np.float32)}, r"holds no samples"),
    ],
)
def test_bad_data_is_reported_with_file_and_problem(tmp_path, arrays, message):
    path = save_npz(tmp_path / "bad.npz", **arrays)
    with pytest.raises(CalibrationDataError, match=message) as caught:
        load_dataset(path, [IMAGE])
    assert str(path) in str(caught.value)


def test_missing_input_names_the_input(tmp_path):
    other = InputSpec("mask", np.dtype("bool"), ("batch", 4))
    with pytest.raises(CalibrationDataError, match=r"no array for input 'mask'"):
        load_dataset(save_npz(tmp_path / "d.npz", image=np.zeros((2, 1, 4, 4), np.float32)), [IMAGE, other])


def test_object_arrays_are_refused_without_unpickling(tmp_path):
    path = tmp_path / "pickle.npz"
    np.savez(path, image=np.array([{"a": 1}, None], dtype=object))
    with pytest.raises(CalibrationDataError, match="object arrays"):
        read_npz(path)


def test_forged_header_claiming_huge_array_is_refused_before_allocation(tmp_path):
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": (10**12,)})
    path = tmp_path / "forged.npz"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("image.npy", header.getvalue() + b"\0" * 64)
    with pytest.raises(CalibrationDataError, match="header claims shape"):
        read_npz(path)


def test_not_a_zip_and_unexpected_members(tmp_path):
    (tmp_path / "junk.npz").write_bytes(b"not a zip at all")
    with pytest.raises(CalibrationDataError, match="not a .npz archive"):
        read_npz(tmp_path / "junk.npz")
    with zipfile.ZipFile(tmp_path / "odd.npz", "w") as archive:
        archive.writestr("payload.pkl", b"\x80\x04")
    with pytest.raises(CalibrationDataError, match="unexpected member 'payload.pkl'"):
        read_npz(tmp_path / "odd.npz")


def test_folder_with_other_files_or_empty_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CalibrationDataError, match="holds no .npz files"):
        load_dataset(tmp_path / "empty", [IMAGE])
    (tmp_path / "mixed").mkdir()
    save_npz(tmp_path / "mixed" / "a.npz", image=np.zeros((1, 1, 4, 4), np.float32))
    (tmp_path / "mixed" / "b.pkl").write_bytes(b"x")
    with pytest.raises(CalibrationDataError, match="b.pkl"):
        load_dataset(tmp_path / "mixed", [IMAGE])


def test_synthesize_from_declared_shapes():
    ds = synthesize([IMAGE, InputSpec("flag", np.dtype("bool"), ("batch", 2))], 5, seed=0, source="s")
    assert ds.synthetic and ds.arrays["image"].shape == (5, 1, 4, 4) and ds.arrays["flag"].dtype == np.bool_
    assert np.array_equal(ds.arrays["image"], synthesize([IMAGE], 5, seed=0, source="s").arrays["image"])


@pytest.mark.parametrize(
    "spec, message",
    [
        (InputSpec("ids", np.dtype("int64"), ("batch", 8)), "valid values of an integer input"),
        (InputSpec("x", np.dtype("float32"), ("batch", "seq")), r"dimension\(s\) \['seq'\] are unknown"),
        (InputSpec("x", np.dtype("float32"), None), "shape is not declared"),
    ],
)
def test_synthesize_refuses_what_it_cannot_invent(spec, message):
    with pytest.raises(CalibrationDataError, match=message):
        synthesize([spec], 4, seed=0, source="s")


def test_split_holds_out_a_fraction_without_overlap():
    ds = Dataset(
        {"image": np.arange(20, dtype=np.float32).reshape(20, 1, 1, 1) * np.ones((1, 1, 4, 4), np.float32)},
        np.arange(20),
        "src",
    )
    rest, held = split(ds, 0.25, seed=3)
    assert len(held) == 5 and len(rest) == 15
    assert sorted(np.concatenate([rest.labels, held.labels]).tolist()) == list(range(20))
    with pytest.raises(CalibrationDataError):
        split(ds.take(np.array([0]), "one"), 0.25, seed=0)


def test_fixed_batch_is_padded_and_outputs_trimmed():
    spec = InputSpec("x", np.dtype("float32"), (4, 2))
    ds = Dataset({"x": np.arange(20, dtype=np.float32).reshape(10, 2)}, None, "src")
    plan = feed_plan([spec], ds, preferred=32)
    assert plan.batch == 4 and plan.fixed
    shapes = [feeds["x"].shape for feeds, _ in iter_feeds(ds, [spec], plan)]
    assert shapes == [(4, 2), (4, 2), (4, 2)]
    out = run_batches(lambda feeds: [feeds["x"] * 2], ds, [spec], 32)
    np.testing.assert_array_equal(out[0], ds.arrays["x"] * 2)


def test_one_whole_input_per_sample_when_the_array_has_an_extra_axis():
    spec = InputSpec("x", np.dtype("float32"), (3, 2))  # a model without a batch axis
    ds = Dataset({"x": randn(5, 3, 2)}, None, "src")
    plan = feed_plan([spec], ds, preferred=32)
    assert plan.per_sample
    seen = []
    out = run_batches(lambda feeds: (seen.append(feeds["x"].shape), [feeds["x"].sum(axis=1)])[1], ds, [spec], 32)
    assert seen == [(3, 2)] * 5 and out[0].shape == (5, 3)
