"""Reading and writing ONNX files safely.

Loading never follows external data outside the model's folder; saving is atomic (a temporary
folder next to the target, then rename), so a failed run leaves either no output or the
previous one, never a half-written file.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

import numpy as np
import onnx
from onnx import GraphProto, ModelProto, TensorProto, helper, numpy_helper

from .errors import InvalidModelError, UsageError, WriteError

# protobuf refuses to serialise a message of 2 GiB or more; stay clear of it with a margin
# for the graph structure itself.
PROTOBUF_LIMIT = 2**31 - 1
EXTERNAL_DATA_THRESHOLD = PROTOBUF_LIMIT - 64 * 2**20
# External tensors of this size and more are read from their file when used, not at loading:
# a large model's weights are then held once (in the torch model), not also in the proto
# (whose memory protobuf frees only with the whole message).
LAZY_BYTES = 1 << 20


@dataclass
class LoadedModel:
    """A checked ModelProto and where its tensors' bytes came from. Tensors of external data from
    LAZY_BYTES up stay in their file (`data_location` EXTERNAL, `location` the file's resolved
    absolute path, read with `tensor_values`); every other tensor's bytes are in memory."""

    proto: ModelProto
    path: Path
    external_files: frozenset[Path] = field(default_factory=frozenset)

    @property
    def uses_external_data(self) -> bool:
        return bool(self.external_files)


def iter_tensors(model: ModelProto) -> Iterator[TensorProto]:
    """Every TensorProto of the model: initializers and tensor attributes, subgraphs included."""

    def from_graph(graph: onnx.GraphProto) -> Iterator[TensorProto]:
        yield from graph.initializer
        for sparse in graph.sparse_initializer:
            yield sparse.values
            yield sparse.indices
        for node in graph.node:
            for attr in node.attribute:
                if attr.HasField("t"):
                    yield attr.t
                yield from attr.tensors
                if attr.HasField("g"):
                    yield from from_graph(attr.g)
                for sub in attr.graphs:
                    yield from from_graph(sub)

    yield from from_graph(model.graph)
    for function in model.functions:
        for node in function.node:
            for attr in node.attribute:
                if attr.HasField("t"):
                    yield attr.t


def load_model(path: str | os.PathLike) -> LoadedModel:
    """Parse, load external data from inside the model's folder only, and check the model."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"input model {path} does not exist")
    if not path.is_file():
        raise UsageError(f"input model {path} is not a regular file")
    try:
        proto = onnx.load_model(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises DecodeError, RuntimeError, ... depending on the damage
        raise InvalidModelError(
            f"{path} is not an ONNX model: protobuf could not parse it ({type(exc).__name__}: {exc})"
        ) from None
    if not proto.HasField("graph") or proto.ir_version <= 0:
        raise InvalidModelError(f"{path} is not an ONNX model: it has no graph or no IR version")
    regions = _external_regions(proto, path.parent)  # our own messages for bad locations first
    _check(proto, path)
    external_files = _load_external_data(regions)
    return LoadedModel(proto=proto, path=path, external_files=frozenset(external_files))


def _check(proto: ModelProto, path: Path) -> None:
    """The ONNX checker on the model as parsed, before its external data is loaded: the checker
    serialises what it is given (and, given a path, reads the file again), which for a model of
    large weights would hold them two more times. Its external-data locations are resolved from
    the model's folder, as the checker does for a path."""
    previous = os.getcwd()
    try:
        os.chdir(path.parent if str(path.parent) else ".")
        onnx.checker.check_model(proto)
    except Exception as exc:
        message = str(exc).strip().splitlines()
        detail = message[0] if message else type(exc).__name__
        raise InvalidModelError(f"{path} is not a valid ONNX model: {detail}") from None
    finally:
        os.chdir(previous)


def tensor_bytes(model: ModelProto) -> int:
    """Bytes of tensor data held in memory by the model."""
    total = 0
    for t in iter_tensors(model):
        total += len(t.raw_data) + 4 * (len(t.float_data) + len(t.int32_data))
        total += 8 * (len(t.int64_data) + len(t.double_data))
    return total


def _external_fields(tensor: TensorProto) -> dict[str, str]:
    return {entry.key: entry.value for entry in tensor.external_data}


def _resolve_inside(base: Path, location: str, tensor_name: str) -> Path:
    """The real path of an external-data location, refusing anything that leaves `base`."""
    where = f"external data of tensor {tensor_name!r} ({location!r})"
    if not location or "\x00" in location:
        raise InvalidModelError(f"{where}: empty or malformed location")
    relative = Path(location)
    if relative.is_absolute() or location.startswith(("/", "\\")) or (len(location) > 1 and location[1] == ":"):
        raise InvalidModelError(f"{where}: absolute paths are not allowed; keep data next to the model")
    if any(part == ".." for part in relative.parts) or "\\" in location:
        raise InvalidModelError(f"{where}: the location leaves the model's folder")
    base_real = base.resolve()
    current = base_real
    for part in relative.parts:
        current = current / part
        if current.is_symlink():
            raise InvalidModelError(f"{where}: {current} is a symbolic link; copy the data file instead")
    if not str(current.resolve()).startswith(str(base_real) + os.sep):
        raise InvalidModelError(f"{where}: the location leaves the model's folder")
    return current


def _external_regions(proto: ModelProto, base: Path) -> list[tuple[TensorProto, Path, int, int | None]]:
    """Each external tensor with its data file (inside `base`), offset and length."""
    regions = []
    for tensor in iter_tensors(proto):
        if tensor.data_location != TensorProto.EXTERNAL:
            continue
        info = _external_fields(tensor)
        file_path = _resolve_inside(base, info.get("location", ""), tensor.name)
        try:
            offset = int(info.get("offset", "0"))
            length = int(info["length"]) if "length" in info else None
        except ValueError:
            raise InvalidModelError(
                f"external data of tensor {tensor.name!r}: offset/length are not integers"
            ) from None
        regions.append((tensor, file_path, offset, length))
    return regions


def _load_external_data(regions: list[tuple[TensorProto, Path, int, int | None]]) -> set[Path]:
    """Read each region into its tensor, except large ones, which are checked and left in their
    file (their location made absolute)."""
    used: set[Path] = set()
    for tensor, file_path, offset, length in regions:
        with _open_region(file_path, offset, length, tensor.name) as (handle, end):
            if end - offset >= LAZY_BYTES:
                _point_to(tensor, file_path.resolve(), offset, end - offset)
            else:
                _read_into(tensor, handle, offset, end - offset)
        used.add(file_path)
    return used


def _read_into(tensor: TensorProto, handle: BinaryIO, offset: int, length: int) -> None:
    """The region's bytes as the tensor's own, no longer external."""
    handle.seek(offset)
    tensor.raw_data = handle.read(length)
    tensor.data_location = TensorProto.DEFAULT
    del tensor.external_data[:]


def _point_to(tensor: TensorProto, location: Path | str, offset: int, length: int) -> None:
    del tensor.external_data[:]
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", str(location)), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value


@contextmanager
def _open_region(file_path: Path, offset: int, length: int | None, tensor_name: str) -> Iterator[tuple[BinaryIO, int]]:
    """The open data file and the region's end, once the region is known to be inside it."""
    where = f"external data of tensor {tensor_name!r} in {file_path.name}"
    if offset < 0 or (length is not None and length < 0):
        raise InvalidModelError(f"{where}: negative offset or length")
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(file_path, flags)
    except OSError as exc:
        raise InvalidModelError(f"{where}: cannot open ({exc.strerror})") from None
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise InvalidModelError(f"{where}: not a regular file")
        if info.st_nlink > 1:
            raise InvalidModelError(
                f"{where}: the file has {info.st_nlink} hard links, so it may be a file from elsewhere; "
                "copy it to a plain file next to the model"
            )
        end = info.st_size if length is None else offset + length
        if offset > info.st_size or end > info.st_size:
            raise InvalidModelError(
                f"{where}: offset {offset} + length {end - offset} is past the end of the file ({info.st_size} bytes)"
            )
        yield handle, end


def is_lazy(tensor: TensorProto) -> bool:
    """Whether the tensor's bytes are still in its external data file (see LoadedModel)."""
    return tensor.data_location == TensorProto.EXTERNAL


def _region(tensor: TensorProto) -> tuple[Path, int, int]:
    fields = _external_fields(tensor)
    return Path(fields["location"]), int(fields.get("offset", "0")), int(fields.get("length", "-1"))


def tensor_values(tensor: TensorProto, base: Path | None = None) -> np.ndarray:
    """The tensor's values, read from its file when it was left there at loading (or, for a
    proto parsed without its external data, from its location relative to `base`)."""
    if not is_lazy(tensor):
        return numpy_helper.to_array(tensor)
    location, offset, length = _region(tensor)
    if not location.is_absolute() and base is not None:
        location = base / location
    dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type)).newbyteorder("<")
    values = np.fromfile(location, dtype=dtype, count=int(np.prod(tensor.dims)), offset=offset)
    return values.astype(dtype.newbyteorder("="), copy=False).reshape(tuple(tensor.dims))


def load_payloads(model: ModelProto) -> None:
    """Read every tensor left in its file into the proto (for code that edits or serialises it)."""
    for tensor in iter_tensors(model):
        if is_lazy(tensor):
            location, offset, length = _region(tensor)
            with open(location, "rb") as handle:
                _read_into(tensor, handle, offset, length)


# ----------------------------------------------------------------------------------- saving


def external_data_name(output: Path) -> str:
    """The name of the data file written next to `output` when it needs external data."""
    return output.name + ".data"


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """Run `write(tmp_dir)`, which creates files named as their targets in `tmp_dir`, then move
    them into `path.parent`; the file named `path.name` moves last. Nothing is left on failure."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    try:
        _atomic_write(path, folder, write)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise WriteError(f"could not write {path}: {reason}; no partial file was left") from None


def _atomic_write(path: Path, folder: Path, write: Callable[[Path], object]) -> None:
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder))
    try:
        write(tmp)
        produced = sorted(p.name for p in tmp.iterdir())
        if path.name not in produced:
            raise RuntimeError(f"atomic_write: {path.name} was not produced")
        for name in produced:
            _fsync(tmp / name)
        for name in [n for n in produced if n != path.name] + [path.name]:
            os.replace(tmp / name, folder / name)
        _fsync_dir(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` atomically."""
    atomic_write(path, lambda tmp: (tmp / Path(path).name).write_bytes(data))


def save_model(model: ModelProto, path: Path, *, external_data: bool) -> None:
    """Write `model` to `path` atomically, with its tensors in `<name>.data` when asked.

    With external data the model proto is modified (tensors now point to the file), so pass a
    proto the caller does not need afterwards.
    """
    path = Path(path)

    def write(tmp: Path) -> None:
        if external_data:
            # A fresh folder: the data file is written whole here, never appended to (it could be
            # the input's). Tensors still in the input's file are copied across a chunk at a time.
            _write_external(model, tmp / external_data_name(path))
            (tmp / path.name).write_bytes(model.SerializeToString())
        else:
            if any(is_lazy(t) for t in iter_tensors(model)):
                raise ValueError("save_model: tensors left in their file need external_data=True")
            (tmp / path.name).write_bytes(model.SerializeToString())

    atomic_write(path, write)


# the data file's offsets of large tensors are multiples of this (memory-mapping readers)
ALIGNMENT = 4096


def _write_external(model: ModelProto, data_file: Path) -> None:
    """Move the bytes of every initializer of 1 KiB or more, and of every tensor left in its
    input file, to `data_file`, pointing the tensors at it."""
    with open(data_file, "wb") as out:
        for tensor in _initializers(model.graph):
            if is_lazy(tensor) or (tensor.HasField("raw_data") and len(tensor.raw_data) >= 1024):
                _append(out, tensor, data_file.name)
        for tensor in iter_tensors(model):  # Constant nodes' values left in the input's file
            if is_lazy(tensor) and _region(tensor)[0].is_absolute():
                _append(out, tensor, data_file.name)


def _append(out: BinaryIO, tensor: TensorProto, name: str) -> None:
    offset = out.tell()
    if offset % ALIGNMENT:
        offset += ALIGNMENT - offset % ALIGNMENT
        out.seek(offset)
    if is_lazy(tensor):
        location, start, length = _region(tensor)
        with open(location, "rb") as source:
            source.seek(start)
            for done in range(0, length, 1 << 26):
                out.write(source.read(min(1 << 26, length - done)))
    else:
        length = len(tensor.raw_data)
        out.write(tensor.raw_data)
        tensor.ClearField("raw_data")
    _point_to(tensor, name, offset, length)


def _initializers(graph: GraphProto) -> Iterator[TensorProto]:
    """The initializers of a graph and of all its subgraphs."""
    yield from graph.initializer
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("g"):
                yield from _initializers(attribute.g)
            for sub in attribute.graphs:
                yield from _initializers(sub)


def _fsync(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
