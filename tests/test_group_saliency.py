"""OBS group saliency for whole channels: ½ w_Gᵀ ([F⁻¹]_GG)⁻¹ w_G over a class's entries, by hand
on blocks, and inside a structured WoodFisher step (the classes it removes are the least
salient groups, not the smallest sums of single-entry saliencies)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from onnx import helper

from onnxprune import PruneConfig
from onnxprune.bridge.convert import convert
from onnxprune.data import Dataset, input_specs
from onnxprune.estimators import ESTIMATORS
from onnxprune.fishleg_maths import KronFactors, q_dense, q_diagonal, q_group_saliency
from onnxprune.gradients import FisherLoss, GradientSource
from onnxprune.obs import obs_group_saliency, obs_saliency, to_blocks, woodbury_inverse
from onnxprune.oneshot import Pruner
from onnxprune.progress import Progress
from onnxprune.structure.constraint import class_entries
from onnxprune.structure.remove import class_totals, keep_masks
from onnxprune.structure.trace import trace_channels

from builders import model, randn, tensor


def test_a_correlated_pair_costs_less_together_than_its_single_saliencies_summed():
    # one block, F⁻¹ = [[2, 1], [1, 2]], w = (1, 1): ½ wᵀ (F⁻¹)⁻¹ w = ½ · (1/3)(2 − 1 − 1 + 2) = 1/3,
    # while the single-entry saliencies are 1² / (2 · 2) = 1/4 each
    finv = torch.tensor([[[2.0, 1.0], [1.0, 2.0]]], dtype=torch.float64)
    w = torch.tensor([[1.0, 1.0]], dtype=torch.float64)
    pair, first, none = obs_group_saliency(
        w, finv, [torch.tensor([0, 1]), torch.tensor([0]), torch.tensor([], dtype=torch.long)]
    )
    assert float(pair) == pytest.approx(1 / 3) and float(first) == pytest.approx(0.25) and float(none) == 0.0
    assert obs_saliency(w, finv).tolist() == [[0.25, 0.25]]


def test_groups_across_blocks_add_up_and_equal_the_dense_formula():
    generator = torch.Generator().manual_seed(0)
    grads = torch.randn(12, 10, generator=generator, dtype=torch.float64)
    w = torch.randn(10, generator=generator, dtype=torch.float64)
    finv = woodbury_inverse(to_blocks(grads, 4), 0.1)  # blocks of 4, the last padded
    dense = torch.block_diag(*finv)[:10, :10]
    groups = [torch.tensor([0, 1, 5, 9]), torch.tensor([3, 2]), torch.tensor([8]), torch.tensor([4, 6, 7])]
    got = obs_group_saliency(to_blocks(w, 4), finv, groups, chunk_bytes=1)  # one segment per chunk
    for group, value in zip(groups, got):
        by_block = [group[group // 4 == b] for b in range(3)]
        expected = sum(0.5 * float(w[g] @ torch.linalg.solve(dense[g][:, g], w[g])) for g in by_block if len(g))
        assert float(value) == pytest.approx(expected, rel=1e-10)
    # a single entry is the classic saliency
    assert float(got[2]) == pytest.approx(float(obs_saliency(to_blocks(w, 4), finv).reshape(-1)[8]))


def mlp():
    """fc1 (Gemm, transB: w1 is [out 8, in 6]) -> Relu -> fc2 (MatMul: w2 is [in 8, out 3])."""
    return model(
        [
            helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="fc1", transB=1),
            helper.make_node("Relu", ["h"], ["r"], name="relu"),
            helper.make_node("MatMul", ["r", "w2"], ["logits"], name="fc2"),
        ],
        [tensor("x", ["n", 6])],
        [tensor("logits", ["n", 3])],
        {"w1": randn(8, 6, seed=1), "b1": np.abs(randn(8, seed=2)), "w2": randn(8, 3, seed=3)},
    )


def woodfisher_on_mlp():
    """The MLP converted, its channel graph, WoodFisher (blocks of 6: a w1 row is a block) and a
    gradient source over 40 inputs."""
    proto = mlp()
    torch_model = convert(proto)
    config = PruneConfig(input="i.onnx", output="o.onnx", sparsity=0.5, block_size=6, damp=0.1)
    data = Dataset({"x": randn(40, 6, seed=4)}, None, "calib")
    loss = FisherLoss(0, "logits", "logits", "sampled")
    source = GradientSource(torch_model, data, input_specs(proto), loss, 24, 2, 0, torch.device("cpu"))
    return torch_model, trace_channels(proto), ESTIMATORS.get("woodfisher")(config), source


def summed_entry_saliencies(graph, views, scored):
    """Per class, the estimator's single-entry saliencies summed (what the sums rank by)."""
    entry = {
        v.target.name: v.to_onnx(scored.scores[i].clamp(min=0)).reshape(v.onnx_shape).numpy() for i, v in views.values()
    }
    return class_totals(graph, entry)


def test_a_structured_woodfisher_step_removes_the_least_salient_groups_by_hand():
    torch_model, graph, estimator, source = woodfisher_on_mlp()
    assert len(graph.classes()) == 8  # the hidden neurons; fc2's outputs are the graph's
    targets = torch_model.prunable
    with Pruner(
        torch_model, targets, estimator, "global", lambda _: source, 1 << 30, Progress(False), channels=graph
    ) as pruner:
        views = {v.target.name: (i, v) for i, v in enumerate(pruner.views)}
        scored = pruner.score("step")
        expected: dict[int, float] = {}
        for name in ("w1", "w2"):
            i, view = views[name]
            entries = class_entries(graph, view)
            dense = torch.block_diag(*estimator.inverse(scored.stats[i]).double())[: view.numel, : view.numel]
            w = view.read().double()
            for root, index in entries.items():
                # hidden neuron k: row k of w1 (canonical = ONNX), row k of w2 = canonical column k
                k = graph.classes()[root][0] - graph.space_of(graph.classes()[root][0]).start
                by_hand = np.arange(6) + 6 * k if name == "w1" else np.arange(3) * 8 + k
                assert sorted(index.tolist()) == by_hand.tolist()
                g = torch.as_tensor(by_hand)
                value = 0.5 * float(w[g] @ torch.linalg.solve(dense[g][:, g], w[g]))
                assert scored.groups[i][root] == pytest.approx(value, rel=1e-9)
                expected[root] = expected.get(root, 0.0) + value
        least = sorted(expected, key=lambda root: (expected[root], root))[:4]
        # the single-entry saliencies summed per class would remove other neurons here
        summed = summed_entry_saliencies(graph, views, scored)
        assert set(sorted(summed, key=lambda root: (summed[root], root))[:4]) != set(least)
        pruner.apply(scored, 0.5, last=True)
        shapes = {name: tuple(v.onnx_shape) for name, (_, v) in views.items()}
        for name, mask in keep_masks(graph, shapes, least).items():
            np.testing.assert_array_equal(pruner.masks()[name].numpy(), mask)


def test_fishleg_group_saliency_equals_the_dense_formula_for_rows_columns_and_any_set():
    generator = torch.Generator().manual_seed(1)
    m, n = 5, 7  # factor blocks of at most 3: padded on both sides
    R = torch.eye(3, dtype=torch.float64) + 0.3 * torch.randn(2, 3, 3, generator=generator, dtype=torch.float64)
    L = torch.eye(3, dtype=torch.float64) + 0.3 * torch.randn(3, 3, 3, generator=generator, dtype=torch.float64)
    A = 0.5 + torch.rand(m, n, generator=generator, dtype=torch.float64)
    theta = KronFactors(R=R, L=L, A=A)
    w = torch.randn(m, n, generator=generator, dtype=torch.float64)
    q = q_dense(theta)
    grid = torch.arange(m * n).reshape(m, n)
    groups = [
        grid[2],  # a row: an output channel
        grid[:, 4],  # a column: a consumer's input
        grid[1:4, 2:5].reshape(-1),  # a rectangle
        torch.cat([grid[0], grid[1:, 0]]),  # a row and a column of the same tensor
        torch.tensor([], dtype=torch.long),
    ]
    got = q_group_saliency(theta, w, groups)
    for group, value in zip(groups[:-1], got):
        x = w.reshape(-1)[group]
        assert float(value) == pytest.approx(0.5 * float(x @ torch.linalg.solve(q[group][:, group], x)), rel=1e-9)
    assert float(got[-1]) == 0.0
    # one entry: the closed-form diagonal saliency the estimator scores entries with
    single = q_group_saliency(theta, w, [torch.tensor([9])])
    assert float(single) == pytest.approx(float(w.reshape(-1)[9] ** 2 / (2 * q_diagonal(theta).reshape(-1)[9])))


@pytest.mark.parametrize("better", ["group", "summed"])
def test_the_ranking_with_the_smaller_held_out_loss_removes_the_classes(better):
    torch_model, graph, estimator, source = woodfisher_on_mlp()
    w1 = torch_model.tensors["w1"]
    wanted: dict[str, frozenset[int]] = {}
    seen: list[frozenset[int]] = []

    def evaluate() -> float:
        # the held-out loss: 0 for the wanted neurons gone (rows of w1 zeroed), 1 for anything else
        gone = frozenset(int(k) for k in torch.nonzero((w1.detach() == 0).all(dim=1)).reshape(-1))
        seen.append(gone)
        return 0.0 if gone == wanted["rows"] else 1.0

    with Pruner(
        torch_model, torch_model.prunable, estimator, "global", lambda _: source, 1 << 30, Progress(False),
        evaluate=evaluate, channels=graph,
    ) as pruner:  # fmt: skip
        views = {v.target.name: (i, v) for i, v in enumerate(pruner.views)}
        scored = pruner.score("step")
        summed = summed_entry_saliencies(graph, views, scored)
        grouped = {root: sum(scored.groups[i].get(root, 0.0) for i in scored.groups) for root in summed}

        def rows(totals):  # the hidden neurons the 4 least salient classes are
            least = sorted(totals, key=lambda root: (totals[root], root))[:4]
            return frozenset(
                graph.classes()[root][0] - graph.space_of(graph.classes()[root][0]).start for root in least
            )

        choices = {"group": rows(grouped), "summed": rows(summed)}
        assert choices["group"] != choices["summed"]
        wanted["rows"] = choices[better]
        pruner.apply(scored, 0.5, last=True)
        assert seen == [choices["group"], choices["summed"]]  # both measured, masks only
        record = pruner.allocator.rankings[0]
        assert record["chosen"] == better and not record["same"]
        assert record["losses"] == {"group": float(better != "group"), "summed": float(better != "summed")}
        gone = frozenset(int(k) for k in torch.nonzero(~pruner.masks()["w1"].all(dim=1)).reshape(-1))
        assert gone == choices[better]
        # the other trial's masks left no trace: the rows only it removed have their weights back
        other = sorted(choices["summed" if better == "group" else "group"] - gone)
        assert other and bool((w1.detach()[other] != 0).all())
