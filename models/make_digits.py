"""Small classifiers of scikit-learn's 8×8 digits (1,797 real digits inside the wheel), trained
with torch and exported with its legacy exporter: models that no default of onnxprune was tuned
on, built in code by the robustness test and the benchmarks.

    .venv/bin/python models/make_digits.py --kind cnn --seed 1 --out build/unseen

`mlp`: 64 -> 128 -> 64 -> 10 (Gemm layers). `cnn`: two 3×3 convolutions with BatchNorm (folded
into the convolutions by the exporter, as deployment exports are), max pooling, two linear layers.
Writes `digits_<kind>_s<seed>.onnx` (input `input` [batch, 1, 8, 8] float32 in [0, 1], output
`logits` [batch, 10]) and `digits_calib.npz` / `digits_eval.npz` (400 and 397 digits with labels,
never trained on; the same for every kind and seed). The other 1,000 digits train the model.
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

TRAIN, CALIB = 1000, 400


def digits_split() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """train / calib / eval parts of scikit-learn's digits, always the same."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None]
    labels = digits.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(images))
    parts = {"train": order[:TRAIN], "calib": order[TRAIN : TRAIN + CALIB], "eval": order[TRAIN + CALIB :]}
    return {name: (images[index], labels[index]) for name, index in parts.items()}


def network(kind: str) -> nn.Module:
    if kind == "mlp":
        return nn.Sequential(
            nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10)
        )
    if kind == "cnn":
        return nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(32 * 4 * 4, 64),
            nn.ReLU(),
            nn.Linear(64, 10),
        )
    raise ValueError(f"unknown kind {kind!r}; valid: mlp, cnn")


def train(kind: str, seed: int, epochs: int = 40) -> tuple[nn.Module, float]:
    """The trained network (eval mode) and its accuracy on the evaluation digits."""
    torch.manual_seed(seed)
    data = digits_split()
    x, y = (torch.from_numpy(a) for a in data["train"])
    model = network(kind)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), 32):
            index = order[start : start + 32]
            loss = nn.functional.cross_entropy(model(x[index]), y[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    images, labels = data["eval"]
    with torch.no_grad():
        accuracy = float((model(torch.from_numpy(images)).argmax(1).numpy() == labels).mean())
    return model, accuracy


def write(kind: str, seed: int, folder: Path) -> tuple[Path, Path, Path, float]:
    """Train and export one model, and write the data files; (model, calib, eval, accuracy)."""
    folder.mkdir(parents=True, exist_ok=True)
    model, accuracy = train(kind, seed)
    path = folder / f"digits_{kind}_s{seed}.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter announces its deprecation
        torch.onnx.export(
            model,
            (torch.zeros(1, 1, 8, 8),),
            str(path),
            dynamo=False,
            input_names=["input"],
            output_names=["logits"],
            opset_version=17,
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        )
    data = digits_split()
    files = []
    for name in ("calib", "eval"):
        images, labels = data[name]
        files.append(folder / f"digits_{name}.npz")
        np.savez_compressed(files[-1], input=images, labels=labels)
    return path, files[0], files[1], accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kind", choices=("mlp", "cnn"), default="cnn")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("build/unseen"))
    args = parser.parse_args()
    path, _, _, accuracy = write(args.kind, args.seed, args.out)
    print(f"wrote {path} (evaluation accuracy {accuracy:.4f})")


if __name__ == "__main__":
    main()
