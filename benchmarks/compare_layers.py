"""Layer by layer against the peer: where does our SparseGPT differ from onnxsim's on a TensorFlow
export? Writes docs/peer_layers.md.

    .venv/bin/python benchmarks/compare_layers.py            # (also run by `make bench`)

Each variant prunes the same file one shot; then every pruned layer's output (the node that reads
the weight) is compared with the dense model's on the evaluation samples, the pruned model run end
to end (the error a layer passes on, including what it inherited). Variants: the peer's SparseGPT
(every layer to the target, each layer's Hessian from the dense model's inputs, damping 1%);
ours with the peer's choices (per layer, damping 1e-2, no repair); ours with the automatic damping
and allocation but no repair; ours with the defaults (repair on).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import peers

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"
DOC = ROOT / "docs" / "peer_layers.md"
# model:sparsity pairs (CASES=keras_digits:0.8 for one)
CASES = [
    (name, float(sparsity))
    for name, sparsity in (
        case.split(":") for case in os.environ.get("CASES", "keras_digits:0.8,keras_digits:0.9").split(",")
    )
]
REPAIR_OFF = {"refine_masks": False, "solve_weights": False, "correct_statistics": "off"}
VARIANTS = {
    "ours, the peer's choices (per layer, damping 1e-2, no repair)": {"scope": "layer", "damp": 1e-2, **REPAIR_OFF},
    "ours, automatic damping and allocation, no repair": REPAIR_OFF,
    "ours, defaults (repair on)": {},
}
OURS = """
import logging
from onnxprune import PruneConfig, prune
logging.getLogger("onnxprune").setLevel(logging.ERROR)
r = prune(PruneConfig(input={model!r}, output={out!r}, force=True, sparsity={sparsity}, method="sparsegpt",
    calibration={calib!r}, evaluation={evaluation!r}, progress="off", **{settings!r}))
print("chosen", r.pruning.allocation, (r.fisher.estimator.get("damp") if r.fisher else None))
"""


def prune_all(name: str, sparsity: float, folder: Path) -> dict[str, tuple[Path, str]]:
    """Every variant's pruned file and what it chose."""
    model, calib, evaluation = (MODELS / f"{name}{s}" for s in (".onnx", "_calib.npz", "_eval.npz"))
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    files = {}
    out = folder / "peer.onnx"
    code = peers.child_code("onnxsim sparsegpt", str(model), str(calib), str(evaluation), str(out), sparsity, 256)
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, env=env, cwd=ROOT)
    files["peer: onnxsim SparseGPT"] = (out, "per layer, damping 1e-2")
    for index, (label, settings) in enumerate(VARIANTS.items()):
        out = folder / f"ours{index}.onnx"
        code = OURS.format(
            model=str(model), out=str(out), calib=str(calib), evaluation=str(evaluation), sparsity=sparsity,
            settings=settings,
        )  # fmt: skip
        done = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, env=env)
        chosen = done.stdout.strip().splitlines()[-1].split()
        files[label] = (out, f"{chosen[1]}, damping {chosen[2]}")
    return files


def layer_outputs(path: Path, nodes: list[str], feeds: dict[str, np.ndarray], final: str) -> dict[str, np.ndarray]:
    """The outputs of the named nodes (and the model's output) on the feeds, in onnxruntime."""
    import onnxruntime as ort

    model = onnx.load(str(path))
    by_name = {n.name: n for n in model.graph.node}
    wanted = [by_name[n].output[0] for n in nodes]
    model.graph.output.extend(onnx.ValueInfoProto(name=v) for v in wanted)
    options = ort.SessionOptions()
    options.log_severity_level = 4
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    values = session.run(wanted + [final], feeds)
    return dict(zip(nodes + ["output"], values, strict=True))


def weight_sparsity(path: Path, nodes: list[str]) -> dict[str, float]:
    """Zeros in the weight each node reads (its second input, initializer or Constant)."""
    from onnxprune.bridge.bindings import read_tensor
    from onnxprune.bridge.preprocess import constants_to_initializers

    model = onnx.load(str(path))
    constants_to_initializers(model.graph)
    by_name = {n.name: n for n in model.graph.node}
    return {n: float((read_tensor(model, by_name[n].input[1]) == 0).mean()) for n in nodes}


def compare(name: str, sparsity: float) -> list[str]:
    from onnxprune.bridge.bindings import find_prunable

    model_path = MODELS / f"{name}.onnx"
    original = onnx.load(str(model_path))
    readers = {c.node for tensor in find_prunable(original) for c in tensor.consumers}
    nodes = [n.name for n in original.graph.node if n.name in readers]  # in graph order
    evaluation = np.load(MODELS / f"{name}_eval.npz")
    feeds = {i.name: evaluation[i.name] for i in original.graph.input if i.name in evaluation.files}
    labels = evaluation["labels"] if "labels" in evaluation.files else None
    final = original.graph.output[0].name
    dense = layer_outputs(model_path, nodes, feeds, final)
    with tempfile.TemporaryDirectory() as folder:
        files = prune_all(name, sparsity, Path(folder))
        rows = [
            f"### {name} at {sparsity:.0%}",
            "",
            "Relative error ‖y − y_dense‖ / ‖y_dense‖ of each pruned layer's output on the evaluation "
            "samples (the model run end to end), and the layer's sparsity.",
            "",
            "| variant | chose | accuracy | " + " | ".join(f"`{n}`" for n in nodes) + " |",
            "| --- | --- | ---: | " + " | ".join("---:" for _ in nodes) + " |",
        ]
        for label, (path, chose) in files.items():
            pruned = layer_outputs(path, nodes, feeds, final)
            zeros = weight_sparsity(path, nodes)
            accuracy = f"{float((pruned['output'].argmax(-1) == labels).mean()):.4f}" if labels is not None else "–"
            cells = [
                f"{np.linalg.norm(pruned[n] - dense[n]) / max(np.linalg.norm(dense[n]), 1e-30):.3f} ({zeros[n]:.0%})"
                for n in nodes
            ]
            rows.append(f"| {label} | {chose} | {accuracy} | " + " | ".join(cells) + " |")
    dense_accuracy = float((dense["output"].argmax(-1) == labels).mean()) if labels is not None else None
    rows += ["", f"Dense accuracy {dense_accuracy:.4f}." if dense_accuracy is not None else "", ""]
    return rows


def main() -> None:
    lines = [
        "# Our SparseGPT against the peer's, layer by layer",
        "",
        "Produced by `benchmarks/compare_layers.py` (part of `make bench`); do not edit by hand.",
        (__doc__ or "").split("\n\n")[2].replace("\n", " "),
        "",
    ]
    for name, sparsity in CASES:
        print(f"== {name} {sparsity}", file=sys.stderr, flush=True)
        lines += compare(name, sparsity)
    DOC.write_text("\n".join(lines))
    print(json.dumps({"wrote": str(DOC)}), file=sys.stderr)


if __name__ == "__main__":
    main()
