"""Behaviour identity of two source trees: the same runs (the demo, a sweep, a gradual FishLeg run
with fine-tuning, an interrupted and resumed run) with the same seed, in subprocesses, each tree
imported from its own folder; the written models' bytes and the reports' fields are compared.

    python tests/identity.py BEFORE_TREE AFTER_TREE WORK_FOLDER

tests/test_identity.py (slow) runs it with a `git archive` of a pinned commit as BEFORE and this
checkout as AFTER. Fields that measure time, memory, paths or the machine are left out, and so
are the fields a refactor may add (ADDED). Behaviour added on purpose since the pinned commit is
switched off in the later tree by AFTER_FLAGS, so the comparison still covers everything else.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

MODELS = Path(__file__).resolve().parents[1] / "models"
DATA = ["--calib", str(MODELS / "mnist_calib.npz"), "--eval", str(MODELS / "mnist_eval.npz")]
GRADUAL = ["--method", "fishleg", "--schedule", "gradual", "--prune-steps", "3", "--finetune-steps", "30"]
RUNS = {
    "demo": ["prune", str(MODELS / "mnist_cnn.onnx"), "{out}/demo.onnx", "--sparsity", "0.8", *DATA],
    "sweep": [
        "sweep",
        str(MODELS / "mnist_cnn.onnx"),
        "-o",
        "{out}/sweep",
        "--sparsity",
        "0.5,0.9",
        "--method",
        "magnitude,woodfisher",
        "--keep-models",
        *DATA,
    ],  # fmt: skip
    "gradual": ["prune", str(MODELS / "mnist_cnn.onnx"), "{out}/gradual.onnx", "--sparsity", "0.9", *GRADUAL, *DATA],
}
# the resumed run: the gradual run stopped after its second pruning step, then run with --resume
INTERRUPT = """
import sys, onnxprune.oneshot as o
step, calls = o.Pruner.step, []
def stop(self, *a, **k):
    calls.append(1)
    if len(calls) == 3:
        raise KeyboardInterrupt
    return step(self, *a, **k)
o.Pruner.step = stop
from onnxprune_cli.main import main
sys.argv = ["onnxprune", *sys.argv[1:]]
main()
"""
# behaviour added since the pinned commit, switched off (the augmented distillation added since
# leaves these runs alone, their calibration data has labels): the allocation search's shared
# factors solve the same updates to float rounding, not to the bit
AFTER_FLAGS: tuple[str, ...] = ("--no-shared-factors",)
CLI = "import sys; from onnxprune_cli.main import main; sys.argv = ['onnxprune', *sys.argv[1:]]; main()"
# (and every field named *seconds); paths are compared with the work folder written as <out>
# the last: 80% of free memory; latency and speedup: onnxruntime timed on a shared machine
VOLATILE = {"timings", "peak_memory_bytes", "environment", "memory_budget_bytes", "latency", "speedup"}
# fields a refactor may add to the report (a new name beside an unchanged old one)
ADDED = {
    "allocation",
    "torch_vs_onnxruntime_max_abs_error",
    # issue 17: structured pruning and the speed section (every field under `speed` is new)
    "structure",
    "channels",
    "speed",
    "speed_runs",
    "speed_batch",
    "speed_threads",
    "speedup",
    "target_speedup",
    # the update scaling's setting
    "scale_update",
    # issue 17: distillation on augmented batches (settings, and how the report says it was done)
    "augment",
    "augment_rate",
    "augmentation",
    # issue 18: where the searches' held-out samples come from; why a damping search stopped
    "search_holdout",
    "why",
    # issue 18: the allocation search's candidates share WoodFisher's block factors
    "shared_factors",
}


def _env(tree: Path, shim: Path) -> dict[str, str]:
    """The environment importing `tree`'s sources (the runs start in `tree`: `python -c` puts the
    working folder before PYTHONPATH, ahead of an editable install of another checkout)."""
    shim.mkdir(parents=True, exist_ok=True)
    link = shim / "onnxprune_cli"
    if not link.exists():
        link.symlink_to(tree / "cli", target_is_directory=True)
    return {**os.environ, "PYTHONPATH": f"{tree}{os.pathsep}{shim}", "HF_HUB_OFFLINE": "1"}


def run_tree(tree: Path, out: Path, runs: tuple[str, ...] = (*RUNS, "resumed"), flags: tuple[str, ...] = ()) -> None:
    """The `runs` (every one of RUNS and the resumed run), on the sources in `tree`, writing under
    `out`, each with `flags` added."""
    out.mkdir(parents=True, exist_ok=True)
    env = _env(tree, out / "shim")
    for name in runs:
        if name in RUNS:
            args = [a.format(out=out) for a in RUNS[name]] + list(flags)
            subprocess.run([sys.executable, "-c", CLI, *args, "-q"], env=env, cwd=tree, check=True)
    if "resumed" in runs:
        resumed = [a.format(out=out).replace("gradual.onnx", "resumed.onnx") for a in RUNS["gradual"]] + list(flags)
        stopped = subprocess.run([sys.executable, "-c", INTERRUPT, *resumed, "-q"], env=env, cwd=tree)
        if stopped.returncode == 0 or not (out / "resumed.onnx.ckpt").exists():
            raise RuntimeError(f"the run to resume did not stop with a checkpoint (exit {stopped.returncode})")
        subprocess.run([sys.executable, "-c", CLI, *resumed, "--resume", "-q"], env=env, cwd=tree, check=True)


def _fields(value, out: str, path=""):
    """(dotted path, value) of every leaf, volatile fields left out."""
    if isinstance(value, dict):
        for key, item in value.items():
            if key not in VOLATILE and not key.endswith("seconds"):
                yield from _fields(item, out, f"{path}.{key}" if path else key)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _fields(item, out, f"{path}[{index}]")
    elif isinstance(value, str):
        yield path, value.replace(out, "<out>")
    else:
        yield path, value


def outcome(out: Path) -> dict[str, object]:
    """sha256 of every written model, and the reports' fields, by file name."""
    found: dict[str, object] = {}
    for path in sorted(out.glob("*.onnx")):
        found[path.name] = hashlib.sha256(path.read_bytes()).hexdigest()
    for path in sorted([*out.glob("*.report.json"), *out.glob("*.sweep.json")]):
        found[path.name] = dict(_fields(json.loads(path.read_text()), str(out)))
    return found


def differences(before: dict[str, object], after: dict[str, object]) -> list[str]:
    """What differs between two outcomes, fields in ADDED (new in `after`) aside."""
    out = [f"{name}: only before" for name in before.keys() - after.keys()]
    out += [f"{name}: only after" for name in after.keys() - before.keys()]
    for name in sorted(before.keys() & after.keys()):
        old, new = before[name], after[name]
        if isinstance(old, dict) and isinstance(new, dict):
            for key in sorted(old.keys() | new.keys()):
                if key not in old and any(part.split("[")[0] in ADDED for part in key.split(".")):
                    continue
                if old.get(key, "<absent>") != new.get(key, "<absent>"):
                    out.append(f"{name}: {key}: {old.get(key, '<absent>')!r} -> {new.get(key, '<absent>')!r}")
        elif old != new:
            out.append(f"{name}: bytes differ")
    return out


def main(before_tree: str, after_tree: str, work: str) -> int:
    results = []
    for tree, folder in ((before_tree, "before"), (after_tree, "after")):
        out = Path(work) / folder
        run_tree(Path(tree).resolve(), out, flags=AFTER_FLAGS if folder == "after" else ())
        results.append(outcome(out))
    found = differences(*results)
    print("\n".join(found) if found else f"identical: {', '.join(sorted(results[0]))}")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:4]))
