"""PP-OCR's text-direction classifier, a real PaddlePaddle export, with labelled text lines.

The model (`ch_ppocr_mobile_v2.0_cls_infer.onnx`, Apache-2.0, PaddleOCR) ships inside the
`rapidocr-onnxruntime` wheel. Install the wheel without its dependencies (they include the CPU
`onnxruntime`, which must not sit next to `onnxruntime-gpu`) and run this script:

    .venv/bin/pip install --no-deps rapidocr-onnxruntime==1.4.4
    .venv/bin/python models/make_ocr_cls.py

It classifies a cropped text line as upright (class 0, "0") or upside down (class 1, "180").
The data are lines of English words from the docstrings of the Python standard library (real
text that ships with every Python), rendered with Pillow's scalable default font in varying
sizes, ink and paper shades and margins; half of them turned by 180°. Preprocessing is the one
the wheel applies before the model: resize to height 48 keeping the aspect ratio (width at most
192), scale to [-1, 1], pad on the right with zeros.

Writes:
  models/ocr_cls.onnx        the model, copied byte for byte
  models/ocr_cls_calib.npz   512 lines, input `x` [N, 3, 48, 192] float32 + labels
  models/ocr_cls_eval.npz    256 other lines
"""

from __future__ import annotations

import ast
import importlib.util
import math
import re
import shutil
import sysconfig
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

HERE = Path(__file__).resolve().parent
MODEL = "ch_ppocr_mobile_v2.0_cls_infer.onnx"
HEIGHT, WIDTH = 48, 192


def model_file() -> Path:
    spec = importlib.util.find_spec("rapidocr_onnxruntime")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("install the wheel first: .venv/bin/pip install --no-deps rapidocr-onnxruntime==1.4.4")
    return Path(next(iter(spec.submodule_search_locations))) / "models" / MODEL


def words() -> list[str]:
    """English words from the standard library's docstrings, in a fixed order."""
    found: list[str] = []
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:200]:
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef)):
                doc = ast.get_docstring(node) or ""
                found += re.findall(r"\b[A-Za-z]{2,12}\b", doc)
    return found


def render(text: str, rng: np.random.Generator) -> Image.Image:
    font = ImageFont.load_default(size=int(rng.integers(20, 40)))
    left, top, right, bottom = font.getbbox(text)
    margin = int(rng.integers(2, 10))
    paper = int(rng.integers(200, 256))
    ink = int(rng.integers(0, 80))
    image = Image.new("L", (right - left + 2 * margin, bottom - top + 2 * margin), paper)
    ImageDraw.Draw(image).text((margin - left, margin - top), text, fill=ink, font=font)
    return image.convert("RGB")


def preprocess(image: Image.Image) -> np.ndarray:
    width = min(WIDTH, math.ceil(HEIGHT * image.width / image.height))
    resized = np.asarray(image.resize((width, HEIGHT), Image.BILINEAR), dtype=np.float32)
    out = np.zeros((3, HEIGHT, WIDTH), dtype=np.float32)
    out[:, :, :width] = (resized.transpose(2, 0, 1) / 255.0 - 0.5) / 0.5
    return out


def lines(vocabulary: list[str], count: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    for _ in range(count):
        start = int(rng.integers(0, len(vocabulary) - 8))
        text = " ".join(vocabulary[start : start + int(rng.integers(2, 6))])
        image = render(text, rng)
        label = int(rng.integers(0, 2))
        if label:
            image = image.rotate(180)
        images.append(preprocess(image))
        labels.append(label)
    return np.stack(images), np.asarray(labels, dtype=np.int64)


def main() -> None:
    shutil.copyfile(model_file(), HERE / "ocr_cls.onnx")
    vocabulary = words()
    rng = np.random.default_rng(0)
    x, labels = lines(vocabulary, 512, rng)
    np.savez_compressed(HERE / "ocr_cls_calib.npz", x=x, labels=labels)
    x, labels = lines(vocabulary, 256, rng)
    np.savez_compressed(HERE / "ocr_cls_eval.npz", x=x, labels=labels)
    print(f"wrote {HERE / 'ocr_cls.onnx'} and 512 + 256 labelled lines")


if __name__ == "__main__":
    main()
