"""The dry run's memory model against the peak a real run measures (issue 18: within 20%).

Each side runs in a fresh process, so that neither sees the other's memory: the dry run prints
its expected peak (the process around the statistics, and the statistics' plan), the run its
own peak resident memory. The model is built so that WoodFisher's statistics dominate
(2.1M weights, blocks of 128: about 1 GiB of inverses), as they do on the models the budget is
about.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from onnx import helper

from builders import model, randn, save, save_npz, tensor

CHILD = """
import json, resource, sys
from onnxprune import PruneConfig, plan, prune
config = PruneConfig(input=sys.argv[2], output=sys.argv[3], sparsity=0.8, method="woodfisher", damp=1e-3,
    allocation="global", num_grads=32, block_size=128, calibration=sys.argv[4], progress="off", device="cpu",
    scale_update=False, refine_masks=False, solve_weights=False, correct_statistics="off")
if sys.argv[1] == "plan":
    m = plan(config).memory
    print(json.dumps({"total": m.total_bytes, "statistics": m.estimate_bytes, "kept": m.kept_bytes,
                      "building": m.building_bytes, "scratch": m.scratch_bytes, "process": m.process_bytes}))
else:
    prune(config)
    print(json.dumps({"peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def wide_mlp(tmp_path):
    width = 1024
    weights = {"w1": randn(width, width, seed=1) / 32, "w2": randn(width, width, seed=2) / 32,
               "w3": randn(width, 10, seed=3) / 32}  # fmt: skip
    m = model(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h1"]),
            helper.make_node("Relu", ["h1"], ["r1"]),
            helper.make_node("MatMul", ["r1", "w2"], ["h2"]),
            helper.make_node("Relu", ["h2"], ["r2"]),
            helper.make_node("MatMul", ["r2", "w3"], ["logits"]),
        ],
        [tensor("x", ["N", width])],
        [tensor("logits", ["N", 10])],
        weights,
    )
    return save(m, tmp_path / "wide.onnx"), save_npz(tmp_path / "calib.npz", x=randn(64, width, seed=4))


def child(*args: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="2")
    done = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_dry_runs_expected_peak_is_within_20_percent_of_the_measured_one(tmp_path):
    path, calib = wide_mlp(tmp_path)
    out = str(tmp_path / "out.onnx")
    planned = child("plan", str(path), out, str(calib))
    # the inverses of 2,107,392 weights in blocks of 128, float32: what the statistics are about
    assert planned["kept"] == 4 * 128 * (2 * 1024 * 1024 + 10 * 1024)
    assert planned["kept"] + planned["building"] + planned["scratch"] == planned["statistics"]
    assert planned["total"] == planned["process"] + planned["statistics"]
    measured = child("run", str(path), out, str(calib))["peak"]
    assert abs(planned["total"] - measured) <= 0.2 * measured, (planned, measured)
