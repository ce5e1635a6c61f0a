"""Magika's file-type classifier, a real TensorFlow export (jax2tf → tf2onnx), with real files.

The model (`standard_v3_3/model.onnx`, Apache-2.0, Google) ships inside the `magika` wheel.
Install the wheel without its dependencies (they include the CPU `onnxruntime`, which must not sit
next to `onnxruntime-gpu`) and run this script:

    .venv/bin/pip install --no-deps magika==1.0.3
    .venv/bin/python models/make_magika.py

It reads the first and last 1,024 bytes of a file (whitespace stripped, padded with token 256) and
scores 214 content types. The data are real files found on this machine: the Python standard
library and its test data, the virtual environment's packages (shared libraries, headers, fonts,
images, JSON, ...) and /usr/share (man pages, documentation, icons). A file is used when its
extension names one of the model's content types unambiguously (`.py` → python, `.so` → elf,
`.gz` → gzip, ...); at most 24 files per type, chosen with a fixed seed, so no type dominates.
Features are extracted as the wheel does (`Magika._extract_features_from_seekable`, reimplemented
here in a few lines).

Writes:
  models/magika.onnx          the model, copied byte for byte
  models/magika_calib.npz     input `bytes` [N, 2048] int32 + labels (content-type index)
  models/magika_eval.npz      other files, same form
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
import sysconfig
from collections import defaultdict
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
MODEL_DIR = "models/standard_v3_3"
BEG, END, BLOCK, PAD = 1024, 1024, 4096, 256
PER_TYPE = 24
CALIB, EVAL = 512, 256

# extension -> content type of the model's label space (only unambiguous ones)
EXTENSIONS = {
    ".py": "python",
    ".pyi": "python",
    ".pyc": "pythonbytecode",
    ".so": "elf",
    ".json": "json",
    ".png": "png",
    ".gz": "gzip",
    ".xml": "xml",
    ".svg": "svg",
    ".html": "html",
    ".htm": "html",
    ".css": "css",
    ".js": "javascript",
    ".c": "c",
    ".h": "c",
    ".cpp": "cpp",
    ".hpp": "cpp",
    ".sh": "shell",
    ".md": "markdown",
    ".rst": "rst",
    ".toml": "toml",
    ".yaml": "yaml",
    ".yml": "yaml",
    ".csv": "csv",
    ".ttf": "ttf",
    ".otf": "otf",
    ".pdf": "pdf",
    ".ps": "postscript",
    ".eps": "postscript",
    ".gif": "gif",
    ".jpg": "jpeg",
    ".jpeg": "jpeg",
    ".bmp": "bmp",
    ".tif": "tiff",
    ".tiff": "tiff",
    ".ico": "ico",
    ".wav": "wav",
    ".zip": "zip",
    ".whl": "zip",
    ".jar": "jar",
    ".tar": "tar",
    ".bz2": "bzip",
    ".xz": "xz",
    ".pem": "pem",
    ".crt": "pem",
    ".pl": "perl",
    ".pm": "perl",
    ".tcl": "tcl",
    ".cmake": "cmake",
    ".f90": "fortran",
    ".sql": "sql",
    ".ini": "ini",
    ".npy": "npy",
    ".npz": "npz",
    ".txt": "txt",
    ".lua": "lua",
    ".rb": "ruby",
    ".java": "java",
    ".go": "go",
    ".rs": "rust",
    ".ts": "typescript",
    ".php": "php",
    ".tex": "latex",
    ".diff": "diff",
    ".patch": "diff",
}


def package_dir() -> Path:
    spec = importlib.util.find_spec("magika")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("install the wheel first: .venv/bin/pip install --no-deps magika==1.0.3")
    return Path(next(iter(spec.submodule_search_locations)))


def features(path: Path) -> np.ndarray | None:
    """The 2,048 model inputs of a file: beginning and end, stripped and padded (as the wheel)."""
    try:
        with open(path, "rb") as handle:
            size = handle.seek(0, 2)
            if size < 8:  # the wheel does not run the model on files this small
                return None
            read = min(BLOCK, size)
            handle.seek(0)
            beg = handle.read(read).lstrip()[:BEG]
            handle.seek(size - read)
            end = handle.read(read).rstrip()[-END:]
    except OSError:
        return None
    beg_ints = list(beg) + [PAD] * (BEG - len(beg))
    end_ints = [PAD] * (END - len(end)) + list(end)
    return np.array(beg_ints + end_ints, dtype=np.int32)


def candidate_files() -> dict[str, list[Path]]:
    roots = [Path(sysconfig.get_paths()["stdlib"]), Path(sysconfig.get_paths()["purelib"]), Path("/usr/share")]
    found: dict[str, list[Path]] = defaultdict(list)
    for root in roots:
        for path in sorted(root.rglob("*")):
            label = EXTENSIONS.get(path.suffix.lower())
            if label is None or path.is_symlink() or not path.is_file():
                continue
            found[label].append(path)
    return found


def main() -> None:
    source = package_dir()
    labels_space = json.loads((source / MODEL_DIR / "config.min.json").read_text())["target_labels_space"]
    shutil.copyfile(source / MODEL_DIR / "model.onnx", HERE / "magika.onnx")
    rng = np.random.default_rng(0)
    rows, labels = [], []
    for label, paths in sorted(candidate_files().items()):
        order = rng.permutation(len(paths))
        taken = 0
        for index in order:
            row = features(paths[index])
            if row is None:
                continue
            rows.append(row)
            labels.append(labels_space.index(label))
            taken += 1
            if taken == PER_TYPE:
                break
    rows_array, labels_array = np.stack(rows), np.array(labels, dtype=np.int64)
    order = rng.permutation(len(rows_array))
    if len(order) < CALIB + EVAL:
        raise SystemExit(f"only {len(order)} files found; need {CALIB + EVAL}")
    calib, evaluation = order[:CALIB], order[CALIB : CALIB + EVAL]
    np.savez_compressed(HERE / "magika_calib.npz", bytes=rows_array[calib], labels=labels_array[calib])
    np.savez_compressed(HERE / "magika_eval.npz", bytes=rows_array[evaluation], labels=labels_array[evaluation])
    kinds = sorted({labels_space[i] for i in labels_array})
    print(f"{len(rows_array)} files of {len(kinds)} types: {', '.join(kinds)}", file=sys.stderr)


if __name__ == "__main__":
    main()
