"""Quality benchmarks of issue 15: the repair after pruning (each addition alone and together),
models nothing was tuned on, the side-by-side with the peer on TensorFlow exports, and the noise
of repeated seeds. Writes docs/quality.md.

    make bench                                   # runs this after benchmarks/bench.py
    .venv/bin/python benchmarks/quality.py --only repair

Every configuration runs in a fresh subprocess (peak memory is its own). Results accumulate in
benchmarks/results/quality.jsonl, which is committed: a rerun skips configurations already measured
with the same settings (delete lines, or pass --redo, to measure again), and the document can
always be rendered again from it (--render).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import peers
from bench import _child as run_child
from bench import append_result, load_results
from peers import PEERS

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"
UNSEEN = ROOT / "build" / "unseen"
RESULTS = ROOT / "benchmarks" / "results" / "quality.jsonl"
DOC = ROOT / "docs" / "quality.md"

# name -> (model, calibration, evaluation)
FILES = {
    "cnn": (MODELS / "mnist_cnn.onnx", MODELS / "mnist_calib.npz", MODELS / "mnist_eval.npz"),
    "ocr": (MODELS / "ocr_cls.onnx", MODELS / "ocr_cls_calib.npz", MODELS / "ocr_cls_eval.npz"),
    "minilm": (
        ROOT / "build" / "minilm" / "minilm_legacy.onnx",
        MODELS / "minilm_calib.npz",
        MODELS / "minilm_eval.npz",
    ),
    "magika": (MODELS / "magika.onnx", MODELS / "magika_calib.npz", MODELS / "magika_eval.npz"),
    "keras": (MODELS / "keras_digits.onnx", MODELS / "keras_digits_calib.npz", MODELS / "keras_digits_eval.npz"),
    "digits-cnn": (UNSEEN / "digits_cnn_s0.onnx", UNSEEN / "digits_calib.npz", UNSEEN / "digits_eval.npz"),
    "digits-mlp": (UNSEEN / "digits_mlp_s0.onnx", UNSEEN / "digits_calib.npz", UNSEEN / "digits_eval.npz"),
    "mnist-s1": (UNSEEN / "mnist_s1" / "mnist_cnn.onnx", MODELS / "mnist_calib.npz", MODELS / "mnist_eval.npz"),
}
TITLES = {
    "cnn": "MNIST CNN (shipped demo; accuracy)",
    "ocr": "PP-OCR text direction (PaddlePaddle export; accuracy)",
    "minilm": "all-MiniLM-L6-v2 (cosine of the sentence embeddings)",
    "magika": "magika file types (jax2tf → tf2onnx export; accuracy on 46 types of real files)",
    "keras": "Keras digits CNN (tf2onnx export, BatchNorm folded; accuracy)",
    "digits-cnn": "digits CNN (torch, 8×8 scikit-learn digits; accuracy)",
    "digits-mlp": "digits MLP (torch, 8×8 scikit-learn digits; accuracy)",
    "mnist-s1": "MNIST CNN trained with another seed (accuracy)",
}
OFF = {"scale_update": False, "refine_masks": False, "solve_weights": False, "correct_statistics": "off"}
# the estimators whose update of the survivors the repair's first pass scales (the others ignore
# scale_update, so their rows keep the keys they were measured under before it existed)
UPDATED_AT_ONCE = ("woodfisher", "fishleg")
VARIANTS = {
    "none": OFF,
    "update": {**OFF, "scale_update": True},
    "masks": {**OFF, "refine_masks": True},
    "weights": {**OFF, "solve_weights": True},
    "statistics": {**OFF, "correct_statistics": "auto"},
    "masks + weights": {**OFF, "refine_masks": True, "solve_weights": True},
    "all, 1 round": {"repair_rounds": 1},
    "all (default)": {},
}
# models with token rows: the same with every row counted (padding included)
EVERY_ROW = {"all, every row": {"relevant_rows": False}, "none, every row": {**OFF, "relevant_rows": False}}


@dataclass(frozen=True)
class Case:
    model: str
    sparsity: float
    method: str  # an onnxprune method or a peer's name
    settings: tuple = ()  # PruneConfig keyword arguments beyond the defaults, sorted pairs
    label: str = ""  # how the row reads in its table

    @property
    def key(self) -> str:
        return json.dumps(
            {"model": self.model, "sparsity": self.sparsity, "method": self.method, **dict(self.settings)},
            sort_keys=True,
        )

    @staticmethod
    def of(model: str, sparsity: float, method: str, label: str = "", **settings) -> Case:
        if method not in UPDATED_AT_ONCE:
            settings.pop("scale_update", None)
        return Case(model, sparsity, method, tuple(sorted(settings.items())), label)


@dataclass
class Table:
    title: str
    text: str
    cases: list[Case] = field(default_factory=list)


# ------------------------------------------------------------------------------ the grid

# the three targets: each addition alone and together. The runs that take minutes on 2 cores
# (the CNN's WoodFisher, MiniLM) keep the variants that answer the targets.
HEADLINE_TARGETS = [
    ("cnn", 0.95, "woodfisher", {}, ("none", "update", "masks", "weights", "statistics", "all (default)")),
    ("ocr", 0.5, "wanda", {}, tuple(VARIANTS)),
    ("minilm", 0.8, "sparsegpt", {"scope": "layer", "damp": 1e-3}, ("none", "all (default)", "all, every row")),
]
# other estimators and the TensorFlow exports: without and with the repair
OTHER_TARGETS = [
    ("cnn", 0.95, "magnitude", {}),
    ("ocr", 0.5, "sparsegpt", {}),
    ("magika", 0.8, "sparsegpt", {}),
]
UNSEEN_ONESHOT = {"digits-cnn": 0.9, "digits-mlp": 0.9, "mnist-s1": 0.9, "keras": 0.9}
UNSEEN_METHODS = ("magnitude", "diagonal-fisher", "woodfisher", "fishleg", "combined", "sparsegpt", "wanda")
SECOND_ORDER = ("diagonal-fisher", "woodfisher", "fishleg", "combined", "sparsegpt")
GRADUAL = {"schedule": "gradual", "finetune_steps": 300}
GRADUAL_MODELS = ("digits-cnn", "digits-mlp")
GRADUAL_METHODS = ("magnitude", "woodfisher", "fishleg")
SIDE = {"keras": (0.8, 0.9), "magika": (0.8,)}
SIDE_OURS = ("magnitude", "sparsegpt", "woodfisher")
# --method auto tries every estimator with every allocation: measured where the peer is closest
SIDE_AUTO: set[tuple[str, float]] = set()  # none: each auto run tries every estimator, too slow for 2 cores
NOISE = [
    # the estimators-alone rows compare with values measured before: their own method's seed noise
    ("cnn", 0.9, "diagonal-fisher", {"damp": 1e-3, "scope": "global", **OFF}),
    ("cnn", 0.95, "woodfisher", {}),
    ("ocr", 0.5, "wanda", {}),
    ("digits-mlp", 0.9, "woodfisher", {}),
    ("digits-cnn", 0.95, "fishleg", GRADUAL),
    # magika's side-by-side row: WoodFisher 0.859 against magnitude 0.871 (3 of 256 samples)
    ("magika", 0.8, "magnitude", {}),
    ("magika", 0.8, "woodfisher", {}),
]
# Rows of docs/benchmarks.md (the estimators alone, repair off) whose result this changes
# can move: the diagonal Fisher is now damped, the layer-wise statistics leave out padding tokens,
# and --allocation auto has a third candidate. Each with its value as published there (measured
# by `make bench` before these changes), measured again with the same settings.
BENCH_ROWS = [
    ("cnn", 0.9, "diagonal-fisher", {"damp": 1e-3, "scope": "global"}, 0.8460),
    ("cnn", 0.95, "diagonal-fisher", {"damp": 1e-3, "scope": "global"}, 0.7030),
    ("cnn", 0.95, "diagonal-fisher", {"damp": 1e-3, "scope": "global", "steps": 4}, 0.8710),
    ("cnn", 0.9, "woodfisher", {"scope": "auto"}, 0.9490),
    ("cnn", 0.9, "sparsegpt", {"scope": "auto"}, 0.9530),
    ("ocr", 0.5, "wanda", {"scope": "auto"}, 0.7969),
    ("minilm", 0.8, "sparsegpt", {"damp": 1e-3, "scope": "layer"}, 0.6056),
    ("minilm", 0.7, "sparsegpt", {"damp": 1e-3, "scope": "layer"}, 0.7556),
    ("minilm", 0.9, "sparsegpt", {"damp": 1e-3, "scope": "layer"}, 0.3992),
    ("minilm", 0.8, "wanda", {"damp": 1e-3, "scope": "layer"}, 0.3931),
    ("minilm", 0.8, "sparsegpt", {"damp": 1e-3, "scope": "auto"}, 0.6056),
    ("minilm", 0.8, "diagonal-fisher", {"damp": 1e-3, "scope": "global"}, 0.0978),
]


# the value published before these changes, by the bench row's key (filled by tables())
BEFORE: dict[str, float] = {}


def tables() -> dict[str, Table]:
    out = {}
    repair = Table(
        "The repair after pruning: each addition alone and together",
        "One shot, no fine-tuning, the method's defaults otherwise (automatic damping and allocation "
        "unless given). *none*: the estimator alone; *masks*: DSnoT-style swaps; *weights*: least-squares "
        "surviving weights for the fixed mask; *statistics*: output mean (and, where a normalisation reads "
        "it, variance) matched to the dense model's; masks and weights alternate twice by default (*1 round*: "
        "once); *every row*: padding tokens counted in the layer statistics (the default leaves out the rows "
        "the outputs never read). Each pass is kept only if it lowered the held-out calibration loss "
        "(*kept* lists which were).",
    )
    for model, sparsity, method, extra, names in HEADLINE_TARGETS:
        variants = {**VARIANTS, **EVERY_ROW}
        for variant in names:
            repair.cases.append(Case.of(model, sparsity, method, variant, **{**extra, **variants[variant]}))
    for model, sparsity, method, extra in OTHER_TARGETS:
        for variant in ("none", "all (default)"):
            label = f"{method}, {variant}"
            repair.cases.append(Case.of(model, sparsity, method, label, **{**extra, **VARIANTS[variant]}))
    out["repair"] = repair

    unseen = Table(
        "Models nothing was tuned on",
        "Every estimator with its defaults (repair included) on models no default was chosen on: "
        "torch-trained digits classifiers built by `models/make_digits.py`, the shipped CNN's recipe "
        "with another training seed and the Keras TensorFlow export (PP-OCR and MiniLM, where defaults "
        "were tuned, are in the first table). One shot at "
        "the sparsity given; the gradual rows prune in 8 cubic steps with 300 fine-tuning steps in all "
        "(Adam, lr 1e-4, labels). **below magnitude** marks a second-order estimator under magnitude "
        "at the same budget by more than the noise (see the last table). The digits CNN and the seed-1 "
        "CNN are trained when the bench first runs on a machine, and training is not bit-identical across "
        "machines: their rows were measured again on 2026-12-03 with the models built then (dense "
        "0.9950 and 0.960; the earlier copies had 0.9924 and 0.959). Rows measured that day ran three to "
        "four processes at a time (wall times up to four times a lone run's).",
    )
    for model, sparsity in UNSEEN_ONESHOT.items():
        unseen.cases += [Case.of(model, sparsity, m, m) for m in UNSEEN_METHODS]
    for model in GRADUAL_MODELS:
        unseen.cases += [Case.of(model, 0.95, m, f"{m}, gradual", **GRADUAL) for m in GRADUAL_METHODS]
    out["unseen"] = unseen

    side = Table(
        "Side by side with the peer (onnxsim 0.8.1) on TensorFlow exports",
        "One shot, no fine-tuning, same files and 256 calibration samples; onnxprune with its defaults "
        "(repair, automatic damping and allocation), the peer's functions with theirs (as in "
        "docs/benchmarks.md). The peer's wall time covers pruning and saving only. Measured two "
        "configurations at a time on the 2 cores (as were the unseen, noise and estimators-alone tables; "
        "the repair table ran alone): every wall time there is up to twice a lone run's, ours and the "
        "peer's alike. The WoodFisher and FishLeg rows measured after the update scaling was added ran "
        "three to four processes at a time: up to four times a lone run's wall time.",
    )
    for model, sparsities in SIDE.items():
        for sparsity in sparsities:
            side.cases += [Case.of(model, sparsity, m, m) for m in SIDE_OURS]
            if (model, sparsity) in SIDE_AUTO:
                side.cases.append(Case.of(model, sparsity, "auto", "auto (method)"))
            side.cases += [Case.of(model, sparsity, p, p) for p in PEERS]
    out["side"] = side

    bench = Table(
        "The estimators alone: rows of docs/benchmarks.md these changes can move",
        "Repair off, the settings of docs/benchmarks.md's row (damping 1e-3 where it says so, else "
        "automatic). *before* is the value published there, measured by `make bench` before this change: "
        "the diagonal Fisher is now damped like WoodFisher, the layer-wise statistics leave out the token "
        "rows the outputs never read, and `--allocation auto` also tries the magnitude profile. Each change "
        "against *before* is judged against the seed spread of the same method on the same model in the noise "
        "table (measured at the sparsity given there).",
    )
    for model, sparsity, method, extra, before in BENCH_ROWS:
        label = method + (f" ({extra['scope']})" if extra.get("scope", "global") != "global" else "")
        label += f", {extra['steps']} steps" if extra.get("steps") else ""
        label += f" (before: {before:.4f})" if before is not None else ""
        bench.cases.append(Case.of(model, sparsity, method, label, **{**extra, **OFF}))
        if before is not None:
            BEFORE[bench.cases[-1].key] = before
    out["bench"] = bench

    noise = Table(
        "Noise: the same run with other seeds",
        "Seeds change the calibration split, sampled labels, gradient order and fine-tuning batches.",
    )
    for model, sparsity, method, extra in NOISE:
        # seed 0 is the default: the same run as the other tables'
        what = method + (", gradual" if extra.get("schedule") == "gradual" else "")
        what += ", repair off" if extra.get("correct_statistics") == "off" else ""
        noise.cases += [Case.of(model, sparsity, method, f"{what}, seed 0", **extra)]
        noise.cases += [Case.of(model, sparsity, method, f"{what}, seed {s}", seed=s, **extra) for s in (1, 2)]
    out["noise"] = noise
    return out


# ------------------------------------------------------------------------------ measuring


def build_unseen() -> None:
    """The models built in code (not shipped): digits classifiers, the CNN with another seed."""
    sys.path.insert(0, str(MODELS))
    import make_digits

    for kind in ("cnn", "mlp"):
        if not FILES[f"digits-{kind}"][0].exists():
            make_digits.write(kind, 0, UNSEEN)
    if not FILES["mnist-s1"][0].exists():
        out = FILES["mnist-s1"][0].parent
        subprocess.run(
            [sys.executable, str(MODELS / "make_mnist_cnn.py"), "--seed", "1", "--out", str(out)], check=True
        )
    if not FILES["minilm"][0].exists():
        subprocess.run([sys.executable, str(MODELS / "make_minilm.py"), "--exporter", "legacy"], check=True)


def measure(case: Case) -> dict:
    model, calib, evaluation = FILES[case.model]
    out = ROOT / "build" / "bench" / f"quality_{case.model}_{os.getpid()}.onnx"  # one per concurrent run
    out.parent.mkdir(parents=True, exist_ok=True)
    if case.method in PEERS:
        code = peers.child_code(case.method, str(model), str(calib), str(evaluation), str(out), case.sparsity, 256)
    else:
        code = CHILD.format(
            model=str(model), out=str(out), calib=str(calib), evaluation=str(evaluation),
            sparsity=case.sparsity, method=case.method, settings=dict(case.settings),
        )  # fmt: skip
    return run_child(code)


CHILD = """
import json, resource, time, logging
from onnxprune import PruneConfig, prune
logging.getLogger("onnxprune").setLevel(logging.ERROR)
started = time.perf_counter()
report = prune(PruneConfig(input={model!r}, output={out!r}, force=True, sparsity={sparsity}, method={method!r},
    calibration={calib!r}, evaluation={evaluation!r}, progress="off", **{settings!r}))
q, p = report.validation.quality, report.pruning
repair = p.repair or {{}}
print(json.dumps({{
    "metric": q.metric, "before": q.before, "after": q.after, "wall_seconds": time.perf_counter() - started,
    "peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "sparsity": p.sparsity,
    "method": p.method, "allocation": p.allocation,
    "damp": (report.fisher.estimator.get("damp") if report.fisher else None),
    "kept": [s["addition"] for s in repair.get("steps", []) if s["kept"]],
    "scales": [s["scale"] for s in repair.get("steps", []) if s["addition"] == "update" and s["kept"]],
    "repair_seconds": round(sum(s["seconds"] for s in repair.get("steps", [])), 1),
}}))
"""


def load() -> dict[str, dict]:
    return load_results(RESULTS)


# ------------------------------------------------------------------------------ rendering


def cell(v: dict | None) -> tuple[str, str, str, str]:
    if v is None:
        return "not measured", "", "", ""
    if "error" in v:
        return f"failed: {v['error']}", "", "", ""
    reached = "" if v["sparsity"] >= v.get("target", 0) - 0.005 else " (not reached)"
    return (
        f"{v['after']:.4f}{reached}",
        f"{v['wall_seconds']:.1f} s",
        f"{v['peak_bytes'] / 2**30:.2f} GiB",
        ", ".join(_kept(v)),
    )


def _kept(v: dict) -> list[str]:
    """The repair passes kept, the update pass with the fraction of the update it kept."""
    scales = iter(v.get("scales", []))
    return [f"update ×{next(scales, 1):g}" if k == "update" else k for k in v.get("kept", [])]


def render(results: dict[str, dict]) -> str:
    import onnxruntime
    import torch

    from onnxprune import __version__

    lines = [
        "# Quality: repair after pruning, unseen models, TensorFlow exports",
        "",
        "Produced by `make bench` (`benchmarks/quality.py`, results in `benchmarks/results/quality.jsonl`); "
        f"do not edit by hand. On {platform.machine()} CPU with {os.cpu_count()} cores (onnxprune {__version__}, "
        f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}); each row is a separate process. "
        "The estimators alone, with the repair switched off, are in docs/benchmarks.md.",
        "",
    ]
    grid = tables()
    noise = noise_levels(results, grid["noise"])
    for name, table in grid.items():
        lines += [f"## {table.title}", "", table.text, ""]
        lines += render_table(name, table, results, noise)
        lines.append("")
    return "\n".join(lines)


def noise_levels(results: dict[str, dict], table: Table) -> dict[tuple[str, str], float]:
    """The largest spread (max − min) of the headline metric over the seeds measured, per
    (model, method) and per (model, "") over every method of the model."""
    spread: dict[tuple[str, str], float] = {}
    groups: dict[tuple, list[float]] = {}
    for case in table.cases:
        v = results.get(case.key)
        if v and "error" not in v:
            groups.setdefault((case.model, case.method, case.sparsity), []).append(v["after"])
    for (model, method, _), values in groups.items():
        if len(values) > 1:
            for key in ((model, method), (model, "")):
                spread[key] = max(spread.get(key, 0.0), max(values) - min(values))
    return spread


def render_table(name: str, table: Table, results: dict[str, dict], noise: dict[tuple[str, str], float]) -> list[str]:
    lines = [
        "| model | sparsity | method | metric | wall time | peak memory | notes |",
        "| --- | ---: | --- | ---: | ---: | ---: | --- |",
    ]
    magnitude = {}
    for case in table.cases:
        v = results.get(case.key)
        if case.method == "magnitude" and v and "error" not in v:
            magnitude[(case.model, case.sparsity, dict(case.settings).get("schedule", "oneshot"))] = v["after"]
    for case in table.cases:
        v = results.get(case.key)
        metric, wall, peak, kept = cell(v)
        notes = []
        if kept and name != "unseen":
            notes.append(f"kept: {kept}")
        if v and "error" not in v:
            if case.method == "auto":
                notes.append(f"chose {v['method']} ({v['allocation']})")
            elif case.method not in PEERS and v.get("allocation"):
                notes.append(v["allocation"])
            base = magnitude.get((case.model, case.sparsity, dict(case.settings).get("schedule", "oneshot")))
            if name in ("unseen", "side") and case.method in SECOND_ORDER and base is not None:
                if v["after"] < base - noise.get((case.model, ""), 0.01):
                    notes.append(f"**below magnitude ({base:.4f})**")
            before = BEFORE.get(case.key)
            if name == "bench" and before is not None:
                spread = noise.get((case.model, case.method))
                change = v["after"] - before
                if spread is None:
                    notes.append(f"{change:+.4f} vs before (noise of this method not measured)")
                elif change < -spread:
                    notes.append(f"**{change:+.4f} vs before: worse by more than its seed spread {spread:.3f}**")
                else:
                    notes.append(f"{change:+.4f} vs before (seed spread of this method {spread:.3f})")
        row = (case.model, f"{case.sparsity:.0%}", case.label or case.method, metric, wall, peak, "; ".join(notes))
        lines.append("| " + " | ".join(row) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["repair", "unseen", "side", "bench", "noise"])
    parser.add_argument("--render", action="store_true", help="only rewrite docs/quality.md from the results")
    parser.add_argument("--redo", metavar="METHOD", help="measure this method's runs again")
    parser.add_argument("--models", help="comma-separated models to measure (default: all)")
    parser.add_argument("--methods", help="comma-separated methods to measure (default: all)")
    args = parser.parse_args()
    results = load()
    if not args.render:
        build_unseen()
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        wanted = set(args.models.split(",")) if args.models else None
        methods = set(args.methods.split(",")) if args.methods else None
        for name, table in tables().items():
            if args.only and name != args.only:
                continue
            for case in table.cases:
                if (wanted and case.model not in wanted) or (methods and case.method not in methods):
                    continue
                if case.key in results and "error" not in results[case.key] and case.method != args.redo:
                    continue
                started = time.perf_counter()
                print(f"== {case.key}", file=sys.stderr, flush=True)
                value = {"key": case.key, "target": case.sparsity, **measure(case)}
                print(f"   {value} ({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)
                append_result(RESULTS, results, value)
                DOC.write_text(render(results))
    DOC.write_text(render(results))
    print(f"wrote {DOC}", file=sys.stderr)


if __name__ == "__main__":
    main()
