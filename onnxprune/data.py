"""Calibration and evaluation feeds.

Format: a `.npz` whose arrays are keyed by graph input name, samples on the first axis, plus an
optional integer array `labels` (one class index per sample); or a folder of such `.npz` files,
read in name order and concatenated. `.npz` files are read without pickle, and every array's
header is checked against the bytes the archive really holds before anything is allocated.

An array of the input's rank has its first axis as the model's batch axis (fed in batches); an
array of one more dimension holds one complete input per sample (fed one at a time).
"""

from __future__ import annotations

import logging
import zipfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import numpy as np
from onnx import ModelProto, helper

from .errors import CalibrationDataError

if TYPE_CHECKING:
    from .config import PruneConfig

log = logging.getLogger("onnxprune")

LABELS = "labels"
# A data file claiming more than this is refused before it is read (memory must stay bounded).
MAX_DATA_BYTES = 8 * 2**30


@dataclass(frozen=True)
class InputSpec:
    """A graph input: its name, element type and declared dims (int, symbolic name, or None)."""

    name: str
    dtype: np.dtype
    dims: tuple[int | str | None, ...] | None

    def describe(self) -> str:
        dims = "?" if self.dims is None else "[" + ", ".join("?" if d is None else str(d) for d in self.dims) + "]"
        return f"{self.name!r} ({self.dtype} {dims})"


@dataclass(frozen=True)
class Dataset:
    """Arrays by input name (samples on axis 0), optional labels, and where they came from."""

    arrays: dict[str, np.ndarray]
    labels: np.ndarray | None
    source: str
    synthetic: bool = False
    notes: tuple[str, ...] = field(default=())

    def __len__(self) -> int:
        return len(next(iter(self.arrays.values()))) if self.arrays else 0

    def take(self, indices: np.ndarray, source: str) -> Dataset:
        return replace(
            self,
            arrays={k: v[indices] for k, v in self.arrays.items()},
            labels=None if self.labels is None else self.labels[indices],
            source=source,
        )


def input_specs(model: ModelProto) -> list[InputSpec]:
    """The inputs a caller must feed (graph inputs that are not initializers)."""
    constants = {t.name for t in model.graph.initializer}
    specs = []
    for info in model.graph.input:
        if info.name in constants:
            continue
        tensor_type = info.type.tensor_type
        if not info.type.HasField("tensor_type"):
            raise CalibrationDataError(f"input {info.name!r} is not a tensor; only tensor inputs can be fed")
        dtype = helper.tensor_dtype_to_np_dtype(tensor_type.elem_type) if tensor_type.elem_type else np.dtype("float32")
        dims = None
        if tensor_type.HasField("shape"):
            dims = tuple(
                d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor_type.shape.dim
            )
        specs.append(InputSpec(info.name, np.dtype(dtype), dims))
    return specs


# ------------------------------------------------------------------------------ reading


def read_npz(path: Path, max_bytes: int = MAX_DATA_BYTES) -> dict[str, np.ndarray]:
    """The arrays of a `.npz`, refusing pickles, forged headers and oversized members."""

    def bad(problem: str) -> CalibrationDataError:
        return CalibrationDataError(f"{path}: {problem}")

    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise bad(f"not a .npz archive ({exc})") from None
    arrays: dict[str, np.ndarray] = {}
    total = 0
    with archive:
        for info in archive.infolist():
            if not info.filename.endswith(".npy"):
                raise bad(f"unexpected member {info.filename!r}; a .npz holds only .npy arrays")
            total += info.file_size
            if total > max_bytes:
                raise bad(
                    f"holds more than {max_bytes / 2**30:.0f} GiB of arrays; split it into a folder of smaller files"
                )
            try:
                with archive.open(info) as member:
                    arrays[info.filename[:-4]] = _read_npy(member, info.file_size)
            except CalibrationDataError as exc:
                raise bad(f"array {info.filename[:-4]!r}: {exc}") from None
            except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
                raise bad(f"array {info.filename[:-4]!r} is damaged ({exc})") from None
    return arrays


def _read_npy(member, declared_size: int) -> np.ndarray:
    version = np.lib.format.read_magic(member)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(member)
    elif version == (2, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(member)
    else:
        raise CalibrationDataError(f"unsupported .npy format version {version}")
    if dtype.hasobject:
        raise CalibrationDataError("object arrays (pickled Python objects) are not allowed; save plain numeric arrays")
    count = int(np.prod(shape, dtype=np.int64)) if shape else 1
    nbytes = count * dtype.itemsize
    if count < 0 or nbytes > declared_size:
        raise CalibrationDataError(
            f"header claims shape {shape} ({nbytes} bytes) but the archive holds only {declared_size} bytes"
        )
    buffer = member.read(nbytes)
    if len(buffer) != nbytes:
        raise CalibrationDataError(f"truncated: expected {nbytes} bytes, found {len(buffer)}")
    array = np.frombuffer(buffer, dtype=dtype)
    return array.reshape(shape, order="F" if fortran else "C").copy()


def load_dataset(path: Path, specs: Sequence[InputSpec]) -> Dataset:
    """Read a `.npz` or a folder of them and validate it against the model's inputs."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if not p.name.startswith("."))
        others = [p.name for p in files if p.suffix != ".npz" or not p.is_file()]
        if others:
            raise CalibrationDataError(f"{path}: unexpected entries {others[:5]}; the folder may hold only .npz files")
        if not files:
            raise CalibrationDataError(f"{path}: the folder holds no .npz files")
        parts = [read_npz(p) for p in files]
        keys = set(parts[0])
        for p, part in zip(files, parts):
            if set(part) != keys:
                raise CalibrationDataError(f"{p}: has arrays {sorted(part)}, but {files[0].name} has {sorted(keys)}")
        try:
            merged = {k: np.concatenate([part[k] for part in parts]) for k in keys}
        except ValueError as exc:
            raise CalibrationDataError(f"{path}: files cannot be concatenated ({exc})") from None
    elif path.is_file():
        merged = read_npz(path)
    else:
        raise CalibrationDataError(f"{path}: no such file or folder")
    labels = merged.pop(LABELS, None) if LABELS not in {s.name for s in specs} else None
    return validate(Dataset(arrays=merged, labels=labels, source=str(path)), specs)


def validate(dataset: Dataset, specs: Sequence[InputSpec]) -> Dataset:
    """Check names, dtypes, shapes, sample counts and finiteness; cast float64→float32 and alike."""
    where = dataset.source
    names = {s.name for s in specs}
    unknown = sorted(set(dataset.arrays) - names)
    if unknown:
        raise CalibrationDataError(
            f"{where}: arrays {unknown} are not graph inputs (inputs: {sorted(names)}; labels go in {LABELS!r})"
        )
    missing = [s.describe() for s in specs if s.name not in dataset.arrays]
    if missing:
        raise CalibrationDataError(f"{where}: no array for input {', '.join(missing)}")
    arrays, notes = {}, list(dataset.notes)
    for spec in specs:
        array = dataset.arrays[spec.name]
        array, note = _cast(array, spec, where)
        if note:
            notes.append(note)
        _check_shape(array, spec, where)
        if array.dtype.kind == "f" and not bool(np.isfinite(array).all()):
            raise CalibrationDataError(f"{where}: input {spec.name!r} contains NaN or infinite values")
        arrays[spec.name] = array
    counts = {name: len(a) for name, a in arrays.items()}
    labels = dataset.labels
    if labels is not None:
        if labels.dtype.hasobject or labels.ndim == 0:
            raise CalibrationDataError(f"{where}: {LABELS!r} must be an array with one entry per sample")
        if labels.dtype.kind == "f" and not bool(np.isfinite(labels).all()):
            raise CalibrationDataError(f"{where}: {LABELS!r} contains NaN or infinite values")
        counts[LABELS] = len(labels)
    if len(set(counts.values())) > 1:
        raise CalibrationDataError(f"{where}: arrays have different sample counts {counts}")
    if arrays and not next(iter(counts.values())):
        raise CalibrationDataError(f"{where}: holds no samples")
    return replace(dataset, arrays=arrays, labels=labels, notes=tuple(notes))


def _cast(array: np.ndarray, spec: InputSpec, where: str) -> tuple[np.ndarray, str | None]:
    if array.dtype == spec.dtype:
        return array, None
    same_kind = array.dtype.kind == spec.dtype.kind or (array.dtype.kind in "iu" and spec.dtype.kind in "iu")
    if same_kind and array.dtype.kind in "iu":
        info = np.iinfo(spec.dtype)
        if array.size and (array.min() < info.min or array.max() > info.max):
            same_kind = False
    if not same_kind or array.dtype.kind not in "fiub":
        raise CalibrationDataError(
            f"{where}: input {spec.name!r} has dtype {array.dtype}, the model expects {spec.dtype}"
        )
    return array.astype(spec.dtype), f"{where}: cast {spec.name!r} from {array.dtype} to {spec.dtype}"


def _check_shape(array: np.ndarray, spec: InputSpec, where: str) -> None:
    if spec.dims is None:
        return
    rank = len(spec.dims)
    if array.ndim == rank:
        declared, actual = spec.dims[1:], array.shape[1:]
    elif array.ndim == rank + 1:
        declared, actual = spec.dims, array.shape[1:]
    else:
        raise CalibrationDataError(
            f"{where}: input {spec.name!r} has shape {array.shape}; the model declares {spec.describe()} — "
            f"give samples on the first axis (rank {rank}, or {rank + 1} for one whole input per sample)"
        )
    for axis, (want, got) in enumerate(zip(declared, actual)):
        if isinstance(want, int) and want > 0 and want != got:
            raise CalibrationDataError(
                f"{where}: input {spec.name!r} has shape {array.shape}; the model declares {spec.describe()} "
                f"(dimension {axis + array.ndim - len(actual)} should be {want}, is {got})"
            )


def synthesize(specs: Sequence[InputSpec], samples: int, seed: int, source: str) -> Dataset:
    """Random feeds from the declared shapes: standard normal floats, random booleans.

    Integer inputs (token ids, indices) and unknown non-batch dimensions cannot be invented
    safely; those raise with what to provide instead.
    """
    rng = np.random.default_rng(seed)
    arrays = {}
    for spec in specs:
        if spec.dims is None:
            raise _cannot_synthesize(spec, "its shape is not declared")
        rest = spec.dims[1:] if spec.dims else ()
        unknown = [d for d in rest if not isinstance(d, int) or d <= 0]
        if unknown:
            raise _cannot_synthesize(spec, f"dimension(s) {unknown} are unknown")
        shape = (samples, *(d for d in rest if isinstance(d, int))) if spec.dims else (samples,)
        if spec.dtype.kind == "f":
            arrays[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
        elif spec.dtype.kind == "b":
            arrays[spec.name] = rng.random(shape) < 0.5
        else:
            raise _cannot_synthesize(spec, "valid values of an integer input are not known")
    return Dataset(arrays=arrays, labels=None, source=source, synthetic=True)


def _cannot_synthesize(spec: InputSpec, why: str) -> CalibrationDataError:
    return CalibrationDataError(f"cannot synthesize data for input {spec.describe()}: {why}; give --calib/--eval data")


def split(dataset: Dataset, fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """(rest, held-out) with `fraction` of the samples held out at random (at least one each)."""
    n = len(dataset)
    if n < 2:
        raise CalibrationDataError(
            f"{dataset.source}: {n} sample(s) cannot be split into calibration and evaluation; give --eval"
        )
    held = min(n - 1, max(1, round(n * fraction)))
    order = np.random.default_rng(seed).permutation(n)
    return (
        dataset.take(np.sort(order[held:]), f"{dataset.source} (all but {held} held out)"),
        dataset.take(np.sort(order[:held]), f"{dataset.source} ({held} held out)"),
    )


# ------------------------------------------------------------------------------ feeding


@dataclass(frozen=True)
class FeedPlan:
    """How samples become feeds: `batch` per run, `fixed` when the model declares that batch size
    (a short last batch is then padded), `per_sample` when each sample is one whole input."""

    batch: int
    fixed: bool = False
    per_sample: bool = False


def feed_plan(specs: Sequence[InputSpec], dataset: Dataset, preferred: int) -> FeedPlan:
    """The FeedPlan for `dataset`: a declared fixed batch dimension wins over `preferred`."""
    per_sample = {s.dims is not None and dataset.arrays[s.name].ndim == len(s.dims) + 1 for s in specs}
    if len(per_sample) > 1:
        raise CalibrationDataError(f"{dataset.source}: mix of batched and one-input-per-sample arrays")
    if per_sample == {True}:
        return FeedPlan(batch=1, per_sample=True)
    fixed = {s.dims[0] for s in specs if s.dims and isinstance(s.dims[0], int) and s.dims[0] > 0}
    if len(fixed) > 1:
        raise CalibrationDataError(f"inputs declare different fixed batch sizes {sorted(fixed)}")
    return FeedPlan(batch=fixed.pop(), fixed=True) if fixed else FeedPlan(batch=max(1, preferred))


def iter_feeds(
    dataset: Dataset, specs: Sequence[InputSpec], plan: FeedPlan, limit: int | None = None
) -> Iterator[tuple[dict[str, np.ndarray], slice]]:
    """(feeds, samples) pairs covering the first `limit` samples (all by default)."""
    total = len(dataset) if limit is None else min(limit, len(dataset))
    for start in range(0, total, plan.batch):
        stop = min(start + plan.batch, total)
        if plan.per_sample:
            yield {s.name: dataset.arrays[s.name][start] for s in specs}, slice(start, stop)
        elif plan.fixed and stop - start < plan.batch:
            index = np.minimum(np.arange(start, start + plan.batch), stop - 1)
            yield {s.name: dataset.arrays[s.name][index] for s in specs}, slice(start, stop)
        else:
            yield {s.name: dataset.arrays[s.name][start:stop] for s in specs}, slice(start, stop)


def run_batches(
    run: Callable[[dict[str, np.ndarray]], Sequence[np.ndarray]],
    dataset: Dataset,
    specs: Sequence[InputSpec],
    preferred_batch: int,
    limit: int | None = None,
) -> list[np.ndarray]:
    """Feed the dataset through `run` and return each output concatenated over samples."""
    plan = feed_plan(specs, dataset, preferred_batch)
    collected: list[list[np.ndarray]] = []
    for feeds, samples in iter_feeds(dataset, specs, plan, limit):
        outputs = run(feeds)
        if not collected:
            collected = [[] for _ in outputs]
        for bucket, output in zip(collected, outputs):
            output = np.asarray(output)
            bucket.append(
                output[None] if plan.per_sample or output.ndim == 0 else output[: samples.stop - samples.start]
            )
    return [np.concatenate(bucket) for bucket in collected]


def load_data(
    config: PruneConfig, specs: Sequence[InputSpec], needs_calibration: bool
) -> tuple[Dataset | None, Dataset]:
    """(calibration, evaluation): given files, a held-out part of --calib, or synthetic feeds."""
    calibration = load_dataset(config.calibration, specs) if config.calibration else None
    if config.evaluation:
        evaluation = load_dataset(config.evaluation, specs)
    elif calibration is not None:
        calibration, evaluation = split(calibration, config.eval_fraction, config.seed)
        log.info("no --eval: holding out %d of the calibration samples for evaluation", len(evaluation))
    else:
        evaluation = synthesize(specs, config.synthetic_samples, config.seed + 1, "synthetic (no --eval)")
        log.warning(
            "no --eval or --calib data: validating on %d synthetic samples drawn from the input shapes", len(evaluation)
        )
    if calibration is None and needs_calibration:
        calibration = synthesize(specs, config.synthetic_samples, config.seed, "synthetic (no --calib)")
        log.warning(
            "no --calib data: calibrating on %d synthetic samples drawn from the input shapes", len(calibration)
        )
    return calibration, evaluation
