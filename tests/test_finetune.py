"""Fine-tuning with fixed masks, the gradual schedule, BatchNorm statistics, checkpoints and resume."""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
import torch
from onnx import helper

from onnxprune import PruneConfig, prune
from onnxprune.bridge.bindings import read_tensor
from onnxprune.bridge.convert import convert
from onnxprune.checkpoint import load_checkpoint, save_checkpoint
from onnxprune.data import Dataset, input_specs
from onnxprune.errors import UsageError
from onnxprune.finetune import (
    FinetuneLoss,
    Finetuner,
    batch_indices,
    batchnorm_statistics,
    distillation_kl,
    reestimate_batchnorm,
    trainable_tensors,
)
from onnxprune.oneshot import Pruner
from onnxprune.schedule import SCHEDULES, cubic

from builders import model, ort_run, randn, save, save_npz, tensor


def classifier():
    """Gemm (bias) → Relu → MatMul → Add (bias): 4 classes from 6 features."""
    return model(
        [
            helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="fc1", transB=1),
            helper.make_node("Relu", ["h"], ["r"]),
            helper.make_node("MatMul", ["r", "w2"], ["z"], name="fc2"),
            helper.make_node("Add", ["z", "b2"], ["logits"], name="bias2"),
        ],
        [tensor("x", ["n", 6])],
        [tensor("logits", ["n", 4])],
        {"w1": randn(16, 6, seed=1), "b1": randn(16, seed=2), "w2": randn(16, 4, seed=3), "b2": randn(4, seed=4)},
    )


def conv_bn():
    """Conv → BatchNormalization → Relu → Flatten → Gemm, with non-trivial BN statistics."""
    rng = np.random.default_rng(5)
    return model(
        [
            helper.make_node("Conv", ["x", "cw", "cb"], ["c"], name="conv", pads=[1, 1, 1, 1]),
            helper.make_node("BatchNormalization", ["c", "scale", "shift", "mean", "var"], ["bn"], name="bn"),
            helper.make_node("Relu", ["bn"], ["r"]),
            helper.make_node("Flatten", ["r"], ["f"]),
            helper.make_node("Gemm", ["f", "fw", "fb"], ["logits"], name="fc", transB=1),
        ],
        [tensor("x", ["n", 2, 5, 5])],
        [tensor("logits", ["n", 3])],
        {
            "cw": randn(4, 2, 3, 3, seed=6),
            "cb": randn(4, seed=7),
            "scale": (1 + 0.1 * rng.standard_normal(4)).astype(np.float32),
            "shift": (0.1 * rng.standard_normal(4)).astype(np.float32),
            "mean": (0.5 * rng.standard_normal(4)).astype(np.float32),
            "var": (1 + rng.random(4)).astype(np.float32),
            "fw": randn(3, 100, seed=8),
            "fb": randn(3, seed=9),
        },
    )


def data(n=96, features=6, classes=4, seed=10):
    x = randn(n, features, seed=seed)
    labels = (np.abs(x[:, :classes]).argmax(1)).astype(np.int64)
    return x, labels


# ------------------------------------------------------------------------------ pure pieces


def test_distillation_kl_hand_computed():
    teacher = torch.tensor([[0.0, math.log(3.0)]])  # softmax at T=1: (1/4, 3/4)
    student = torch.tensor([[0.0, 0.0]])  # (1/2, 1/2)
    expected = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    assert distillation_kl(student, teacher, 1.0).item() == pytest.approx(expected, rel=1e-6)
    # at T=2 the distributions are softmax(z/2), and the value is scaled by T² = 4
    p = torch.softmax(teacher / 2, 1)
    q = torch.softmax(student / 2, 1)
    expected_t2 = 4 * float((p * (p / q).log()).sum())
    assert distillation_kl(student, teacher, 2.0).item() == pytest.approx(expected_t2, rel=1e-6)
    assert distillation_kl(teacher, teacher, 3.0).item() == pytest.approx(0.0, abs=1e-7)


def test_batch_indices_walk_through_seeded_epochs():
    seen = np.concatenate([batch_indices(10, 4, step, seed=3) for step in range(5)])  # 20 = 2 epochs
    assert sorted(seen[:10].tolist()) == list(range(10))
    assert sorted(seen[10:].tolist()) == list(range(10))
    assert np.array_equal(batch_indices(10, 4, 7, seed=3), batch_indices(10, 4, 7, seed=3))
    assert not np.array_equal(batch_indices(10, 4, 0, seed=3), batch_indices(10, 4, 0, seed=4))
    assert len(batch_indices(3, 8, 0, seed=0)) == 3  # never more than the data


def test_gradual_schedule_is_cubic_and_splits_the_budget():
    phases = SCHEDULES.get("gradual")(0.9, 4, 0.1, 10)
    assert [p.sparsity for p in phases] == pytest.approx([cubic(t, 4, 0.1, 0.9) for t in (1, 2, 3, 4)])
    assert phases[0].sparsity == pytest.approx(0.9 - 0.8 * (0.75**3))
    assert phases[-1].sparsity == 0.9
    assert [p.finetune_steps for p in phases] == [2, 2, 3, 3]
    oneshot = SCHEDULES.get("oneshot")(0.9, 3, 0.0, 10)
    assert [p.finetune_steps for p in oneshot] == [0, 0, 10]
    assert oneshot[-1].sparsity == 0.9
    with pytest.raises(UsageError, match="valid: oneshot, gradual"):
        SCHEDULES.get("linear")


# ------------------------------------------------------------------------------ the fine-tuner


def test_trainable_tensors_are_the_weights_and_their_biases():
    torch_model = convert(classifier())
    names = set(trainable_tensors(torch_model, ["w1", "w2"]))
    assert names == {"w1", "b1", "w2", "b2"}
    assert set(trainable_tensors(torch_model, ["w2"])) == {"w2", "b2"}


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_finetuning_never_revives_a_masked_weight(optimizer):
    proto = classifier()
    torch_model = convert(proto)
    x, labels = data()
    dataset = Dataset({"x": x}, labels, "test")
    tensors = trainable_tensors(torch_model, ["w1", "w2"])
    masks = {name: torch.from_numpy(randn(*tensors[name].shape, seed=20) > 0.3) for name in ("w1", "w2")}
    before = {name: t.detach().clone() for name, t in tensors.items()}
    loss = FinetuneLoss(0, "logits", "cross-entropy", "logits")
    trainer = Finetuner(torch_model, tensors, dataset, input_specs(proto), loss, None, optimizer, 0.5, 16, 0, "cpu")
    trainer.run(40, masks)
    for name, mask in masks.items():
        after = tensors[name].detach()
        assert int((after[~mask] != 0).sum()) == 0, f"{name}: a pruned weight came back"
        assert not torch.equal(after[mask], before[name][mask]), f"{name}: kept weights were not trained"
    assert not torch.equal(tensors["b1"], before["b1"])
    assert trainer.curve[-1] < trainer.curve[0]  # lr 0.5 on a separable toy problem: it learns
    assert all(not t.requires_grad for t in tensors.values())


def test_reestimated_batchnorm_statistics_are_the_calibration_moments(tmp_path):
    proto = conv_bn()
    torch_model = convert(proto)
    x = randn(40, 2, 5, 5, seed=11) * 2 + 1
    dataset = Dataset({"x": x}, None, "test")
    stats = batchnorm_statistics(torch_model)
    assert set(stats) == {"mean", "var"}
    assert reestimate_batchnorm(torch_model, dataset, input_specs(proto), 64, torch.device("cpu")) == 1
    conv = torch.nn.functional.conv2d(
        torch.from_numpy(x),
        torch.from_numpy(read_tensor(proto, "cw").copy()),
        torch.from_numpy(read_tensor(proto, "cb").copy()),
        padding=1,
    ).double()
    mean = conv.mean((0, 2, 3))
    var = conv.var((0, 2, 3), unbiased=True)  # what torch keeps as the running variance
    assert torch.allclose(stats["mean"].double(), mean, atol=1e-5)
    assert torch.allclose(stats["var"].double(), var, rtol=1e-4)


def test_reestimate_end_to_end_writes_the_statistics_and_onnxruntime_agrees(tmp_path):
    source = save(conv_bn(), tmp_path / "in.onnx")
    x = randn(64, 2, 5, 5, seed=12) * 2 + 1
    calib = save_npz(tmp_path / "calib.npz", x=x)
    report = prune(
        PruneConfig(
            source,
            tmp_path / "out.onnx",
            sparsity=0.5,
            method="magnitude",
            calibration=calib,
            batchnorm="reestimate",
            finetune_steps=5,
            eval_batch_size=128,
        )
    )
    written = onnx.load(tmp_path / "out.onnx")
    assert not np.allclose(read_tensor(written, "mean"), read_tensor(conv_bn(), "mean"))
    assert report.finetune.batchnorm == "reestimate (1 layers)"
    assert report.schedule.torch_vs_onnxruntime_max_abs_error < 1e-4
    assert np.isclose(report.pruning.sparsity, 0.5, atol=1 / 1000)


def test_finetuned_model_in_onnxruntime_matches_torch_and_keeps_sparsity(tmp_path):
    source = save(classifier(), tmp_path / "in.onnx")
    x, labels = data(200)
    calib = save_npz(tmp_path / "calib.npz", x=x, labels=labels)
    report = prune(
        PruneConfig(
            source,
            tmp_path / "out.onnx",
            sparsity=0.75,
            method="magnitude",
            calibration=calib,
            finetune_steps=30,
            lr=1e-2,
            scope="layer",
        )
    )
    written = onnx.load(tmp_path / "out.onnx")
    for name in ("w1", "w2"):
        values = read_tensor(written, name)
        assert int((values == 0).sum()) == int(0.75 * values.size)
    assert not np.array_equal(read_tensor(written, "b2"), read_tensor(classifier(), "b2"))  # biases trained
    assert report.finetune.steps == 30 and report.finetune.loss.startswith("cross-entropy")
    assert report.schedule.torch_vs_onnxruntime_max_abs_error < 1e-5
    # and the report's accuracy is onnxruntime's on the written file
    evaluation = ort_run(tmp_path / "out.onnx", {"x": x})[0]
    assert evaluation.shape == (200, 4)


def test_without_labels_finetuning_distils_the_dense_model(tmp_path):
    source = save(classifier(), tmp_path / "in.onnx")
    x, _ = data(120)
    calib = save_npz(tmp_path / "calib.npz", x=x)
    report = prune(
        PruneConfig(
            source,
            tmp_path / "out.onnx",
            sparsity=0.8,
            method="magnitude",
            calibration=calib,
            finetune_steps=60,
            lr=1e-2,
        )
    )
    assert report.finetune.loss.startswith("distillation: KL divergence")
    curve = report.finetune.loss_curve
    assert curve[-1] < curve[0]


# ------------------------------------------------------------------------------ checkpoints and resume


def _gradual(tmp_path, out, method, resume=False):
    return PruneConfig(
        tmp_path / "in.onnx",
        tmp_path / out,
        sparsity=0.8,
        method=method,
        calibration=tmp_path / "calib.npz",
        schedule="gradual",
        prune_steps=3,
        finetune_steps=12,
        lr=1e-2,
        num_grads=32,
        fishleg_steps=30,
        fishleg_online_steps=5,
        resume=resume,
        checkpoint=tmp_path / f"{method}.ckpt",
        force=True,
    )


@pytest.mark.parametrize("method", ["fishleg", "woodfisher"])
def test_a_resumed_run_equals_an_uninterrupted_one(tmp_path, monkeypatch, method):
    save(classifier(), tmp_path / "in.onnx")
    x, labels = data(160)
    save_npz(tmp_path / "calib.npz", x=x, labels=labels)
    whole = prune(_gradual(tmp_path, "whole.onnx", method))
    assert not (tmp_path / f"{method}.ckpt").exists()  # removed once the output is written

    real_step, calls = Pruner.step, []

    # Ctrl-C during the third pruning step (no setting can stand in for an interruption)
    def interrupted(self, sparsity, label, **kwargs):
        if label.startswith(("damping", "allocation")):  # the automatic searches' trial steps
            return real_step(self, sparsity, label, **kwargs)
        calls.append(label)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_step(self, sparsity, label, **kwargs)

    monkeypatch.setattr(Pruner, "step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prune(_gradual(tmp_path, "resumed.onnx", method))
    assert (tmp_path / f"{method}.ckpt").exists() and not (tmp_path / "resumed.onnx").exists()
    monkeypatch.setattr(Pruner, "step", real_step)

    resumed = prune(_gradual(tmp_path, "resumed.onnx", method, resume=True))
    assert resumed.schedule.resumed_after == 2
    assert (tmp_path / "whole.onnx").read_bytes() == (tmp_path / "resumed.onnx").read_bytes()
    assert resumed.finetune.loss_curve == whole.finetune.loss_curve
    if method == "fishleg":
        assert resumed.fisher.estimator["auxiliary_loss"] == whole.fisher.estimator["auxiliary_loss"]


def test_resume_refuses_another_runs_checkpoint(tmp_path, monkeypatch):
    save(classifier(), tmp_path / "in.onnx")
    x, labels = data(160)
    save_npz(tmp_path / "calib.npz", x=x, labels=labels)
    config = _gradual(tmp_path, "out.onnx", "magnitude")
    real_step = Pruner.step
    monkeypatch.setattr(
        Pruner,
        "step",
        lambda self, s, label, **kw: (
            (_ for _ in ()).throw(KeyboardInterrupt) if "2/" in label else real_step(self, s, label, **kw)
        ),
    )
    with pytest.raises(KeyboardInterrupt):
        prune(config)
    monkeypatch.setattr(Pruner, "step", real_step)
    other = PruneConfig(**{**config.__dict__, "lr": 2e-2, "resume": True})
    with pytest.raises(UsageError, match="another input model or other settings"):
        prune(other)
    missing = PruneConfig(**{**config.__dict__, "checkpoint": tmp_path / "none.ckpt", "resume": True})
    with pytest.raises(UsageError, match="no checkpoint"):
        prune(missing)


def test_checkpoints_load_without_unpickling_code(tmp_path):
    path = tmp_path / "state.ckpt"
    save_checkpoint(path, {"fingerprint": "abc", "tensors": {"w": torch.ones(2)}})
    assert torch.equal(load_checkpoint(path, "abc")["tensors"]["w"], torch.ones(2))

    class Payload:
        def __reduce__(self):
            return (print, ("pickled code ran",))

    torch.save({"format": 1, "fingerprint": "abc", "x": Payload()}, path)
    with pytest.raises(UsageError, match="not a readable onnxprune checkpoint"):
        load_checkpoint(path, "abc")
