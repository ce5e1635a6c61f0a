"""A K-FAC estimator against WoodFisher on all-MiniLM-L6-v2 at four sparsities and on five other
models at one (issue 18: "an M-FAC-style or K-FAC estimator where it is cheaper at equal quality;
measure, keep what wins"). Writes docs/kfac.md.

    make bench                          # runs this after the other benchmarks
    .venv/bin/python benchmarks/kfac.py [--sparsities 0.5,0.7,0.8,0.9] [--models cnn,keras,...]
        [--runs 'LABEL;...'] [--redo] [--render]

The K-FAC estimator is `--method combined --mix 1`: for a layer y = W x the Fisher of W is taken as
G ⊗ H with H = mean x xᵀ over the layer's input rows and G the output units' Fisher, diagonal
(s_i = mean (∂ℓ/∂y_i)²); each row then gets SparseGPT's OBS sweep on s_i·H. Its statistics are the
layer inputs and one backward pass per batch, not 256 per-sample gradients. WoodFisher as in
docs/shared_factors.md (blocks of 128, 256 gradients). Each run a fresh process (bench.measure), one
at a time, all in one invocation; results in benchmarks/results/kfac.jsonl (a rerun skips what is
measured). The repair is off: the estimators alone.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import bench
import quality
from bench import Run, load_results, machine, measure_missing
from defaults import pair

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "kfac.jsonl"
DOC = ROOT / "docs" / "kfac.md"
KFAC, WOODFISHER = "K-FAC", "WoodFisher"
ALLOCATIONS = ("global", "layer", "auto")
# Other models, both estimators with onnxprune's default searches at one sparsity each: whether what
# MiniLM shows belongs to the estimator or to MiniLM (the digits models and the Keras export are
# docs/quality.md's models nothing was tuned on; PP-OCR is the mobile CNN of issue 15)
OTHERS = {"cnn": 0.9, "keras": 0.9, "ocr": 0.5, "digits-cnn": 0.9, "digits-mlp": 0.9}


def runs(sparsity: float) -> dict[str, Run]:
    """The runs of one sparsity, by label: each estimator with each allocation (auto: the default
    allocation and damping searches, as docs/defaults.md runs them)."""
    auto, single = pair(sparsity, 0)
    woodfisher = {"global": single, "auto": replace(auto, shared_factors=True)}
    measured = {}
    for allocation in ALLOCATIONS:
        base = woodfisher["auto" if allocation == "auto" else "global"]
        kfac = replace(base, method="combined", mix=1.0, shared_factors=True)
        measured[f"{KFAC}, {allocation}"] = replace(kfac, allocation=allocation) if allocation == "layer" else kfac
        if allocation in woodfisher:
            measured[f"{WOODFISHER}, {allocation}"] = woodfisher[allocation]
    return measured


def other_runs(model: str, sparsity: float) -> dict[str, Run]:
    """K-FAC and WoodFisher on another model, each with the default allocation and damping searches."""
    woodfisher = replace(pair(sparsity, 0)[0], model=model, shared_factors=True)
    return {f"{KFAC}, auto": replace(woodfisher, method="combined", mix=1.0), f"{WOODFISHER}, auto": woodfisher}


def render(results: dict[str, dict], sparsities) -> str:
    lines = [
        "# A K-FAC estimator against WoodFisher on all-MiniLM-L6-v2 and five other models",
        "",
        f"Produced by `make bench` (`benchmarks/kfac.py`); do not edit by hand. On {machine()}; every run a "
        "separate process, one at a time, nothing else running, all in one invocation (*measured*: when each "
        "ended). One shot at seed 0, the repair off (the estimators alone), cosine of the sentence embeddings "
        "to the original on 256 held-out sentences.",
        "",
        "*K-FAC*: `--method combined --mix 1`, the Fisher of each layer's weights as s_i·XᵀX (the output "
        "unit's task-loss Fisher times the mean outer product of the layer's inputs) and SparseGPT's OBS sweep "
        "on it; statistics from the layer inputs and one backward pass per batch of the 256 calibration "
        "samples. *WoodFisher*: blocks of 128, 256 per-sample gradients. *global* and *layer*: the allocation "
        "given, damping 1e-3; *auto*: `--allocation auto --damp auto --search-holdout unused` (onnxprune's "
        "default searches, docs/defaults.md). *est./grad.*: the estimator's seconds over the statistics' "
        "seconds.",
        "",
        "| sparsity | estimator | allocation | chose | cosine | wall time | peak memory | est./grad. | measured |",
        "| ---: | --- | --- | --- | ---: | ---: | ---: | ---: | --- |",
    ]
    checks = []
    for sparsity in sparsities:
        measured = {label: results.get(run.key) for label, run in runs(sparsity).items()}
        measured = {label: v for label, v in measured.items() if v is not None and "error" not in v}
        for label, v in sorted(measured.items(), key=lambda item: item[0].split(", ")[::-1]):
            lines.append(_row([f"{sparsity:.0%}", *label.split(", ")], v))
        checks += _checks(sparsity, measured)
    lines += ["", "Checks (one run each; a run's wall time varies by about ±15% here):", ""]
    return "\n".join(lines + checks + _others(results)) + "\n"


def _others(results: dict[str, dict]) -> list[str]:
    """The table and checks of the other models."""
    lines = [
        "",
        "## Five other models",
        "",
        "Both estimators with onnxprune's default searches (`--allocation auto --damp auto --search-holdout "
        "unused`), the repair off, 256 gradients or calibration samples, one sparsity per model; the metric "
        "is the top-1 accuracy on the model's evaluation set. *cnn*: the shipped MNIST CNN; *keras*: the "
        "TensorFlow export of a digits CNN (tf2onnx); *ocr*: PP-OCR's text-direction classifier (PaddlePaddle "
        "export); *digits-cnn*, *digits-mlp*: torch models of scikit-learn's 8×8 digits "
        "(`models/make_digits.py`, seed 0).",
        "",
        "| model | sparsity | estimator | chose | accuracy | wall time | peak memory | est./grad. | measured |",
        "| --- | ---: | --- | --- | ---: | ---: | ---: | ---: | --- |",
    ]
    checks = []
    for model, sparsity in OTHERS.items():
        measured = {label: results.get(run.key) for label, run in other_runs(model, sparsity).items()}
        measured = {label: v for label, v in measured.items() if v is not None and "error" not in v}
        for label, v in measured.items():
            lines.append(_row([model, f"{sparsity:.0%}", label.split(", ")[0]], v))
        checks += [line.replace("- ", f"- {model}, ", 1) for line in _checks(sparsity, measured)[:-1]]
    return lines + ["", "Checks:", ""] + checks + _tally(results) if checks else lines


def _tally(results: dict[str, dict]) -> list[str]:
    """Over every model, with the default searches: where K-FAC was at least as good, and where
    it was also faster."""
    pairs = [(f"MiniLM {sparsity:.0%}", runs(sparsity)) for sparsity in (0.5, 0.7, 0.8, 0.9)]
    pairs += [(f"{model} {sparsity:.0%}", other_runs(model, sparsity)) for model, sparsity in OTHERS.items()]
    better, faster, total = [], [], 0
    for name, group in pairs:
        kfac, woodfisher = results.get(group[f"{KFAC}, auto"].key), results.get(group[f"{WOODFISHER}, auto"].key)
        if not kfac or not woodfisher or "error" in kfac or "error" in woodfisher:
            continue
        total += 1
        if kfac["after"] >= woodfisher["after"]:
            better.append(name)
            if kfac["wall_seconds"] <= woodfisher["wall_seconds"]:
                faster.append(name)
    return [
        "",
        f"With the default searches K-FAC was at least as good as WoodFisher in {len(better)} of {total} comparisons "
        f"({', '.join(better) or 'none'}), and also faster in {len(faster)} ({', '.join(faster) or 'none'}).",
    ]


def _row(first: list[str], v: dict) -> str:
    """A table row: the `first` cells, then what was chosen and measured."""
    spent = f"{v['estimator_seconds'] / v['gradient_seconds']:.2f}" if v.get("gradient_seconds") else ""
    cells = [*first, v.get("allocation", ""), f"{v['after']:.4f}", f"{v['wall_seconds']:.1f} s"]
    cells += [f"{v['peak_bytes'] / 2**30:.2f} GiB", spent, v.get("measured_at", "")]
    return "| " + " | ".join(cells) + " |"


def _checks(sparsity: float, measured: dict[str, dict]) -> list[str]:
    """For each allocation measured with both: is K-FAC cheaper at equal quality?"""
    out = []
    for allocation in ALLOCATIONS:
        kfac, woodfisher = measured.get(f"{KFAC}, {allocation}"), measured.get(f"{WOODFISHER}, {allocation}")
        if kfac is None or woodfisher is None:
            continue
        delta = kfac["after"] - woodfisher["after"]
        time_ratio = kfac["wall_seconds"] / woodfisher["wall_seconds"]
        peak_ratio = kfac["peak_bytes"] / woodfisher["peak_bytes"]
        wins = delta >= 0 and time_ratio <= 1
        out.append(
            f"- {sparsity:.0%}, {allocation}: K-FAC's {kfac['metric']} {kfac['after']:.4f} against WoodFisher's "
            f"{woodfisher['after']:.4f} ({delta:+.4f}), in {time_ratio:.2f}x its wall time and {peak_ratio:.2f}x "
            f"its peak: {'cheaper at equal or better quality' if wins else 'not cheaper at equal quality'}"
        )
    if measured:
        label, v = max(measured.items(), key=lambda item: item[1]["after"])
        out.append(f"- {sparsity:.0%}: the best cosine measured, {v['after']:.4f}: {label}")
    return out


def _files(models: list[str]) -> None:
    """The other models' files where bench.measure finds them (the digits models built here, as
    quality.py builds them)."""
    unknown = sorted(set(models) - set(OTHERS))
    if unknown:
        raise SystemExit(f"unknown model(s) {', '.join(unknown)}; valid: {', '.join(OTHERS)}")
    for model in models:
        bench.MODEL_FILES[model] = quality.FILES[model]
        if model.startswith("digits-") and not quality.FILES[model][0].exists():
            sys.path.insert(0, str(quality.MODELS))
            import make_digits

            make_digits.write(model.removeprefix("digits-"), 0, quality.UNSEEN)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--sparsities", type=lambda s: tuple(float(x) for x in s.split(",") if x), default=(0.5, 0.7, 0.8, 0.9)
    )
    parser.add_argument("--runs", help="only these runs, labels separated by ';' (e.g. 'K-FAC, global;K-FAC, layer')")
    parser.add_argument(
        "--models", default=",".join(OTHERS), help=f"the other models measured (of {', '.join(OTHERS)}; '' for none)"
    )
    parser.add_argument("--redo", action="store_true", help="measure again what is already measured")
    parser.add_argument("--render", action="store_true", help="only rewrite docs/kfac.md")
    args = parser.parse_args()
    results = load_results(RESULTS)
    if not args.render:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        chosen = None if args.runs is None else {label.strip() for label in args.runs.split(";")}
        # K-FAC's runs first, the cheap ones: an interrupted invocation has them all
        todo = [
            run
            for estimator in (KFAC, WOODFISHER)
            for sparsity in args.sparsities
            for label, run in runs(sparsity).items()
            if label.startswith(estimator) and (chosen is None or label in chosen)
        ]
        others = [m for m in args.models.split(",") if m]
        _files(others)
        todo += [
            run
            for model in others
            for label, run in other_runs(model, OTHERS[model]).items()
            if chosen is None or label in chosen
        ]
        rewrite = lambda: DOC.write_text(render(results, args.sparsities))  # noqa: E731
        measure_missing(RESULTS, results, todo, args.redo, after=rewrite)
    DOC.write_text(render(results, args.sparsities))
    print(f"wrote {DOC}", file=sys.stderr)


if __name__ == "__main__":
    main()
