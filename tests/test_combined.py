"""The combined estimator: each output unit's task-loss Fisher by hand, its place between
SparseGPT (α = 0) and a loss-scale objective (α = 1), and the pipeline with its automatic α."""

from __future__ import annotations

import numpy as np
import torch
from onnx import helper

from onnxprune import PruneConfig, prune
from onnxprune.activations import ActivationSource
from onnxprune.bridge.convert import convert
from onnxprune.data import Dataset, input_specs, load_dataset, split
from onnxprune.estimators import ESTIMATORS
from onnxprune.gradients import FisherLoss
from onnxprune.job import search_split

from builders import MODELS, model, randn, save, save_npz, tensor


def two_layer():
    return model(
        [
            helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="fc1", transB=1),
            helper.make_node("Relu", ["h"], ["r"], name="relu"),
            helper.make_node("Gemm", ["r", "w2", "b2"], ["logits"], name="fc2", transB=1),
        ],
        [tensor("x", ["N", 6])],
        [tensor("logits", ["N", 4])],
        {"w1": randn(8, 6, seed=1), "b1": randn(8, seed=2), "w2": randn(4, 8, seed=3), "b2": randn(4, seed=4)},
    )


def test_output_sensitivity_is_the_mean_squared_output_gradient_by_hand():
    m = two_layer()
    tm = convert(m)
    x, labels = randn(20, 6, seed=5), np.arange(20) % 4
    source = ActivationSource(
        tm, Dataset({"x": x}, labels, "calib"), input_specs(m), tm.prunable, 20, 7, 0, torch.device("cpu")
    )
    loss = FisherLoss(output=0, output_name="logits", kind="logits", targets="given")
    got = source.output_sensitivity(["w1", "w2"], loss)
    # by hand: ∂CE/∂logits = softmax − onehot; back through fc2 and the ReLU to fc1's output
    w1, b1, w2, b2 = (
        torch.from_numpy(a).double()
        for a in (randn(8, 6, seed=1), randn(8, seed=2), randn(4, 8, seed=3), randn(4, seed=4))
    )
    xt = torch.from_numpy(x).double()
    h = xt @ w1.T + b1
    logits = torch.relu(h) @ w2.T + b2
    delta2 = torch.softmax(logits, 1) - torch.nn.functional.one_hot(torch.from_numpy(labels), 4).double()
    delta1 = (delta2 @ w2) * (h > 0)
    np.testing.assert_allclose(got["w2"].numpy(), (delta2**2).mean(0).numpy(), rtol=1e-5)
    np.testing.assert_allclose(got["w1"].numpy(), (delta1**2).mean(0).numpy(), rtol=1e-5)


def test_the_fisher_term_moves_the_pruned_entries_to_the_rows_the_loss_depends_on_least():
    config = PruneConfig(input="in.onnx", output="out.onnx", sparsity=0.5, method="combined", damp=0.1, mix=1.0)
    estimator = ESTIMATORS.get("combined")(config)
    x = torch.randn(50, 6, generator=torch.Generator().manual_seed(0))
    w = torch.ones(2, 6)  # two identical rows: plain reconstruction cannot tell them apart
    estimator.set_sensitivity({"w": torch.tensor([10.0, 0.1], dtype=torch.float64)})
    stats = estimator.statistics("w", (2, 6))
    stats.update(x.unsqueeze(0))
    scores = estimator.scores(w.reshape(-1), stats).reshape(2, 6)
    assert bool((scores[0] > scores[1]).all())
    keep = torch.ones(12, dtype=torch.bool)
    keep[torch.argsort(scores.reshape(-1))[:6]] = False
    new, kept = estimator.prune(w.reshape(-1), keep, stats, torch.zeros(12, dtype=torch.bool))
    assert int((~kept.reshape(2, 6)[1]).sum()) == 6 and bool(kept.reshape(2, 6)[0].all())
    # α = 0 is SparseGPT
    plain = ESTIMATORS.get("combined")(
        PruneConfig(input="in.onnx", output="out.onnx", sparsity=0.5, method="combined", damp=0.1, mix=0.0)
    )
    plain.set_sensitivity({"w": torch.tensor([10.0, 0.1], dtype=torch.float64)})
    sgpt = ESTIMATORS.get("sparsegpt")(
        PruneConfig(input="in.onnx", output="out.onnx", sparsity=0.5, method="sparsegpt", damp=0.1)
    )
    torch.testing.assert_close(plain.scores(w.reshape(-1), stats), sgpt.scores(w.reshape(-1), stats))


def test_combined_prunes_the_shipped_cnn_and_reports_its_mix_search(tmp_path):
    report = prune(
        PruneConfig(
            input=MODELS / "mnist_cnn.onnx", output=tmp_path / "o.onnx", sparsity=0.9, method="combined",
            calibration=MODELS / "mnist_calib.npz", evaluation=MODELS / "mnist_eval.npz", num_grads=128,
            progress="off", refine_masks=False, solve_weights=False, correct_statistics="off", scope="global",
            damp=1e-3,
        )
    )  # fmt: skip
    search = report.fisher.estimator["mix_search"]
    assert search["grid"] == [0.0, 0.5, 1.0] and search["chosen"] == report.fisher.estimator["mix"]
    assert min(search["losses"]) == search["losses"][search["grid"].index(search["chosen"])]
    assert report.pruning.zeros == round(0.9 * report.pruning.params) and report.validation.accuracy_after > 0.9
    # the statistics say which loss weighs the rows, not "none"
    assert report.fisher.loss.startswith("each layer's output error") and "cross-entropy" in report.fisher.loss


def test_method_auto_picks_the_known_best_of_a_constructed_example(tmp_path):
    """Inputs on very different scales: the weights of the large inputs are small, so magnitude
    pruning removes what matters and Wanda (|W|·‖X‖) keeps it. auto must pick Wanda, and write
    what --method wanda writes from the samples auto's trials used (its three quarters of the
    calibration samples left after the evaluation quarter)."""
    rng = np.random.default_rng(0)
    scales = np.where(np.arange(12) % 2 == 0, 30.0, 0.3).astype(np.float32)
    w1 = (rng.standard_normal((16, 12)) / scales).astype(np.float32)
    m = model(
        [
            helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="fc1", transB=1),
            helper.make_node("Relu", ["h"], ["r"], name="relu"),
            helper.make_node("Gemm", ["r", "w2", "b2"], ["logits"], name="fc2", transB=1),
        ],
        [tensor("x", ["N", 12])],
        [tensor("logits", ["N", 5])],
        {"w1": w1, "b1": randn(16, seed=2), "w2": randn(5, 16, seed=3), "b2": randn(5, seed=4)},
    )
    source = tmp_path / "in.onnx"
    save(m, source)
    x = (rng.standard_normal((200, 12)) * scales).astype(np.float32)
    calib = save_npz(tmp_path / "calib.npz", x=x)
    settings = dict(
        input=source, sparsity=0.5, scope="layer", calibration=calib, progress="off",
        refine_masks=False, solve_weights=False, correct_statistics="off",
    )  # fmt: skip
    auto = prune(
        PruneConfig(output=tmp_path / "auto.onnx", method="auto", auto_methods=("magnitude", "wanda"), **settings)
    )
    search = auto.pruning.method_search
    assert search["candidates"] == ["magnitude", "wanda"] and search["chosen"] == "wanda" == auto.pruning.method
    assert search["losses"][1] < 0.5 * search["losses"][0] and len(search["seconds"]) == 2
    config = PruneConfig(output=tmp_path / "auto.onnx", method="auto", **settings)
    calibration, evaluation = split(load_dataset(calib, input_specs(m)), config.eval_fraction, config.seed)
    fit, _ = search_split(config, calibration)
    assert len(fit) == 113  # 200 − 50 for evaluation − 37 held out by the search
    np.savez(tmp_path / "fit.npz", **fit.arrays)
    np.savez(tmp_path / "eval.npz", **evaluation.arrays)
    on_fit = {**settings, "calibration": tmp_path / "fit.npz", "evaluation": tmp_path / "eval.npz"}
    prune(PruneConfig(output=tmp_path / "wanda_fit.onnx", method="wanda", **on_fit))
    assert (tmp_path / "auto.onnx").read_bytes() == (tmp_path / "wanda_fit.onnx").read_bytes()
    wanda = prune(PruneConfig(output=tmp_path / "wanda.onnx", method="wanda", **settings))
    magnitude = prune(PruneConfig(output=tmp_path / "magnitude.onnx", method="magnitude", **settings))
    assert wanda.validation.top1_agreement > magnitude.validation.top1_agreement


def test_method_auto_leaves_out_methods_that_cannot_read_the_layers(tmp_path):
    """A weight behind a Transpose: the layer-wise methods cannot capture its inputs."""
    m = model(
        [
            helper.make_node("Transpose", ["w"], ["wt"], perm=[1, 0]),
            helper.make_node("MatMul", ["x", "wt"], ["logits"], name="mm"),
        ],
        [tensor("x", ["N", 6])],
        [tensor("logits", ["N", 4])],
        {"w": randn(4, 6, seed=1)},
    )
    source = tmp_path / "in.onnx"
    save(m, source)
    calib = save_npz(tmp_path / "calib.npz", x=randn(60, 6, seed=2))
    report = prune(
        PruneConfig(
            input=source, output=tmp_path / "o.onnx", sparsity=0.5, method="auto", calibration=calib, progress="off",
            auto_methods=("magnitude", "wanda", "sparsegpt"), scope="global",
        )
    )  # fmt: skip
    search = report.pruning.method_search
    assert set(search["skipped"]) == {"wanda", "sparsegpt"} and search["candidates"] == ["magnitude"]
    assert report.pruning.method == "magnitude"
