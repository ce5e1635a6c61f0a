"""The allocation search's shared block factors (issue 18): WoodFisher with `--allocation auto` on
all-MiniLM-L6-v2, once with `--shared-factors` (the default: each block's inverse factored once in
saliency order, every candidate a triangular solve) and once with `--no-shared-factors` (each
candidate factors its own pruned sets), against `--allocation global` alone and the peer's
SparseGPT, all measured in one invocation on one machine. Writes docs/shared_factors.md.

    make bench                          # runs this after the other benchmarks
    .venv/bin/python benchmarks/shared_factors.py [--sparsities 0.8] [--seeds 0] [--render]

Settings as docs/defaults.md's (256 gradients, `--damp auto`, `--search-holdout unused`, the repair
off); each run a fresh process (bench.measure), results in benchmarks/results/shared_factors.jsonl
(a rerun skips what is measured; --redo measures again).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from bench import Run, load_results, machine, measure_missing

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "shared_factors.jsonl"
DOC = ROOT / "docs" / "shared_factors.md"
PEER = "onnxsim sparsegpt"
MAX_AUTO_RATIO = 1.3  # the target: --allocation auto at most 1.3x a single allocation


def runs(sparsity: float, seed: int) -> dict[str, Run]:
    unused = "unused"  # docs/defaults.md's setting: a run keeping global drew global's samples
    shared = Run("minilm", "woodfisher", sparsity, 1, damp="auto", allocation="auto", seed=seed, search_holdout=unused)
    return {
        "auto": shared,
        "auto, --no-shared-factors": replace(shared, shared_factors=False),
        "global": replace(shared, damp=1e-3, allocation="global", search_holdout="quarter"),
        "peer SparseGPT": Run("minilm", PEER, sparsity, 1, seed=seed),
    }


def _machines(results: dict[str, dict], sparsities) -> str:
    """The peer's wall time here against docs/defaults.md's, which shows how the machines differ."""
    there = load_results(ROOT / "benchmarks" / "results" / "defaults.jsonl")
    pairs = []
    for sparsity in sparsities:
        key = Run("minilm", PEER, sparsity, 1).key
        if key in results and key in there and "error" not in results[key]:
            here, before = results[key]["wall_seconds"], there[key]["wall_seconds"]
            pairs.append(f"{here:.0f} s here against {before:.0f} s there at {sparsity:.0%}")
    return f" (the peer took {'; '.join(pairs)})" if pairs else ""


def render(results: dict[str, dict], sparsities, seeds) -> str:
    lines = [
        "# The allocation search's shared block factors on all-MiniLM-L6-v2",
        "",
        f"Produced by `make bench` (`benchmarks/shared_factors.py`); do not edit by hand. On {machine()}; every "
        "run a separate process, one at a time, all in one invocation. Wall times from another day's machine "
        f"are not comparable{_machines(results, sparsities)}.",
        "",
        "*auto*: WoodFisher with `--allocation auto --damp auto --search-holdout unused` (docs/defaults.md's "
        "setting; global, layer and magnitude tried on held-out samples); *auto, --no-shared-factors*: the same, "
        "each candidate factoring its own pruned sets as before; *global*: `--allocation global --damp 1e-3` "
        "alone. The repair is off (the estimator measured alone). *trials*: each allocation candidate's "
        "seconds (pruning, update and held-out evaluation; the first includes the shared factorisation).",
        "",
        "| sparsity | seed | run | chose | cosine | wall time | / global | trials (s) | peak memory |",
        "| ---: | ---: | --- | --- | ---: | ---: | ---: | --- | ---: |",
    ]
    checks = []
    for sparsity in sparsities:
        for seed in seeds:
            measured = {label: results.get(run.key) for label, run in runs(sparsity, seed).items()}
            if any(v is None or "error" in v for v in measured.values()):
                continue
            single = measured["global"]["wall_seconds"]
            for label, v in measured.items():
                search = v.get("allocation_search") or {}
                trials = ", ".join(f"{s:.0f}" for s in search.get("seconds", []))
                ratio = f"{v['wall_seconds'] / single:.2f}" if label != "peer SparseGPT" else ""
                chose = v.get("allocation", "") if label.startswith("auto") else ""
                lines.append(
                    f"| {sparsity:.0%} | {seed} | {label} | {chose} | {v['after']:.4f} | {v['wall_seconds']:.1f} s | "
                    f"{ratio} | {trials} | {v['peak_bytes'] / 2**30:.2f} GiB |"
                )
            auto, before, peer = measured["auto"], measured["auto, --no-shared-factors"], measured["peer SparseGPT"]
            ratio = auto["wall_seconds"] / single
            checks.append(
                f"- {sparsity:.0%}, seed {seed}: auto / global {ratio:.2f} "
                f"{'≤' if ratio <= MAX_AUTO_RATIO else '>'} {MAX_AUTO_RATIO:g} "
                f"({'met' if ratio <= MAX_AUTO_RATIO else 'missed'}; {before['wall_seconds'] / single:.2f} without "
                f"shared factors); the same allocation chosen: {auto['allocation'] == before['allocation']}, cosine "
                f"{auto['after']:.4f} against {before['after']:.4f}; auto's wall time "
                f"{'≤' if auto['wall_seconds'] <= peer['wall_seconds'] else '>'} the peer's "
                f"({auto['wall_seconds']:.0f} s, {peer['wall_seconds']:.0f} s)"
            )
    lines += ["", "Checks (one run each: a single run's wall time varies by about ±15% on these machines):", ""]
    return "\n".join(lines + checks) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sparsities", type=lambda s: tuple(float(x) for x in s.split(",")), default=(0.8,))
    parser.add_argument("--seeds", type=lambda s: tuple(int(x) for x in s.split(",")), default=(0,))
    parser.add_argument("--redo", action="store_true", help="measure again what is already measured")
    parser.add_argument("--render", action="store_true", help="only rewrite docs/shared_factors.md")
    args = parser.parse_args()
    results = load_results(RESULTS)
    if not args.render:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        todo = [run for sparsity in args.sparsities for seed in args.seeds for run in runs(sparsity, seed).values()]
        measure_missing(RESULTS, results, todo, args.redo)
    DOC.write_text(render(results, args.sparsities, args.seeds))
    print(f"wrote {DOC}", file=sys.stderr)


if __name__ == "__main__":
    main()
