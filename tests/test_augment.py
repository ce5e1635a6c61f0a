"""Augmented distillation batches: which entries are token ids, what is replaced, and the targets
the fine-tuner trains on (the dense model in onnxruntime on the perturbed batch)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from onnxprune import PruneConfig, prune
from onnxprune.augment import AUGMENTATIONS, make_augmenter, replace_tokens, token_pools
from onnxprune.bridge.convert import convert
from onnxprune.data import Dataset, input_specs
from onnxprune.errors import UsageError
from onnxprune.finetune import AUGMENT_STREAM, Augmented, FinetuneLoss, Finetuner, trainable_tensors

from builders import model, ort_run, randn, save, save_npz, tensor

CLS, SEP, PAD = 1, 2, 0


def sentences(count: int = 8, length: int = 10, seed: int = 0) -> dict[str, np.ndarray]:
    """Token ids as a tokenizer writes them: CLS, words 3..49, SEP, then padding; and the mask."""
    rng = np.random.default_rng(seed)
    ids = np.zeros((count, length), dtype=np.int64)
    mask = np.zeros((count, length), dtype=np.int64)
    for i in range(count):
        words = int(rng.integers(3, length - 2))
        ids[i, : words + 2] = [CLS, *rng.integers(3, 50, size=words), SEP]
        mask[i, : words + 2] = 1
    return {"input_ids": ids, "attention_mask": mask}


def test_token_pools_keep_special_tokens_and_skip_masks_and_floats():
    arrays = sentences(count=40)
    arrays["features"] = randn(40, 3)
    pools = token_pools(Dataset(arrays, None, "test"))
    assert [p.name for p in pools] == ["input_ids"]  # the mask has 2 values, the floats are not ids
    (pool,) = pools
    # CLS and SEP are in every sentence, padding in most; no word is in half of 40 sentences here
    words_in_half = [v for v in range(3, 50) if (arrays["input_ids"] == v).any(1).sum() >= 20]
    assert pool.kept.tolist() == sorted([PAD, CLS, SEP, *words_in_half])
    ids = arrays["input_ids"]
    assert sorted(pool.pool.tolist()) == sorted(ids[~np.isin(ids, pool.kept)].tolist())


def test_few_distinct_integers_are_not_token_ids():
    arrays = {"segment": np.tile(np.arange(10), (6, 1)) % 3}
    assert token_pools(Dataset(arrays, None, "test")) == []


def test_replacement_touches_only_replaceable_entries_and_draws_from_the_pool():
    arrays = sentences(count=40)
    pools = token_pools(Dataset(arrays, None, "test"))
    ids = arrays["input_ids"]
    replaceable = ~np.isin(ids, pools[0].kept)
    every = replace_tokens(arrays, pools, 1.0, np.random.default_rng(3))
    assert np.array_equal(every["input_ids"][~replaceable], ids[~replaceable])  # CLS, SEP, PAD in place
    assert set(every["input_ids"][replaceable].tolist()) <= set(pools[0].pool.tolist())
    assert np.array_equal(every["attention_mask"], arrays["attention_mask"])
    assert np.array_equal(arrays["input_ids"], ids) and every["input_ids"] is not ids  # input untouched
    big = {"input_ids": np.tile(ids, (50, 1))}
    some = replace_tokens(big, pools, 0.3, np.random.default_rng(4))
    changed = some["input_ids"] != big["input_ids"]
    # a replaced entry keeps its value when the draw equals it: with 47 words about 1 in 47
    share = changed.sum() / (~np.isin(big["input_ids"], pools[0].kept)).sum()
    assert 0.3 * (1 - 1 / 20) - 0.02 < share < 0.3 + 0.02
    again = replace_tokens(big, pools, 0.3, np.random.default_rng(4))
    assert np.array_equal(again["input_ids"], some["input_ids"])


def test_auto_augments_token_models_only():
    tokens = Dataset(sentences(count=40), None, "test")
    floats = Dataset({"x": randn(8, 4)}, None, "test")
    assert make_augmenter("auto", tokens, 0.3) is not None
    assert make_augmenter("auto", floats, 0.3) is None
    assert make_augmenter("none", tokens, 0.3) is None
    assert set(AUGMENTATIONS.names()) == {"none", "auto", "tokens"}
    with pytest.raises(UsageError, match="valid: none, tokens, auto"):
        PruneConfig(input="m.onnx", output="o.onnx", sparsity=0.5, augment="mixup")
    with pytest.raises(UsageError, match="augment_rate"):
        PruneConfig(input="m.onnx", output="o.onnx", sparsity=0.5, augment_rate=0.0)


def embedding_model() -> onnx.ModelProto:
    """ids[n, 10] → Gather(embedding 50×4) → ReduceMean over tokens → MatMul 4×3 → Add bias."""
    return model(
        [
            helper.make_node("Gather", ["emb", "input_ids"], ["e"], name="embed"),
            helper.make_node("ReduceMean", ["e"], ["m"], name="pool", axes=[1], keepdims=0),
            helper.make_node("MatMul", ["m", "w"], ["z"], name="fc"),
            helper.make_node("Add", ["z", "b"], ["y"], name="bias"),
        ],
        [tensor("input_ids", ["n", 10], TensorProto.INT64)],
        [tensor("y", ["n", 3])],
        {"emb": randn(50, 4, seed=1), "w": randn(4, 3, seed=2), "b": randn(3, seed=3)},
    )


def test_the_fine_tuner_trains_on_the_dense_outputs_of_the_perturbed_batch(tmp_path):
    dense = save(embedding_model(), tmp_path / "dense.onnx")
    proto = embedding_model()
    student = convert(proto)
    with torch.no_grad():
        student.tensors["w"].mul_(0.5)  # the student differs from the dense model
    ids = {"input_ids": sentences(count=16)["input_ids"]}
    data = Dataset(ids, None, "test")
    augmenter = make_augmenter("tokens", data, 0.5)
    assert augmenter is not None
    loss = FinetuneLoss(0, "y", "mse", "values")
    tensors = trainable_tensors(student, ["w"])
    trainer = Finetuner(student, tensors, data, input_specs(proto), loss, Augmented(augmenter, dense), "sgd", 1e-9,
                        8, 0, torch.device("cpu"))  # fmt: skip
    w = student.tensors["w"].detach().clone().numpy()
    trainer.run(1, {"w": torch.ones(4, 3, dtype=torch.bool)})
    # by hand: the step's batch, perturbed with the step's seed, through both models
    from onnxprune.finetune import batch_indices

    batch = ids["input_ids"][batch_indices(16, 8, 0, 0)]
    perturbed = augmenter.perturb({"input_ids": batch}, np.random.default_rng([0, 0, AUGMENT_STREAM]))["input_ids"]
    assert not np.array_equal(perturbed, batch)
    target = ort_run(dense, {"input_ids": perturbed})[0]
    emb = onnx.numpy_helper.to_array(next(t for t in proto.graph.initializer if t.name == "emb"))
    b = onnx.numpy_helper.to_array(next(t for t in proto.graph.initializer if t.name == "b"))
    output = emb[perturbed].mean(1) @ w + b
    expected = ((output - target) ** 2).mean(1).mean()
    assert trainer.curve[0] == pytest.approx(float(expected), rel=1e-5)
    assert trainer.augmentation.startswith("tokens: 50% of the entries of 'input_ids'")


def test_a_run_reports_its_augmentation(tmp_path):
    dense = save(embedding_model(), tmp_path / "dense.onnx")
    calib = save_npz(tmp_path / "calib.npz", **{"input_ids": sentences(count=32)["input_ids"]})
    base = dict(input=dense, calibration=calib, method="magnitude", sparsity=0.5, finetune_steps=2, progress="off")
    on = prune(PruneConfig(output=tmp_path / "a.onnx", **base))
    off = prune(PruneConfig(output=tmp_path / "b.onnx", augment="none", **base))
    assert on.finetune is not None and on.finetune.augmentation.startswith("tokens: 30%")
    assert off.finetune is not None and off.finetune.augmentation == "none"
    assert on.finetune.loss == off.finetune.loss  # the same loss, on other batches
    assert on.finetune.loss.startswith("distillation: KL divergence to the dense model's logits 'y'")
    assert on.finetune.loss_curve != off.finetune.loss_curve
