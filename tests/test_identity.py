"""The pipeline's redesign (issue 16) changed no behaviour: the same seed gives byte-identical
models and the same report fields as the commit before it, on the demo, a sweep, a gradual FishLeg
run with fine-tuning and a resumed run (tests/identity.py), with the behaviour added since then
switched off in this checkout (identity.AFTER_FLAGS)."""

import subprocess
import tarfile
from pathlib import Path

import identity
import pytest

ROOT = Path(__file__).resolve().parents[1]
BEFORE = "01f8cab"  # the last commit before the redesign


@pytest.mark.slow
def test_same_models_and_reports_as_before_the_redesign(tmp_path):
    if not (ROOT / ".git").exists():
        pytest.skip("needs the git history (a clone, not an unpacked archive)")
    archive = tmp_path / "before.tar"
    subprocess.run(["git", "-C", str(ROOT), "archive", "-o", str(archive), BEFORE], check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(tmp_path / "before", filter="data")
    runs = {}
    for name, tree in (("before", tmp_path / "before"), ("after", ROOT)):
        flags = identity.AFTER_FLAGS if name == "after" else ()
        identity.run_tree(tree, tmp_path / f"{name}-runs", flags=flags)
        runs[name] = identity.outcome(tmp_path / f"{name}-runs")
    assert len([n for n in runs["before"] if n.endswith(".onnx")]) == 7  # demo, 4 sweep models, gradual, resumed
    assert identity.differences(runs["before"], runs["after"]) == []
