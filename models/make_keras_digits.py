"""A Keras CNN trained on scikit-learn's 8×8 digits, exported to ONNX by tf2onnx: the TensorFlow
exporter's layout (NHWC input and a Transpose, BatchNorm folded into the convolutions, Dense
layers as MatMul + Add) on real data, for the benchmarks' models that nothing was tuned on.

TensorFlow and onnxprune's torch do not share a virtual environment well; run this in its own:

    python3 -m venv /tmp/tfenv && /tmp/tfenv/bin/pip install tensorflow-cpu==2.19.1 tf2onnx==1.17.0 scikit-learn
    /tmp/tfenv/bin/python models/make_keras_digits.py

Writes, next to this script:
  keras_digits.onnx         input `image` [batch, 8, 8, 1] float32 in [0, 1], output `probabilities` [batch, 10]
  keras_digits_calib.npz    400 digits: `image` and `labels`
  keras_digits_eval.npz     397 other digits, never trained on
The other 1,000 digits train the model (seeded; TensorFlow's CPU kernels make it reproduce within float noise).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SEED = 0
TRAIN, CALIB = 1000, 400


def main() -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf
    import tf2onnx
    from sklearn.datasets import load_digits

    tf.keras.utils.set_random_seed(SEED)
    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[..., None]  # [N, 8, 8, 1]
    labels = digits.target.astype(np.int64)
    order = np.random.default_rng(SEED).permutation(len(images))
    train, calib, evaluation = order[:TRAIN], order[TRAIN : TRAIN + CALIB], order[TRAIN + CALIB :]

    layers = tf.keras.layers
    model = tf.keras.Sequential(
        [
            tf.keras.Input((8, 8, 1), name="image"),
            layers.Conv2D(32, 3, padding="same", use_bias=False),
            layers.BatchNormalization(),
            layers.ReLU(),
            layers.Conv2D(64, 3, padding="same", use_bias=False),
            layers.BatchNormalization(),
            layers.ReLU(),
            layers.MaxPooling2D(2),
            layers.Flatten(),
            layers.Dense(128, activation="relu"),
            layers.Dense(10, activation="softmax", name="probabilities"),
        ]
    )
    model.compile(
        optimizer=tf.keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy", metrics=["accuracy"]
    )
    model.fit(images[train], labels[train], epochs=30, batch_size=32, verbose=0)
    accuracy = model.evaluate(images[evaluation], labels[evaluation], verbose=0)[1]
    print(f"evaluation accuracy {accuracy:.4f}")

    spec = (tf.TensorSpec((None, 8, 8, 1), tf.float32, name="image"),)
    model.output_names = ["probabilities"]
    tf2onnx.convert.from_keras(model, input_signature=spec, opset=13, output_path=str(HERE / "keras_digits.onnx"))
    np.savez_compressed(HERE / "keras_digits_calib.npz", image=images[calib], labels=labels[calib])
    np.savez_compressed(HERE / "keras_digits_eval.npz", image=images[evaluation], labels=labels[evaluation])


if __name__ == "__main__":
    main()
