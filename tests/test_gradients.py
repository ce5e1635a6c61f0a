"""Gradient collection against hand-computed gradients; losses per output kind."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from onnx import helper

from onnxprune.bridge.convert import convert
from onnxprune.data import Dataset, input_specs
from onnxprune.gradients import FisherLoss, GradientSource, choose_loss
from onnxprune.validate import Headline

from builders import model, randn, tensor

W = randn(5, 3, seed=1)
B = randn(3, seed=2)


def linear_classifier():
    m = model(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Add", ["h", "b"], ["logits"])],
        [tensor("x", ["n", 5])],
        [tensor("logits", ["n", 3])],
        {"w": W, "b": B},
    )
    return m, convert(m)


def hand_gradient(x: np.ndarray, y: int) -> np.ndarray:
    """∂ CE(softmax(xW + b), y) / ∂W = x (p − e_y)ᵀ, in W's [in, out] layout."""
    logits = x @ W + B
    p = np.exp(logits - logits.max())
    p /= p.sum()
    p[y] -= 1.0
    return np.outer(x, p)


def source(torch_model, m, data, loss, count, micro_batch, seed=0):
    return GradientSource(torch_model, data, input_specs(m), loss, count, micro_batch, seed, torch.device("cpu"))


def test_per_sample_and_micro_batch_gradients_equal_the_hand_computed_mean():
    m, tm = linear_classifier()
    x = randn(12, 5, seed=3)
    labels = np.array([0, 1, 2] * 4)
    data = Dataset({"x": x}, labels, "d")
    loss = FisherLoss(0, "logits", "logits", "given")
    single = source(tm, m, data, loss, count=6, micro_batch=1)
    rows = single.collect(["w"])["w"].double().numpy()
    for k in range(6):
        i = single.indices[k, 0]
        np.testing.assert_allclose(rows[k], hand_gradient(x[i], labels[i]).reshape(-1), rtol=1e-5, atol=1e-6)
    batched = source(tm, m, data, loss, count=3, micro_batch=4)
    rows = batched.collect(["w"])["w"].double().numpy()
    for k in range(3):
        mean = np.mean([hand_gradient(x[i], labels[i]) for i in batched.indices[k]], axis=0)
        np.testing.assert_allclose(rows[k], mean.reshape(-1), rtol=1e-5, atol=1e-6)


def test_streamed_gradients_are_the_collected_rows_one_at_a_time():
    m, tm = linear_classifier()
    data = Dataset({"x": randn(12, 5, seed=3)}, np.array([0, 1, 2] * 4), "d")
    loss = FisherLoss(0, "logits", "logits", "given")
    mask = torch.ones(15, dtype=torch.bool)
    mask[[2, 9]] = False
    rows = source(tm, m, data, loss, 6, 2).collect(["w", "b"], {"w": mask})
    seen = []
    source(tm, m, data, loss, 6, 2).stream(["w", "b"], lambda k, grads: seen.append((k, grads)), {"w": mask})
    assert [k for k, _ in seen] == list(range(6))
    for k, grads in seen:
        assert set(grads) == {"w", "b"} and grads["w"].shape == (15,)
        torch.testing.assert_close(grads["w"], rows["w"][k], rtol=0, atol=0)
        torch.testing.assert_close(grads["b"], rows["b"][k], rtol=0, atol=0)
    assert float(rows["w"][:, ~mask].abs().sum()) == 0.0 and float(rows["w"].abs().sum()) > 0


def test_masked_coordinates_are_zero_in_every_gradient():
    m, tm = linear_classifier()
    data = Dataset({"x": randn(8, 5, seed=4)}, None, "d")
    mask = torch.ones(15, dtype=torch.bool)
    mask[[0, 7, 14]] = False
    rows = source(tm, m, data, FisherLoss(0, "logits", "logits", "sampled"), 8, 1).collect(["w"], {"w": mask})["w"]
    assert bool((rows[:, ~mask] == 0).all()) and bool((rows[:, mask] != 0).any())


def test_sampled_labels_are_reproducible_and_independent_of_grouping():
    m, tm = linear_classifier()
    data = Dataset({"x": randn(8, 5, seed=5)}, None, "d")
    loss = FisherLoss(0, "logits", "logits", "sampled")
    alone = source(tm, m, data, loss, 10, 2, seed=7).collect(["w"])["w"]
    together = source(tm, m, data, loss, 10, 2, seed=7).collect(["w", "b"])
    torch.testing.assert_close(alone, together["w"], rtol=0, atol=0)
    other_seed = source(tm, m, data, loss, 10, 2, seed=8).collect(["w"])["w"]
    assert not torch.equal(alone, other_seed)


def test_gaussian_true_fisher_has_the_gauss_newton_expectation():
    # for y = xW (no bias), E[g gᵀ] over Gaussian targets is Jᵀ J: diagonal entry (i, j) → x_i²
    m = model(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        [tensor("x", [1, 2])],
        [tensor("y", [1, 2])],
        {"w": randn(2, 2, seed=6)},
    )
    tm = convert(m)
    x = np.array([[1.5, -0.5]], np.float32)
    data = Dataset({"x": x}, None, "d")
    rows = source(tm, m, data, FisherLoss(0, "y", "gaussian", "sampled"), 4000, 1).collect(["w"])["w"].double()
    diagonal = (rows**2).mean(0).numpy()
    np.testing.assert_allclose(diagonal, [2.25, 2.25, 0.25, 0.25], rtol=0.1)


def test_loss_choice_per_output_kind_and_labels():
    logits = np.array([[2.0, -1.0, 0.5], [0.1, 0.2, 3.0]], np.float32)
    emb = logits / np.linalg.norm(logits, axis=1, keepdims=True)
    with_labels = Dataset({"x": np.zeros((2, 1))}, np.array([0, 2]), "c")
    without = Dataset({"x": np.zeros((2, 1))}, None, "c")
    bad_labels = Dataset({"x": np.zeros((2, 1))}, np.array([0, 9]), "c")
    assert choose_loss(Headline("accuracy", 0), [logits], ["y"], with_labels).targets == "given"
    assert choose_loss(Headline("top1_agreement", 0), [logits], ["y"], without).targets == "sampled"
    assert choose_loss(Headline("top1_agreement", 0), [logits], ["y"], bad_labels).targets == "sampled"
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    assert choose_loss(Headline("accuracy", 0), [probs], ["y"], with_labels).kind == "probabilities"
    gaussian = choose_loss(Headline("cosine", 0), [emb], ["e"], with_labels)
    assert (gaussian.kind, gaussian.targets) == ("gaussian", "sampled")
    assert "Gauss-Newton" in gaussian.describe()


@pytest.mark.parametrize("kind", ["logits", "probabilities"])
def test_probabilities_and_logits_give_the_same_gradient_for_the_same_labels(kind):
    # a Softmax-ended model seen as probabilities: CE(log p) is CE on the logits before it
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Add", ["h", "b"], ["logits"])]
    if kind == "probabilities":
        nodes.append(helper.make_node("Softmax", ["logits"], ["p"], axis=1))
    out = "p" if kind == "probabilities" else "logits"
    m = model(nodes, [tensor("x", ["n", 5])], [tensor(out, ["n", 3])], {"w": W, "b": B})
    tm = convert(m)
    x = randn(4, 5, seed=9)
    data = Dataset({"x": x}, np.array([0, 1, 2, 0]), "d")
    rows = source(tm, m, data, FisherLoss(0, out, kind, "given"), 4, 1).collect(["w"])["w"].double().numpy()
    i = source(tm, m, data, FisherLoss(0, out, kind, "given"), 4, 1).indices[0, 0]
    np.testing.assert_allclose(rows[0], hand_gradient(x[i], data.labels[i]).reshape(-1), rtol=1e-4, atol=1e-6)


def test_fisher_kind_choice():
    from onnxprune.errors import UsageError

    logits = np.array([[2.0, -1.0, 0.5], [0.1, 0.2, 3.0]], np.float32)
    labelled = Dataset({"x": np.zeros((2, 1))}, np.array([0, 2]), "c")
    unlabelled = Dataset({"x": np.zeros((2, 1))}, None, "c")
    head = Headline("accuracy", 0)
    assert choose_loss(head, [logits], ["y"], labelled, "auto").targets == "given"
    assert choose_loss(head, [logits], ["y"], labelled, "true").targets == "sampled"
    assert choose_loss(head, [logits], ["y"], labelled, "empirical").targets == "given"
    with pytest.raises(UsageError, match="--fisher empirical needs calibration labels"):
        choose_loss(head, [logits], ["y"], unlabelled, "empirical")
