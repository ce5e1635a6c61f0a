"""The one-shot engine: recomputation steps, masks that stay, memory groups, exit 8."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from onnx import helper

from onnxprune import PruneConfig, prune
from onnxprune.bridge.bindings import write_back
from onnxprune.bridge.convert import convert
from onnxprune.data import Dataset, input_specs
from onnxprune.errors import MemoryBudgetError
from onnxprune.estimators import ESTIMATORS, woodfisher
from onnxprune.estimators.base import MemoryNeed
from onnxprune.gradients import FisherLoss, GradientSource
from onnxprune.masks import prune_count
from onnxprune.memory import DoesNotFit, plan_memory
from onnxprune.oneshot import prune_oneshot
from onnxprune.progress import Progress
from onnxprune.schedule import cubic, oneshot_targets

from builders import MODELS, model, ort_run, randn, save, save_npz, tensor


def mlp_model():
    return model(
        [
            helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="fc1", transB=1),
            helper.make_node("Relu", ["h"], ["r"]),
            helper.make_node("MatMul", ["r", "w2"], ["logits"], name="fc2"),
        ],
        [tensor("x", ["n", 6])],
        [tensor("logits", ["n", 4])],
        {"w1": randn(16, 6, seed=1), "b1": randn(16, seed=2), "w2": randn(16, 4, seed=3)},
    )


def run(
    method="woodfisher",
    steps=1,
    budget=2**30,
    sparsity=0.6,
    scope="global",
    spill=None,
    estimator_class=None,
    **options,
):
    m = mlp_model()
    tm = convert(m)
    data = Dataset({"x": randn(40, 6, seed=4)}, None, "calib")
    config = PruneConfig(input="i.onnx", output="o.onnx", sparsity=sparsity, method=method, block_size=8, **options)
    estimator = (estimator_class or ESTIMATORS.get(method))(config)
    source = GradientSource(
        tm, data, input_specs(m), FisherLoss(0, "logits", "logits", "sampled"), 32, 2, 0, torch.device("cpu")
    )
    result = prune_oneshot(
        tm, tm.prunable, estimator, sparsity, steps, scope, source, budget, Progress(False), spill_folder=spill
    )
    return m, tm, estimator, result


def test_cubic_schedule_by_hand():
    assert oneshot_targets(0.8, 1) == [0.8]
    steps = oneshot_targets(0.8, 4)
    assert steps[-1] == pytest.approx(0.8) and steps[0] == pytest.approx(0.8 - 0.8 * 0.75**3)
    assert all(a < b for a, b in zip(steps, steps[1:]))
    assert cubic(2, 4, 0.5, 0.9) == pytest.approx(0.9 - 0.4 * 0.125)


@pytest.mark.parametrize("steps", [1, 3])
def test_exact_sparsity_and_written_model_matches_torch(steps):
    m, tm, _, result = run(steps=steps)
    total = 16 * 6 + 16 * 4
    assert sum(int((a == 0).sum()) for a in result.arrays.values()) == prune_count(total, 0.6)
    assert [round(s.sparsity, 6) for s in result.steps] == [round(s, 6) for s in oneshot_targets(0.6, steps)]
    pruned = write_back(m, result.arrays)
    x = randn(5, 6, seed=9)
    with torch.no_grad():
        ours = tm(torch.from_numpy(x))[0].numpy()
    np.testing.assert_allclose(ours, ort_run(pruned, {"x": x})[0], atol=1e-5)


def test_masked_coordinates_stay_exactly_zero_across_recomputation_steps():
    masks = []
    woodfisher = ESTIMATORS.get("woodfisher")

    class Recording(woodfisher):
        def compensate(self, weight, keep, stats):
            new = super().compensate(weight, keep, stats)
            masks.append((keep.clone(), new.clone()))
            return new

    m = mlp_model()
    tm = convert(m)
    data = Dataset({"x": randn(40, 6, seed=4)}, None, "calib")
    config = PruneConfig(input="i.onnx", output="o.onnx", sparsity=0.7, block_size=8)
    source = GradientSource(
        tm, data, input_specs(m), FisherLoss(0, "logits", "logits", "sampled"), 32, 1, 0, torch.device("cpu")
    )
    prune_oneshot(tm, tm.prunable, Recording(config), 0.7, 3, "global", source, 2**30, Progress(False))
    per_tensor = [masks[i::2] for i in range(2)]  # two tensors, three steps
    for history in per_tensor:
        for (before, _), (after, values) in zip(history, history[1:]):
            assert bool((after <= before).all())  # once pruned, never revived
            assert bool((values[~before] == 0).all())
        assert bool((history[-1][1][~history[-1][0]] == 0).all())


def test_statistics_spilled_or_collected_again_give_the_same_result_as_kept_in_memory(tmp_path, monkeypatch):
    _, _, _, roomy = run(budget=2**30)
    assert roomy.plan.storage == "memory" and len(roomy.plan.groups) == 1
    # rows folded one at a time and one block per float64 chunk: the inverses dominate what each
    # tensor needs, so a budget can hold either tensor alone but not w2 beside w1's kept inverse
    monkeypatch.setattr(woodfisher, "FOLD_ROWS", 1)
    monkeypatch.setattr(woodfisher, "CHUNK_BYTES", 8 * 8 * 8)
    estimator = ESTIMATORS.get("woodfisher")(PruneConfig(input="i", output="o", sparsity=0.5, block_size=8))
    w1, w2 = estimator.memory((16, 6), 32), estimator.memory((4, 16), 32)
    tight_budget = w1.alone + 100
    assert w1.kept + w2.alone > tight_budget >= w2.alone
    _, _, _, again = run(budget=tight_budget)  # no spill folder: recompute
    assert again.plan.storage == "recompute" and len(again.plan.groups) == 2
    assert again.steps[0].collections == 4  # two groups, each collected twice
    _, _, _, spilled = run(budget=tight_budget, spill=tmp_path)
    assert spilled.plan.storage == "disk" and spilled.steps[0].collections == 2
    assert list(tmp_path.iterdir()) == []  # the spill folder is removed
    for name in roomy.arrays:
        np.testing.assert_allclose(again.arrays[name], roomy.arrays[name], rtol=0, atol=1e-6)
        np.testing.assert_allclose(spilled.arrays[name], roomy.arrays[name], rtol=0, atol=1e-6)


def test_diagonal_fisher_streams_its_gradients_in_one_group_with_the_result_of_collected_rows():
    diagonal = ESTIMATORS.get("diagonal-fisher")

    class Collected(diagonal):
        streams_gradients = False  # all N rows held, then squared: the reference

        def memory(self, shape, count):
            return MemoryNeed(peak=4 * shape[0] * shape[1] * count)

    # a budget that holds the streamed sums of both tensors but not the 32 rows of either
    budget = 40 * (16 * 6 + 16 * 4)
    assert budget < 4 * 16 * 4 * 32
    _, _, _, streamed = run("diagonal-fisher", budget=budget)
    assert streamed.plan.groups == ((0, 1),) and streamed.steps[0].collections == 1
    with pytest.raises(MemoryBudgetError):
        run("diagonal-fisher", budget=budget, estimator_class=Collected)
    _, _, _, held = run("diagonal-fisher", estimator_class=Collected)
    for name in held.arrays:
        np.testing.assert_allclose(streamed.arrays[name], held.arrays[name], rtol=0, atol=0)


def test_plan_memory_by_hand():
    needs = [MemoryNeed(peak=40, kept=10), MemoryNeed(peak=30, kept=10), MemoryNeed(peak=50, kept=20)]
    roomy = plan_memory(needs, 1000, compensates=True)
    # built together: the peaks add up (each includes what it keeps)
    assert roomy.groups == ((0, 1, 2),) and roomy.storage == "memory" and roomy.estimate == 120
    # 75 bytes: 0 and 1 together (70), then 2 beside what they keep (20 + 50)
    tight = plan_memory(needs, 75, compensates=True)
    assert tight.storage == "memory" and tight.groups == ((0, 1), (2,)) and tight.estimate == 70
    # 60 bytes: 2 does not fit beside the 10 that 0 keeps (60 would be 0 and 1 alone, then 10 + 50):
    # 0 then 1 then 2, keeping 10 + 10 beside 2's 50 is 70: to disk if it has 1.2 x 40 free, else recompute
    assert plan_memory(needs, 65, compensates=True).storage == "recompute"
    assert plan_memory(needs, 60, compensates=True, disk_free=48).storage == "disk"
    tighter = plan_memory(needs, 60, compensates=True, disk_free=47)
    assert tighter.storage == "recompute" and tighter.groups == ((0,), (1,), (2,)) and tighter.passes == 6
    assert tighter.estimate == 50
    nothing_kept = plan_memory(needs, 60, compensates=False)
    assert nothing_kept.storage == "none" and nothing_kept.groups == ((0,), (1,), (2,))
    with pytest.raises(DoesNotFit) as caught:
        plan_memory(needs, 45, compensates=True)
    assert caught.value.index == 2


def test_plan_memory_by_hand_under_a_split_over_ranks():
    needs = [MemoryNeed(peak=40, kept=10), MemoryNeed(peak=30, kept=10), MemoryNeed(peak=50, kept=20)]
    # one rank holding every tensor plans as one process
    for budget in (1000, 75, 65):
        assert plan_memory(needs, budget, True, owners=[0, 0, 0]) == plan_memory(needs, budget, True)
    # tensors 0 and 2 on rank 0, 1 on rank 1: 90 bytes hold everything in one group (rank 0: 40 + 50;
    # one process needs 120)
    split = plan_memory(needs, 90, True, owners=[0, 1, 0])
    assert split.groups == ((0, 1, 2),) and split.storage == "memory" and split.estimate == 90
    # 65 bytes: one process recomputes; split, 2 waits for the next group on rank 0 (40 + 50 > 65)
    # beside the 10 that 0 keeps there, and nothing needs recomputing: 10 + 50 = 60
    split = plan_memory(needs, 65, True, owners=[0, 1, 0])
    assert split.groups == ((0, 1), (2,)) and split.storage == "memory" and split.estimate == 60
    # a group closes where any rank would overflow: here rank 1 (30 + 50 > 65; rank 0 would hold 40)
    split = plan_memory(needs, 65, True, owners=[0, 1, 1])
    assert split.groups == ((0, 1), (2,)) and split.estimate == 60
    # a rank that builds nothing needs nothing
    assert plan_memory(needs, 65, True, owners=[0, 0, 0]).storage == "recompute"
    assert plan_memory(needs, 65, True, owners=[2, 2, 2]).storage == "recompute"


def test_the_automatic_budget_is_shared_by_the_ranks_of_a_machine(monkeypatch):
    from onnxprune import runtime

    monkeypatch.setattr(runtime, "available_bytes", lambda: 10_000)
    config = PruneConfig(input="i.onnx", output="o.onnx", sparsity=0.5)
    assert runtime.memory_budget(config) == 8_000
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # 2 of the 4 ranks on this machine
    assert runtime.memory_budget(config) == 4_000
    # --max-memory is each process's own
    assert runtime.memory_budget(PruneConfig(input="i.onnx", output="o.onnx", sparsity=0.5, max_memory=1.0)) == 2**30


def test_exit_8_when_one_tensor_does_not_fit_with_a_suggestion(tmp_path):
    m = mlp_model()
    path = save(m, tmp_path / "m.onnx")
    data = save_npz(tmp_path / "c.npz", x=randn(20, 6, seed=1))
    estimator = ESTIMATORS.get("woodfisher")(PruneConfig(input="i", output="o", sparsity=0.5, block_size=16))
    budget = estimator.memory((16, 6), 64).alone + 1  # w1 (16x6) fits with 16-wide blocks, not with 64
    with pytest.raises(MemoryBudgetError, match=r"tensor 'w1'.*try --block-size (16|32)\b") as caught:
        prune(
            PruneConfig(
                input=path,
                output=tmp_path / "o.onnx",
                sparsity=0.5,
                calibration=data,
                num_grads=64,
                block_size=64,
                max_memory=budget / 2**30,
            )
        )
    assert caught.value.exit_code == 8
    assert not (tmp_path / "o.onnx").exists()


def test_woodfisher_beats_magnitude_on_the_shipped_mnist_cnn_at_90_percent(tmp_path):
    """The seed paper's claim on real digits, one-shot without fine-tuning (the full table with
    the default budget is in docs/benchmarks.md): the estimators alone, without the repair passes
    (which lift magnitude to WoodFisher's level here)."""
    accuracy = {}
    for method in ("magnitude", "woodfisher"):
        report = prune(
            PruneConfig(
                input=MODELS / "mnist_cnn.onnx",
                output=tmp_path / f"{method}.onnx",
                sparsity=0.9,
                method=method,
                calibration=MODELS / "mnist_calib.npz",
                evaluation=MODELS / "mnist_eval.npz",
                num_grads=128,
                progress="off",
                refine_masks=False,
                solve_weights=False,
                correct_statistics="off",
            )
        )
        accuracy[method] = report.validation.accuracy_after
        dense = report.validation.accuracy_before
    assert accuracy["woodfisher"] >= accuracy["magnitude"] + 0.01, accuracy
    assert accuracy["woodfisher"] <= dense


def test_layer_allocation_chooses_each_mask_while_scoring_and_keeps_no_scores():
    """Per-layer masks are chosen as each tensor is scored (a large model never holds every
    tensor's float scores): the same masks and weights as choosing them from all the scores."""
    from onnxprune.oneshot import Pruner

    results = {}
    for mode in ("step", "score then apply"):
        m = mlp_model()
        tm = convert(m)
        data = Dataset({"x": randn(40, 6, seed=4)}, None, "calib")
        source = GradientSource(
            tm, data, input_specs(m), FisherLoss(0, "logits", "logits", "sampled"), 32, 2, 0, torch.device("cpu")
        )
        estimator = ESTIMATORS.get("woodfisher")(PruneConfig(input="i", output="o", sparsity=0.6, block_size=8))
        with Pruner(tm, tm.prunable, estimator, "layer", lambda step, s=source: s, 2**30, Progress(False)) as pruner:
            if mode == "step":
                scored = pruner.score("s", select_at=0.6)
                assert scored.scores == {} and sorted(scored.selected) == [0, 1]
                with pytest.raises(ValueError, match="score again"):
                    pruner.apply(scored, 0.5, last=True)
                pruner.apply(scored, 0.6, last=True)
            else:
                scored = pruner.score("s")
                assert sorted(scored.scores) == [0, 1] and scored.selected == {}
                pruner.apply(scored, 0.6, last=True)
            results[mode] = (pruner.masks(), pruner.arrays())
    (masks, arrays), (masks_ref, arrays_ref) = results["step"], results["score then apply"]
    for name, mask in masks.items():
        assert torch.equal(mask, masks_ref[name])
        assert int((~mask).sum()) == prune_count(mask.numel(), 0.6)
        np.testing.assert_array_equal(arrays[name], arrays_ref[name])
