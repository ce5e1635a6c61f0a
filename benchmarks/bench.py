"""One-shot pruning benchmarks: magnitude vs diagonal Fisher vs WoodFisher.

    make bench                         # both models (the MiniLM grid takes a few hours on 2 cores)
    .venv/bin/python benchmarks/bench.py --only cnn

Every configuration runs in a fresh subprocess so that its peak memory (max RSS of that process,
torch and the model included) is its own. Results accumulate in benchmarks/results/bench.jsonl
(committed; a rerun skips configurations already measured with the same settings, --redo METHOD
measures one method's again, --model/--steps/--method select runs) and docs/benchmarks.md is
rewritten from them.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import peers
from peers import PEERS

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"
RESULTS = ROOT / "benchmarks" / "results" / "bench.jsonl"  # committed: the document is rendered from it
DOC = ROOT / "docs" / "benchmarks.md"


@dataclass(frozen=True)
class Run:
    model: str  # "cnn" or "minilm"
    method: str
    sparsity: float
    steps: int
    num_grads: int = 256
    fisher_batch: int = 1
    block_size: int = 128
    damp: float | str = 1e-3
    schedule: str = "oneshot"
    prune_steps: int = 1
    finetune_steps: int = 0
    lr: float = 0.0
    seed: int = 0
    max_memory: float | None = None  # GiB for the statistics (--max-memory); None: the default
    allocation: str = "global"  # --allocation
    search_holdout: str = "quarter"  # --search-holdout
    shared_factors: bool = True  # --shared-factors (runs with a search before 2026-12-04: False)
    mix: float | str = "auto"  # --mix (combined's weight of the task-loss Fisher)

    @property
    def key(self) -> str:
        # runs keep the keys they had before the schedule and seed fields existed
        fields = asdict(self)
        if self.schedule == "oneshot":
            for name in ("schedule", "prune_steps", "finetune_steps", "lr"):
                fields.pop(name)
        if self.seed == 0:
            fields.pop("seed")
        if self.allocation == "global":
            fields.pop("allocation")
        if self.max_memory is None:
            fields.pop("max_memory")
        if self.search_holdout == "quarter":
            fields.pop("search_holdout")
        if self.shared_factors:
            fields.pop("shared_factors")
        if self.mix == "auto":
            fields.pop("mix")
        return json.dumps(fields, sort_keys=True)


# Gradual pruning on the CNN: 4 cubic steps; fixed fine-tuning budgets of 20 and 100 Adam steps of
# 32 samples (0.6 and 3 epochs of the 1,000 calibration digits) at lr 1e-3, split between the
# steps; at 95% three seeds (data order, sampled batches) to show the noise.
GRADUAL = {"schedule": "gradual", "prune_steps": 4, "lr": 1e-3}
BUDGETS = (20, 100)
SEEDS_AT_95 = (0, 1, 2)


MODEL_FILES = {
    "cnn": (MODELS / "mnist_cnn.onnx", MODELS / "mnist_calib.npz", MODELS / "mnist_eval.npz"),
    "minilm": (
        ROOT / "build" / "minilm" / "minilm_legacy.onnx",
        MODELS / "minilm_calib.npz",
        MODELS / "minilm_eval.npz",
    ),
    "ocr": (MODELS / "ocr_cls.onnx", MODELS / "ocr_cls_calib.npz", MODELS / "ocr_cls_eval.npz"),
}
# The side-by-side with the peer (onnxsim): one shot, these sparsities, onnxprune's estimators and
# the peer's, on the same files and calibration samples.
# (method, allocation): global for all; per layer for the layer-wise estimators (their papers'
# setting, and the peer's default); and auto (the default: whichever of the two leaves the smaller
# held-out loss)
SIDE_BY_SIDE = {
    "sparsities": (0.7, 0.8, 0.9),
    # every method collapses the PP-OCR classifier to one class from 70% on: lower rows show which
    # still work
    "more_sparsities": {"ocr": (0.3, 0.5)},
    "ours": (
        ("magnitude", "global"),
        ("wanda", "global"),
        ("wanda", "layer"),
        ("sparsegpt", "global"),
        ("sparsegpt", "layer"),
        ("woodfisher", "global"),
        ("wanda", "auto"),
        ("sparsegpt", "auto"),
        ("woodfisher", "auto"),
    ),
    # not measured, to keep the run short: where every method is at the one-class floor anyway
    "skip": {
        ("ocr", "sparsegpt", "auto"): (0.7, 0.8, 0.9),
        ("ocr", "woodfisher", "auto"): (0.7, 0.8, 0.9),
    },
}


def grid(only: str | None) -> list[Run]:
    runs = []
    plans = {
        "cnn": ([0.5, 0.7, 0.8, 0.9, 0.95], 4, ("diagonal-fisher", "woodfisher", "fishleg")),
        "minilm": ([0.5, 0.7, 0.8, 0.9], 3, ("diagonal-fisher", "woodfisher")),
    }
    if only in (None, "cnn"):
        for budget in BUDGETS:
            for sparsity in (0.8, 0.9, 0.95, 0.98):
                for method in ("magnitude", "woodfisher", "fishleg"):
                    for seed in SEEDS_AT_95 if sparsity == 0.95 else (0,):
                        runs.append(Run("cnn", method, sparsity, 1, **GRADUAL, finetune_steps=budget, seed=seed))
    for model, (sparsities, many, methods) in plans.items():
        if only and only != model:
            continue
        for sparsity in sparsities:
            runs.append(Run(model, "magnitude", sparsity, 1))
            for method in methods:
                for steps in (1, many):
                    runs.append(Run(model, method, sparsity, steps))
    if only in (None, "peers"):
        for model in ("cnn", "minilm", "ocr"):
            for sparsity in (*SIDE_BY_SIDE["more_sparsities"].get(model, ()), *SIDE_BY_SIDE["sparsities"]):
                # automatic damping (for MiniLM 1e-3, what --damp auto keeps there on 2 cores: the
                # main table's WoodFisher runs are reused)
                damp = 1e-3 if model == "minilm" else "auto"
                runs += [
                    Run(model, method, sparsity, 1, damp=damp, allocation=allocation)
                    for method, allocation in SIDE_BY_SIDE["ours"]
                    if sparsity not in SIDE_BY_SIDE["skip"].get((model, method, allocation), ())
                ]
                runs += [Run(model, method, sparsity, 1) for method in PEERS]
    if only in (None, "minilm"):
        # the budget: MiniLM at 50% one shot within 8 GiB (statistics capped at 6 GiB, so
        # the rest of the process fits beside them)
        runs.append(Run("minilm", "woodfisher", 0.5, 1, max_memory=6.0))
    return runs


def measure(run: Run) -> dict:
    """Run one configuration in a child process; returns its measurements."""
    model, calib, evaluation = MODEL_FILES[run.model]
    out = ROOT / "build" / "bench" / f"out_{run.model}.onnx"
    out.parent.mkdir(parents=True, exist_ok=True)
    if run.method in PEERS:
        code = peers.child_code(
            run.method, str(model), str(calib), str(evaluation), str(out), run.sparsity, run.num_grads
        )
    else:
        code = _own_child_code(run, model, calib, evaluation, out)
    measured = _child(code)
    if "error" not in measured:
        measured["file_bytes"] = out.stat().st_size
    return measured


def _own_child_code(run: Run, model: Path, calib: Path, evaluation: Path, out: Path) -> str:
    return f"""
import json, resource, time, logging
from onnxprune import PruneConfig, prune
logging.getLogger("onnxprune").setLevel(logging.ERROR)
started = time.perf_counter()
report = prune(PruneConfig(input={str(model)!r}, output={str(out)!r}, force=True, sparsity={run.sparsity},
    method={run.method!r}, steps={run.steps}, num_grads={run.num_grads}, fisher_batch={run.fisher_batch},
    block_size={run.block_size}, damp={run.damp!r}, schedule={run.schedule!r}, prune_steps={run.prune_steps},
    finetune_steps={run.finetune_steps}, lr={run.lr or 1e-4}, seed={run.seed}, calibration={str(calib)!r},
    evaluation={str(evaluation)!r}, progress="off", max_memory={run.max_memory!r}, scope={run.allocation!r},
    search_holdout={run.search_holdout!r}, shared_factors={run.shared_factors!r}, mix={run.mix!r}, scale_update=False,
    refine_masks=False, solve_weights=False,
    correct_statistics="off"))
q, f = report.validation.quality, report.fisher
curve = (f.estimator.get("auxiliary_loss") or []) if f else []
print(json.dumps({{
    "metric": q.metric, "before": q.before, "after": q.after, "wall_seconds": time.perf_counter() - started,
    "prune_seconds": report.timings["prune"], "peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    "gradient_seconds": f.gradient_seconds if f else 0.0, "estimator_seconds": f.estimator_seconds if f else 0.0,
    "sparsity": report.pruning.sparsity, "calibration_samples": report.calibration.samples if report.calibration else 0,
    "samples_used": f.calibration_samples_used if f else 0, "loss": f.loss if f else "",
    "groups": f.groups if f else 1, "statistics_storage": f.statistics_storage if f else "none",
    "finetune_seconds": report.timings.get("finetune", 0.0),
    "auxiliary_loss": curve[:: max(1, len(curve) // 4)],
    "allocation": report.pruning.allocation, "allocation_search": getattr(report.pruning, "allocation_search", None),
    "damp_search": f.estimator.get("damp_search") if f else None,
}}))
"""


def _child(code: str) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["?"])[-1], "exit_code": done.returncode}
    return json.loads(done.stdout.strip().splitlines()[-1])


def load_results(path: Path = RESULTS) -> dict[str, dict]:
    """The latest row of each key in a results file (one JSON row per line)."""
    if not path.exists():
        return {}
    return {entry["key"]: entry for entry in map(json.loads, path.read_text().splitlines())}


def machine() -> str:
    """The machine and versions a document's figures come from, as its header states them."""
    import onnxruntime
    import torch

    from onnxprune import __version__

    return (
        f"{platform.machine()} CPU with {os.cpu_count()} cores (onnxprune {__version__}, torch {torch.__version__}, "
        f"onnxruntime {onnxruntime.__version__})"
    )


def measure_missing(path: Path, results: dict[str, dict], runs: list[Run], redo: bool, after=None) -> None:
    """Measure each run not yet in `results` (all with `redo`), appending each to `path` as it ends;
    `after()` is called after each (a document rewritten as the results come in)."""
    for run in runs:
        if run.key in results and "error" not in results[run.key] and not redo:
            continue
        started = time.perf_counter()
        print(f"== {run}", file=sys.stderr, flush=True)
        value = measure(run)
        print(f"   {value} ({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)
        append_result(path, results, {"key": run.key, **value})
        if after is not None:
            after()


def append_result(path: Path, results: dict[str, dict], row: dict) -> None:
    """`row` recorded under its key with the time it ended (`measured_at`, UTC), and appended to
    the results file at once (an interrupted benchmark resumes after it)."""
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")
    row = {**row, "measured_at": f"{when} UTC"}
    results[row["key"]] = row
    with path.open("a") as handle:
        handle.write(json.dumps(row) + "\n")


def render(results: dict[str, dict]) -> str:
    import onnxruntime
    import torch

    from onnxprune import __version__

    lines = [
        "# Benchmarks",
        "",
        "Produced by `make bench` (`benchmarks/bench.py`); do not edit by hand. Unless a section says "
        "otherwise: one-shot pruning, no fine-tuning, global selection across layers; FishLeg with its "
        "defaults (Kronecker warm start from the gradients, 200 auxiliary steps, relative damping 0.01, 20 "
        "online steps per later step). On "
        f"{platform.machine()} CPU with {os.cpu_count()} cores (onnxprune {__version__}, torch {torch.__version__}, "
        f"onnxruntime {onnxruntime.__version__}). Each row is a separate process. These tables measure the "
        "estimators alone: the repair after pruning (on by default since) is switched off; docs/quality.md "
        "measures it; docs/structured.md measures structured pruning (whole channels) and its onnxruntime "
        "speed-up.",
        "",
        "Columns: the headline metric of the written model in onnxruntime on the evaluation set; wall time "
        "of the whole run (load, conversion check, pruning, writing, validation); peak resident memory of "
        "the process (torch and the model included); *est./grad.*: time spent in the estimator (block "
        "inverses, scores, updates) divided by time spent collecting gradients.",
        "",
    ]
    titles = {
        "cnn": "MNIST CNN (shipped demo, 206,736 prunable weights; top-1 accuracy on 1,000 held-out digits)",
        "minilm": "all-MiniLM-L6-v2 (legacy export, 10.6M prunable weights in 36 matrices; cosine of the "
        "sentence embeddings to the original on 256 held-out sentences)",
    }
    for model in ("cnn", "minilm"):
        # this table's own grid only: the side-by-side's runs (automatic damping, other
        # allocations) have their own table and would read as unexplained duplicates here
        rows = [
            (json.loads(run.key), results[run.key])
            for run in grid(model)
            if run.schedule == "oneshot" and run.key in results
        ]
        if not rows:
            continue
        lines += [f"## {titles[model]}", ""]
        sample = next((v for _, v in rows if "loss" in v and v["loss"]), None)
        settings = rows[0][0]
        if sample:
            lines.append(
                f"Calibration budget: {settings['num_grads']} gradients × {settings['fisher_batch']} sample(s) "
                f"from {sample['calibration_samples']} calibration samples ({sample['samples_used']} distinct "
                f"used); loss: {sample['loss']}. WoodFisher: blocks of {settings['block_size']}, relative damping "
                f"{settings['damp']:g}, joint OBS update; recomputation steps on the cubic schedule."
            )
            lines.append("")
        dense = next((v["before"] for _, v in rows if v.get("metric") == "accuracy"), None)
        if dense is not None:
            lines += [f"Dense accuracy: {dense:.4f}.", ""]
        lines += [
            "| sparsity | method | steps | metric | wall time | peak memory | est./grad. |",
            "| ---: | --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        order = {"magnitude": 0, "diagonal-fisher": 1, "woodfisher": 2, "fishleg": 3}
        ranked = sorted(
            rows, key=lambda r: (r[0]["sparsity"], order[r[0]["method"]], r[0]["steps"], r[0].get("max_memory") or 0)
        )
        for run, v in ranked:
            if "error" in v:
                lines.append(
                    f"| {run['sparsity']:.0%} | {run['method']} | {run['steps']} | failed: {v['error']} | | | |"
                )
                continue
            ratio = f"{v['estimator_seconds'] / v['gradient_seconds']:.1f}" if v["gradient_seconds"] else "—"
            method = run["method"] + (f" (--max-memory {run['max_memory']:g})" if run.get("max_memory") else "")
            lines.append(
                f"| {run['sparsity']:.0%} | {method} | {run['steps']} | {v['after']:.4f} | "
                f"{v['wall_seconds']:.1f} s | {v['peak_bytes'] / 2**30:.2f} GiB | {ratio} |"
            )
        lines.append("")
        if model in TABLE_NOTES:
            lines += [TABLE_NOTES[model], ""]
        if model == "cnn":
            lines += render_gradual(results)
    lines += render_side_by_side(results)
    return "\n".join(lines)


# What a reader must know about when a table's rows were measured (remove a note once its rows are
# measured again)
TABLE_NOTES = {
    "minilm": (
        "Rows of one step were measured after WoodFisher's statistics were streamed into float32 block "
        "inverses (issue 18); the rows of 3 steps before it (WoodFisher's then with float64 inverses by the "
        "Woodbury recursion from all 256 gradient rows, hence their ~15 GiB), not since. The newer rows' "
        "wall times include the report's onnxruntime speed measurement (about 7.5 s on MiniLM), which the "
        "older rows did not have. WoodFisher with `--allocation auto --damp auto --search-holdout unused` "
        "against the global rows, over three seeds and beside the peer's SparseGPT: docs/defaults.md."
    ),
}


def render_side_by_side(results: dict[str, dict]) -> list[str]:
    """onnxprune's estimators against the peer's, per model and sparsity."""
    sparsities = SIDE_BY_SIDE["sparsities"]
    found: dict[tuple[str, float], list[tuple[str, str, dict]]] = {}  # (model, sparsity) -> rows
    for run in grid("peers"):
        v = results.get(run.key)
        if v is not None and "error" not in v:
            side = "peer" if run.method in PEERS else "onnxprune"
            label = run.method if run.allocation == "global" or side == "peer" else f"{run.method} ({run.allocation})"
            if run.allocation == "auto" and "allocation" in v:
                label = f"{run.method} (auto: {v['allocation']})"
            found.setdefault((run.model, run.sparsity), []).append((label, side, v))
    if not found:
        return []
    lines = [
        "## Side by side with the peer (onnxsim 0.8.1)",
        "",
        "One shot, no fine-tuning, on the same files and calibration data. onnxprune: global allocation "
        "unless the method says `(layer)` (every tensor to the target sparsity, the peer's default) or "
        "`(auto: …)` (onnxprune's default allocation, and what it chose), "
        "256 gradients (WoodFisher) or 256 calibration samples (Wanda, SparseGPT); automatic damping "
        "(`--damp auto`; MiniLM's rows with 1e-3 given, which is what `--damp auto` keeps there on 2 cores: "
        "its first trial takes over a minute, so the other five would exceed `--damp-search-seconds`); its "
        "wall time is the whole run (loading, reference, conversion check, pruning, writing, validation). The "
        "peer (`onnxsim.apply_*_pruning`, Python API) gets the same 256 calibration samples in batches of "
        "32; its wall time covers pruning and saving only. Both are validated by the same code: the written "
        "file in onnxruntime against the original on the evaluation set. *sparsity*: zeros over the "
        "weights onnxprune counts as prunable (MatMul/Gemm/Conv weights).",
        "",
    ]
    titles = {
        "cnn": "MNIST CNN (accuracy)",
        "minilm": "all-MiniLM-L6-v2 (cosine)",
        "ocr": "PP-OCR text direction (accuracy)",
    }
    for model in ("cnn", "minilm", "ocr"):
        if not any(key[0] == model for key in found):
            continue
        lines += [f"### {titles[model]}", ""]
        lines.append("| sparsity | method | metric | sparsity reached | wall time | peak memory | file |")
        lines.append("| ---: | --- | ---: | ---: | ---: | ---: | ---: |")
        for sparsity in (*SIDE_BY_SIDE["more_sparsities"].get(model, ()), *sparsities):
            best = {}
            for method, side, v in found.get((model, sparsity), []):
                # a run that left the weights denser than asked does not compete for best
                reached = v["sparsity"] >= sparsity - 0.005
                if reached and v["after"] > best.get(side, (-1.0, ""))[0]:
                    best[side] = (v["after"], method)
                size = f"{v['file_bytes'] / 2**20:.1f} MiB" if "file_bytes" in v else "–"
                lines.append(
                    f"| {sparsity:.0%} | {method} | {v['after']:.4f} | {v['sparsity']:.4f}"
                    f"{'' if reached else ' (not reached)'} | {v['wall_seconds']:.1f} s | "
                    f"{v['peak_bytes'] / 2**30:.2f} GiB | {size} |"
                )
            if len(best) == 2:
                ours, theirs = best["onnxprune"], best["peer"]
                verdict = "≥" if ours[0] >= theirs[0] else "<"
                lines.append(
                    f"| {sparsity:.0%} | **best: onnxprune {ours[1]} {ours[0]:.4f} {verdict} peer {theirs[1]} "
                    f"{theirs[0]:.4f}** | | | | | |"
                )
            elif best:
                side, (value, method) = next(iter(best.items()))
                lines.append(
                    f"| {sparsity:.0%} | **best: {side} {method} {value:.4f}; "
                    f"no run of the {'peer' if side == 'onnxprune' else 'onnxprune'} reached the target** | | | | | |"
                )
        lines.append("")
    return lines + SIDE_BY_SIDE_NOTES


# What the side-by-side tables show, checked against them when they were last measured
# (onnxsim 0.8.1); the numbers quoted are the tables'.
SIDE_BY_SIDE_NOTES = [
    "Notes:",
    "",
    "- **Allocation matters as much as the estimator, and neither split wins everywhere.** On the CNN, "
    "per-layer allocation empties most of the first convolution's 9-weight filters: SparseGPT per layer "
    "keeps 0.574 at 90% where global keeps 0.953 (the peer's per-layer SparseGPT: 0.478; its per-row "
    "magnitude and Wanda defaults fall to 0.15–0.47 from 70% on, while its `global_sparsity` option "
    "matches onnxprune's global magnitude). On MiniLM it is the other way round: SparseGPT global 0.415 "
    "at 70%, per layer 0.772 (the peer's, per layer: 0.748). `--allocation auto`, onnxprune's default, "
    "prunes once each way and keeps the split with the smaller loss on held-out calibration samples; the "
    "`(auto: …)` rows show what it chose. The trials draw their statistics from three quarters of the "
    "calibration samples and hold out the last quarter, so a run keeping global draws other samples than "
    "the global row (hence 0.6341 against 0.6379 at 80%); with `--search-holdout unused` the held-out "
    "samples are ones the statistics never draw, and docs/defaults.md measures that against global over "
    "three seeds. For WoodFisher it "
    "chose global on all three models, MiniLM included (held-out loss 0.726 global vs 0.847 per layer at "
    "80%, 1.190 vs 1.233 at 90%), where it chose per layer for Wanda and SparseGPT. The trials share one set "
    "of statistics with each other and with the run (issue 18): an `auto` row repeats no gradient "
    "collection or inversion, only each candidate's selection, OBS update and held-out evaluation.",
    "- **The peer's Wanda on MiniLM is its magnitude pruning:** it writes exactly the same weights as "
    "`apply_magnitude_pruning` (all 36 tensors identical, checked at 70%), hence the identical rows; its "
    "docstring gives Wanda a data-free fallback for layers whose activations it did not capture.",
    "- **PP-OCR (PaddlePaddle export, every weight in a Constant node):** the peer's Wanda and SparseGPT "
    "return the model with no weight pruned and no error (sparsity 0.0000; its docstring says a layer "
    "whose calibration activation it did not observe is left untouched). They do not compete for *best*.",
    "- **PP-OCR from 70% on:** every method of both tools leaves this 124k-weight MobileNet-style "
    "classifier at or near a constant predictor: 0.5664 is the share of the majority class among the 256 "
    "evaluation lines (0.4336 the other class). The 80% and 90% rows are ties at that floor, not wins (at "
    "70% SparseGPT per layer keeps 0.5938, barely above it). Tried for onnxprune at 80%, by hand: "
    "SparseGPT with sensitivity allocation (0.4336, 173 s), and one-shot Wanda followed by 300 Adam steps "
    "of fine-tuning (lr 1e-3) with BatchNorm frozen or re-estimated (0.4336 both: the training loss stays "
    "at ln 2 = 0.691, the output no longer depends on the input). A gradual schedule was not tried. The "
    "30% and 50% rows show where the methods still differ. (`auto` choosing per layer for Wanda from 70% "
    "on is a choice between two constant predictors.)",
    "- **Files:** the peer's magnitude pruning writes each pruned weight as a new initializer and leaves "
    "the original, now unused, in the file: twice the size (the *file* column). onnxprune writes the "
    "pruned values in place of the originals (same names, same graph).",
    "- **Wall time:** onnxprune's includes the automatic damping search (SparseGPT and WoodFisher prune "
    "once per grid value on held-out samples: 5 extra pruning passes on the CNN and PP-OCR models; "
    "MiniLM's rows have 1e-3 given, see above) and, in the `auto` rows, the per-layer trial "
    "(the global trial is the damping search's best).",
    "",
]


def render_gradual(results: dict[str, dict]) -> list[str]:
    rows = [(json.loads(k), v) for k, v in results.items() if json.loads(k).get("schedule") == "gradual"]
    if not rows:
        return []
    g = GRADUAL
    lines = [
        "### Gradual pruning with fine-tuning (MNIST CNN)",
        "",
        f"Cubic schedule in {g['prune_steps']} pruning steps from 0; a fixed fine-tuning budget of "
        f"{' or '.join(str(b) for b in BUDGETS)} Adam steps in all (lr {g['lr']:g}, mini-batches of 32 "
        "calibration digits with their labels, cross-entropy) split evenly between the steps. "
        "Second-order methods: 256 gradients per pruning step (the same budget for WoodFisher and FishLeg). "
        "*accuracy*: seed 0; where several seeds ran (data order, sampled batches), their values follow. "
        "Wall time includes everything; *fine-tune* is the part spent training.",
        "",
        "| sparsity | fine-tune steps | method | accuracy | seeds 0, 1, 2 | wall time | fine-tune | peak memory |",
        "| ---: | ---: | --- | ---: | --- | ---: | ---: | ---: |",
    ]
    order = {"magnitude": 0, "woodfisher": 1, "fishleg": 2}
    groups: dict[tuple, dict[int, dict]] = {}
    for run, v in rows:
        groups.setdefault((run["sparsity"], run["finetune_steps"], run["method"]), {})[run.get("seed", 0)] = v
    for (sparsity, budget, method), by_seed in sorted(groups.items(), key=lambda g: (g[0][0], g[0][1], order[g[0][2]])):
        v = by_seed.get(0)
        if v is None or "error" in v:
            lines.append(f"| {sparsity:.0%} | {budget} | {method} | failed: {v and v['error']} | | | | |")
            continue
        seeds = ", ".join(f"{by_seed[k]['after']:.3f}" for k in sorted(by_seed) if "error" not in by_seed[k])
        lines.append(
            f"| {sparsity:.0%} | {budget} | {method} | {v['after']:.4f} | {seeds if len(by_seed) > 1 else ''} | "
            f"{v['wall_seconds']:.1f} s | {v.get('finetune_seconds', 0.0):.1f} s | {v['peak_bytes'] / 2**30:.2f} GiB |"
        )
    lines.append("")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["cnn", "minilm", "peers"])
    parser.add_argument("--render", action="store_true", help="only rewrite docs/benchmarks.md from results")
    parser.add_argument("--redo", metavar="METHOD", help="measure this method's runs again (after it changed)")
    parser.add_argument("--model", choices=sorted(MODEL_FILES), help="only this model's runs")
    parser.add_argument("--steps", type=int, help="only runs with this many recomputation steps")
    parser.add_argument("--method", action="append", help="only this method's runs (repeat for several)")
    args = parser.parse_args()
    results = load_results()
    if not args.render:
        if (args.only in (None, "minilm", "peers")) and not MODEL_FILES["minilm"][0].exists():
            subprocess.run([sys.executable, str(MODELS / "make_minilm.py"), "--exporter", "legacy"], check=True)
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        measured_now: set[str] = set()  # --redo measures a run once per invocation (tables share runs)
        for run in grid(args.only):
            if (args.model and run.model != args.model) or (args.steps and run.steps != args.steps):
                continue
            if args.method and run.method not in args.method:
                continue
            redo = run.method == args.redo and run.key not in measured_now
            if run.key in results and "error" not in results[run.key] and not redo:
                continue
            measured_now.add(run.key)
            started = time.perf_counter()
            print(f"== {run}", file=sys.stderr, flush=True)
            value = measure(run)
            print(f"   {value} ({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)
            append_result(RESULTS, results, {"key": run.key, **value})
            DOC.write_text(render(results))
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text(render(results))
    print(f"wrote {DOC}", file=sys.stderr)


if __name__ == "__main__":
    main()
