"""What a model costs to run, measured in onnxruntime rather than assumed: the latency of the
original and the written model in the same process, with the same threads and the same feeds
(warm-up runs excluded, the two models' runs interleaved so that drift of the machine hits both
alike), their parameters, the FLOPs of their layers with weights, and their file sizes.

An unstructured sparse model runs onnxruntime's dense kernels: its latency and FLOPs are the
original's, and only its compressed size shows the zeros; removing whole channels (structured
pruning) changes the shapes themselves."""

from __future__ import annotations

import os
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx
from onnx import ModelProto

from .bridge.bindings import named_tensors
from .onnx_io import tensor_values
from .sessions import cpu_session
from .shapes import observed_shapes, static_shapes

WARMUP_RUNS = 3
_WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


@dataclass(frozen=True)
class Latency:
    """Milliseconds per run over the timed runs."""

    median_ms: float
    p10_ms: float
    p90_ms: float


@dataclass(frozen=True)
class Footprint:
    """What one model file holds and costs."""

    parameters: int  # elements of all initializers and Constant-node values
    nonzero_parameters: int
    # 2 × multiply-adds of the Conv/ConvTranspose/Gemm/MatMul nodes with a constant weight, for
    # one run at the measured batch size, as dense kernels execute them (None: shapes unknown)
    layer_flops: int | None
    file_bytes: int  # the .onnx file and its external data
    compressed_bytes: int  # the same bytes compressed (zlib level 6): where zeros save storage
    latency: Latency | None  # None when not measured (--speed-runs 0)


@dataclass(frozen=True)
class Speed:
    """The original against the written model, measured in one process."""

    provider: str
    threads: int
    batch_size: int
    runs: int  # timed runs per model (after WARMUP_RUNS untimed ones)
    warmup: int
    original: Footprint
    output: Footprint
    # the median over the interleaved pairs of runs of original time / output time (load that comes
    # and goes slows both runs of a pair alike, where a ratio of two medians would take it in)
    speedup: float | None


def measure_speed(
    original: Path,
    output: Path,
    feeds: dict[str, np.ndarray],
    batch_size: int,
    runs: int,
    threads: int,
) -> Speed:
    """Latency of both files on `feeds` (`runs` timed runs each, interleaved), and their sizes,
    parameters and layer FLOPs."""
    threads = threads or available_cores()
    seconds: list[list[float]] = []
    if runs > 0 and max(_model_bytes(original), _model_bytes(output)) <= INTERLEAVE_MAX_BYTES:
        seconds = time_sessions([cpu_session(p, threads) for p in (original, output)], feeds, runs)
    elif runs > 0:
        # one session at a time: each holds its own copy of the weights, beside the run's own
        seconds = [time_sessions([cpu_session(p, threads)], feeds, runs)[0] for p in (original, output)]
    latencies = [latency_of(s) for s in seconds] if seconds else [None, None]
    before, after = (footprint(path, feeds, latency) for path, latency in zip((original, output), latencies))
    speedup = 1.0 / paired_ratio(seconds[0], seconds[1]) if seconds else None
    return Speed(
        provider="CPUExecutionProvider",
        threads=threads,
        batch_size=batch_size,
        runs=runs,
        warmup=WARMUP_RUNS if runs > 0 else 0,
        original=before,
        output=after,
        speedup=speedup,
    )


# Models of more bytes than this are timed one after the other rather than interleaved, so that
# two onnxruntime copies of a large model's weights are never held at once.
INTERLEAVE_MAX_BYTES = 1 << 30


def _model_bytes(path: Path) -> int:
    """The file's bytes and its external data's."""
    proto = onnx.load(str(path), load_external_data=False)
    return sum(f.stat().st_size for f in [path, *_external_files(proto, path)] if f.exists())


def available_cores() -> int:
    """The cores this process may run on (what onnxruntime would use by default)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def time_sessions(sessions: Sequence, feeds: dict[str, np.ndarray], runs: int) -> list[list[float]]:
    """Seconds per run of each session on the same feeds, after WARMUP_RUNS untimed runs, the
    sessions' runs interleaved."""
    for session in sessions:
        for _ in range(WARMUP_RUNS):
            session.run(None, feeds)
    seconds: list[list[float]] = [[] for _ in sessions]
    for _ in range(runs):
        for session, times in zip(sessions, seconds):
            start = time.perf_counter()
            session.run(None, feeds)
            times.append(time.perf_counter() - start)
    return seconds


def paired_ratio(dense: Sequence[float], variant: Sequence[float]) -> float:
    """The median over interleaved runs of variant time / dense time."""
    return float(np.median(np.asarray(variant, dtype=np.float64) / np.asarray(dense, dtype=np.float64)))


def latency_of(seconds: Sequence[float]) -> Latency:
    """The summary of run times given in seconds."""
    ms = np.asarray(seconds, dtype=np.float64) * 1e3
    return Latency(
        median_ms=float(np.median(ms)), p10_ms=float(np.percentile(ms, 10)), p90_ms=float(np.percentile(ms, 90))
    )


def footprint(path: Path, feeds: dict[str, np.ndarray], latency: Latency | None) -> Footprint:
    """Parameters, layer FLOPs at the feeds' shapes and file sizes of the model at `path`."""
    # its external data is read a tensor at a time, not all loaded: the run still holds the
    # pruned weights, and a second full copy would set a large model's peak here
    proto = onnx.load(str(path), load_external_data=False)
    parameters = nonzero = 0
    # initializers and Constant-node values (PaddlePaddle keeps its weights in Constant nodes)
    for _, tensor in named_tensors(proto):
        values = tensor_values(tensor, path.parent)
        parameters += values.size
        nonzero += int(np.count_nonzero(values))
        del values
    files = [path, *_external_files(proto, path)]
    compressor = zlib.compressobj(6)
    compressed = 0
    for file in files:
        with open(file, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 22), b""):
                compressed += len(compressor.compress(chunk))
    compressed += len(compressor.flush())
    return Footprint(
        parameters=parameters,
        nonzero_parameters=nonzero,
        layer_flops=layer_flops(proto, feeds),
        file_bytes=sum(f.stat().st_size for f in files),
        compressed_bytes=compressed,
        latency=latency,
    )


def _external_files(proto: ModelProto, path: Path) -> list[Path]:
    names = {
        entry.value
        for t in proto.graph.initializer
        if t.data_location == onnx.TensorProto.EXTERNAL
        for entry in t.external_data
        if entry.key == "location"
    }
    return [path.parent / name for name in sorted(names)]


def layer_flops(proto: ModelProto, feeds: dict[str, np.ndarray]) -> int | None:
    """2 × multiply-adds of the nodes with a constant weight (Conv, ConvTranspose, Gemm, MatMul)
    for `feeds`; shapes from shape inference, completed by one onnxruntime run where it has no
    answer; None when a node's shapes stay unknown."""
    weights = {name: tuple(t.dims) for name, t in named_tensors(proto)}
    nodes = [n for n in proto.graph.node if n.op_type in _WEIGHTED_OPS and len(n.input) > 1 and n.input[1] in weights]
    shapes = static_shapes(proto, {name: tuple(np.shape(v)) for name, v in feeds.items()})
    if any(n.output[0] not in shapes or n.input[0] not in shapes for n in nodes):
        shapes.update(observed_shapes(proto, feeds))
    total = 0
    for node in nodes:
        count = node_flops(node, shapes.get(node.input[0]), weights[node.input[1]], shapes.get(node.output[0]))
        if count is None:
            return None
        total += count
    return total


def node_flops(
    node: onnx.NodeProto, x: tuple[int, ...] | None, w: tuple[int, ...], y: tuple[int, ...] | None
) -> int | None:
    """2 × multiply-adds of one weighted node from its input, weight and output shapes."""
    if node.op_type == "ConvTranspose":  # every input element meets a whole [Cout/g, k...] slice
        return None if x is None else 2 * int(np.prod(x)) * int(np.prod(w[1:]))
    if y is None:
        return None
    if node.op_type == "Conv":  # every output element is a dot product over [Cin/g, k...]
        return 2 * int(np.prod(y)) * int(np.prod(w[1:]))
    trans_b = any(a.name == "transB" and a.i for a in node.attribute)
    inner = w[-1] if node.op_type == "Gemm" and trans_b else w[-2] if len(w) >= 2 else w[0]
    return 2 * int(np.prod(y)) * int(inner)


def speed_lines(speed: Speed) -> list[str]:
    """The human table's speed section."""
    timed = f"median of {speed.runs} runs after {speed.warmup} warm-up" if speed.runs else "not timed"
    lines = [f"speed (onnxruntime CPU, {speed.threads} threads, batch {speed.batch_size}, {timed}):"]
    for name, f in (("original", speed.original), ("output", speed.output)):
        latency = f"{f.latency.median_ms:.3f} ms ({f.latency.p10_ms:.3f}-{f.latency.p90_ms:.3f})" if f.latency else "-"
        flops = f"{f.layer_flops / 1e6:,.1f} MFLOPs" if f.layer_flops is not None else "FLOPs unknown"
        lines.append(
            f"  {name:<8} {latency:>28}  {f.parameters:>12,} params ({f.nonzero_parameters:,} non-zero)  {flops}"
            f"  file {f.file_bytes / 2**20:,.2f} MiB, compressed {f.compressed_bytes / 2**20:,.2f} MiB"
        )
    if speed.speedup is not None:
        lines.append(f"  speed-up {speed.speedup:.2f}x")
    return lines
