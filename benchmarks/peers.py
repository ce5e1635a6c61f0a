"""The installable ONNX-native peer, PyPI `onnxsim` 0.8.1 (magnitude, Wanda and SparseGPT pruning
of ONNX files), run on the same files and calibration data as onnxprune, for the side-by-side
table in docs/benchmarks.md. Used by bench.py (`--only peers`); each run is a child process.

The peer is given the same calibration samples as onnxprune's layer-wise estimators (the first
`num_grads` of a seeded permutation of the calibration file, in batches of 32) and is validated by
onnxprune's own code: the written file in onnxruntime against the original on the evaluation set.
Its magnitude and Wanda run both per layer (its default: every row of every layer to the target)
and with its `global_sparsity` option; its SparseGPT is per layer only.
"""

from __future__ import annotations

# method name in the table -> (onnxsim function, keyword arguments, takes calibration data)
PEERS = {
    "onnxsim magnitude": ("apply_magnitude_pruning", {}, False),
    "onnxsim magnitude (global)": ("apply_magnitude_pruning", {"global_sparsity": True}, False),
    "onnxsim wanda": ("apply_wanda_pruning", {}, True),
    "onnxsim wanda (global)": ("apply_wanda_pruning", {"global_sparsity": True}, True),
    "onnxsim sparsegpt": ("apply_sparsegpt_pruning", {}, True),
}


def child_code(method: str, model: str, calib: str, evaluation: str, out: str, sparsity: float, count: int) -> str:
    """Python source for the child process: prune with the peer, save, measure, validate; prints
    one JSON line like bench.py's own runs."""
    function, options, calibrated = PEERS[method]
    return f"""
import json, resource, time
import numpy as np, onnx
started = time.perf_counter()
import onnxsim
calib = np.load({calib!r})
names = [n for n in calib.files if n != "labels"]
chosen = np.sort(np.random.default_rng(0).permutation(len(calib[names[0]]))[:{count}])
batches = [{{n: calib[n][chosen[i : i + 32]] for n in names}} for i in range(0, len(chosen), 32)]
extra = {{"calibration_data": batches}} if {calibrated!r} else {{}}
pruned = onnxsim.{function}({model!r}, sparsity={sparsity}, **{options!r}, **extra)
onnx.save(pruned, {out!r})
prune_seconds = time.perf_counter() - started
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

from pathlib import Path
from onnx import numpy_helper
from onnxprune.compare import compare_outputs
from onnxprune.bridge.bindings import find_prunable, read_tensor
from onnxprune.bridge.preprocess import constants_to_initializers
from onnxprune.data import input_specs, load_dataset
from onnxprune.validate import OrtModel, choose_headline
original = onnx.load({model!r})
specs = list(input_specs(original))
evaluation = load_dataset(Path({evaluation!r}), specs)
reference = OrtModel({model!r}).run(evaluation, specs, 32)
headline = choose_headline(reference, evaluation.labels, "auto")
written = OrtModel({out!r})
candidate = written.run(evaluation, specs, 32)
q = compare_outputs(reference, candidate, evaluation.labels, written.output_names, headline).quality
written_proto = onnx.load({out!r})
# the peer writes each pruned weight as a new initializer (`_v_21`, ...) and leaves the original,
# now unused, beside it: count zeros in the weights the written graph's layers actually read
# (weights in Constant nodes, as PaddlePaddle writes them, counted like initializers)
constants_to_initializers(original.graph)
constants_to_initializers(written_proto.graph)
zeros = sum(int((read_tensor(written_proto, t.name) == 0).sum()) for t in find_prunable(written_proto))
total = sum(read_tensor(original, t.name).size for t in find_prunable(original))
print(json.dumps({{
    "metric": q.metric, "before": q.before, "after": q.after, "wall_seconds": prune_seconds,
    "prune_seconds": prune_seconds, "peak_bytes": peak, "gradient_seconds": 0.0, "estimator_seconds": 0.0,
    "sparsity": zeros / total, "calibration_samples": len(calib[names[0]]), "samples_used": len(chosen),
    "loss": "", "groups": 1, "statistics_storage": "none",
}}))
"""
