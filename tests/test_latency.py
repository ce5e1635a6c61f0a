"""--target-speedup: the latency table's groups and shape, the choice of classes by saliency per
millisecond saved (hand-computed), the timed rounds that tighten a prediction that fell short,
and the requests that cannot be met stopping before anything is written."""

from __future__ import annotations

import json

import jsonschema
import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import helper

from onnxprune import PruneConfig
from onnxprune.errors import UsageError
from onnxprune.report import schema
from onnxprune.speed import paired_ratio
from onnxprune.structure.constraint import SPEED_ROUNDS, SPEED_SCHEDULE_END, ChannelConstraint
from onnxprune.structure.latency import (
    FRACTIONS,
    MAX_TABLE_RUNS,
    GroupCost,
    LatencyTable,
    alone_limit,
    choose_by_losses,
    choose_for_latency,
    latency_groups,
    measure_table,
)
from onnxprune.structure.trace import trace_channels
from onnxprune_cli.main import main

from builders import model, randn, save, save_npz, tensor


def mlp(widths=(6, 4, 4, 2)):
    """x -> MatMul -> Relu -> MatMul -> Relu -> MatMul (logits): two hidden layers of neurons."""
    inits, nodes, last = {}, [], "x"
    for i, (a, b) in enumerate(zip(widths, widths[1:])):
        inits[f"w{i}"] = (randn(a, b, seed=i + 1) / np.sqrt(a)).astype(np.float32)
        out = "logits" if i == len(widths) - 2 else f"h{i}"
        nodes.append(helper.make_node("MatMul", [last, f"w{i}"], [out], name=f"fc{i}"))
        if out != "logits":
            nodes.append(helper.make_node("Relu", [out], [f"r{i}"], name=f"relu{i}"))
            last = f"r{i}"
    return model(nodes, [tensor("x", ["n", widths[0]])], [tensor("logits", ["n", widths[-1]])], inits)


def hand_table(graph, savings_per_class, dense_ms=10.0):
    """A table with a linear saving per class in each group (no timing)."""
    groups = []
    for (classes, spaces), per_class in zip(latency_groups(graph), savings_per_class):
        limit = alone_limit(graph, spaces, len(classes))
        groups.append(GroupCost(classes, spaces, (0, limit), (0.0, per_class * limit)))
    return LatencyTable(dense_ms, groups, 1, 1, 1, b"", {}, graph)


def test_groups_are_the_classes_of_each_layer_and_a_layer_keeps_one_channel():
    graph = trace_channels(mlp())
    groups = latency_groups(graph)
    assert [spaces for _, spaces in groups] == [((0, 1),), ((1, 1),)]  # fc2's outputs reach the graph output
    assert [len(classes) for classes, _ in groups] == [4, 4]
    assert [alone_limit(graph, spaces, len(classes)) for classes, spaces in groups] == [3, 3]


def test_the_choice_takes_the_smallest_saliency_per_millisecond_until_the_prediction_is_met():
    graph = trace_channels(mlp())
    (first, _), (second, _) = latency_groups(graph)
    # fc0's neurons save 1 ms each, fc1's 0.1 ms each
    table = hand_table(graph, (1.0, 0.1))
    totals = dict(zip(first, (5.0, 1.0, 2.0, 9.0))) | dict(zip(second, (0.05, 0.5, 0.01, 0.3)))
    removed, predicted = choose_for_latency(graph, totals, table, target_ms=8.5)
    # by hand: fc1's 0.01 (0.1 per ms) and 0.05 (0.5), then fc0's 1.0 (1 per ms; fc1's next is 0.3/0.1 = 3)
    # and fc0's 2.0 (2 per ms): 10 - 0.2 - 2 = 7.8 <= 8.5
    assert removed == {second[2], second[0], first[1], first[2]}
    assert predicted == pytest.approx(7.8)
    assert table.predicted_ms(removed) == pytest.approx(7.8)


def test_every_class_that_may_go_goes_when_the_target_is_out_of_reach():
    graph = trace_channels(mlp())
    table = hand_table(graph, (1.0, 0.1))
    removed, predicted = choose_for_latency(graph, dict.fromkeys(graph.classes(), 1.0), table, target_ms=0.0)
    assert len(removed) == 6  # three of each layer's four neurons: each layer keeps one
    assert predicted == pytest.approx(10 - 3.0 - 0.3)
    assert table.most_removed() == removed


def test_classes_removed_by_an_earlier_step_stay_removed_and_count():
    graph = trace_channels(mlp())
    (first, _), (second, _) = latency_groups(graph)
    table = hand_table(graph, (1.0, 0.1))
    totals = dict.fromkeys(graph.classes(), 1.0)
    removed, predicted = choose_for_latency(graph, totals, table, target_ms=9.5, already=frozenset({first[3]}))
    assert removed == {first[3]} and predicted == pytest.approx(9.0)


def test_a_group_saving_is_interpolated_between_the_timed_widths():
    cost = GroupCost((1, 2, 3, 4), ((0, 1),), (0, 2, 4), (0.0, 1.0, 1.5))
    assert [cost.saving(k) for k in range(5)] == pytest.approx([0.0, 0.5, 1.0, 1.25, 1.5])


def test_paired_ratio_is_the_median_of_the_per_run_ratios():
    # a burst of load on the third pair slows both of its runs: it does not move the ratio
    assert paired_ratio([1.0, 1.0, 5.0, 1.0], [0.5, 0.5, 2.5, 0.6]) == pytest.approx(0.5)


def test_the_measured_table_times_each_group_at_its_fractions_and_saves_more_as_more_goes():
    proto = mlp((16, 64, 32, 4))
    graph = trace_channels(proto)
    table = measure_table(proto, graph, {"x": randn(8, 16, seed=3)}, batch_size=8, runs=5, threads=1)
    assert table.dense_ms > 0 and len(table.groups) == 2
    for group, limit in zip(table.groups, (63, 31)):
        assert group.counts == (0, *sorted({round(f * limit) for f in FRACTIONS}))
        assert group.saved_ms[0] == 0.0 and all(b >= a for a, b in zip(group.saved_ms, group.saved_ms[1:]))
    summary = table.summary()
    # a model this small takes the most runs: at least TABLE_SECONDS of dense runs per variant
    assert summary["groups"] == 2 and summary["runs"] == MAX_TABLE_RUNS and summary["threads"] == 1


class _Timed(LatencyTable):
    """A table whose whole-model timing is a scripted list of speed-ups."""

    def __init__(self, base: LatencyTable, measured):
        super().__init__(base.dense_ms, base.groups, 1, 1, 1, b"", {}, base.graph)
        self.measured = list(measured)

    def speedup_of(self, removed):
        return self.measured.pop(0)


def search(measured):
    """The target search for 1.25x on the MLP (every class saves 1 ms of 10), timings scripted;
    returns the constraint (its rounds), the saliencies and the choice."""
    graph = trace_channels(mlp())
    table = _Timed(hand_table(graph, (1.0, 1.0)), measured=measured)
    constraint = ChannelConstraint(graph, "global", table, speedup=1.25)
    totals = {c: float(i) for i, c in enumerate(sorted(graph.classes()))}
    removed = constraint._for_speedup(
        table, lambda target_ms: choose_for_latency(graph, totals, table, target_ms), 1.25, frozenset()
    )
    return constraint, totals, removed


def test_the_choice_by_measured_losses_is_the_knapsack_over_the_groups_widths():
    graph = trace_channels(mlp((6, 8, 8, 2)))
    (a, a_spaces), (b, b_spaces) = latency_groups(graph)
    groups = [GroupCost(a, a_spaces, (0, 2, 4), (0.0, 2.0, 4.0)), GroupCost(b, b_spaces, (0, 2, 4), (0.0, 1.0, 4.0))]
    table = LatencyTable(10.0, groups, 1, 1, 1, b"", {}, graph)
    totals = {c: float(i) for i, c in enumerate(sorted(graph.classes()))}  # group a's 8 classes first
    losses = [{2: 0.1, 4: 1.0}, {2: 0.05, 4: 0.3}]
    # 4 ms to save: a's 4 (loss 1.0), b's 4 (0.3), a's 2 and b's 4 (0.4), a's 4 and b's 2 (1.05)
    removed, predicted = choose_by_losses(graph, totals, table, losses, 6.0)
    assert removed == set(sorted(b, key=totals.get)[:4]) and predicted == 6.0
    # the additive greedy on the same saliencies takes a's four (the smallest saliency per ms)
    assert choose_for_latency(graph, totals, table, 6.0)[0] == set(sorted(a, key=totals.get)[:4])
    # 2 ms: b's 2 save 1 ms only, a's 2 save 2 (loss 0.1)
    removed, predicted = choose_by_losses(graph, totals, table, losses, 8.0)
    assert removed == set(sorted(a, key=totals.get)[:2]) and predicted == 8.0
    # out of reach: the widths that save the most (the largest measured count of each group)
    removed, predicted = choose_by_losses(graph, totals, table, losses, 1.0)
    assert predicted == 2.0 and len(removed) == 8


def test_a_choice_measured_short_of_its_goal_is_searched_deeper_then_between():
    constraint, _, removed = search([1.1, 1.3, 1.3, 1.2])
    # every class saves 1 ms of 10. Round 1 aims at 10 / 1.25 = 8 ms (2 classes) and is measured
    # 1.1x: deeper, 8 * 1.1 / 1.25 = 7.04 ms (3 classes), measured 1.3x; then halfway, 7.52 ms
    # (3 classes again, 1.3x) and 7.76 ms (3 classes, 1.2x: short)
    assert [(r["classes"], r["measured"]) for r in constraint.rounds] == [(2, 1.1), (3, 1.3), (3, 1.3), (3, 1.2)]
    assert constraint.rounds[0] == {"goal": 1.25, "predicted": 1.25, "measured": 1.1, "classes": 2}
    assert len(removed) == 3


def test_a_choice_that_meets_its_goal_is_searched_shallower_and_the_shallowest_that_met_stands():
    constraint, totals, removed = search([1.5, 1.2, 1.3, 1.2])
    # 8 ms: 2 classes, 1.5x (met) -> 8 * 1.5 / 1.25 = 9.6 ms: 1 class, 1.2x (short) -> halfway
    # 8.8 ms: 2 classes, 1.3x (met) -> 9.2 ms: 1 class, 1.2x (short); the choice met at 8.8 ms stands
    assert [r["classes"] for r in constraint.rounds] == [2, 1, 2, 1]
    lowest = sorted(totals, key=totals.get)[:2]
    assert removed == set(lowest)


def test_a_step_of_a_schedule_aims_at_its_share_of_the_speed_up():
    graph = trace_channels(mlp())
    table = _Timed(hand_table(graph, (1.0, 1.0)), measured=[9.9] * 8)
    constraint = ChannelConstraint(graph, "global", table, speedup=2.0)

    class Pruner:  # what ChannelConstraint.masks reads
        views = []
        evaluate = None  # the additive choice

        def masks(self):
            return {}

    class Scored:
        scores = {}
        groups = {}

    constraint.masks(Pruner(), Scored(), SPEED_SCHEDULE_END / 2, {})
    constraint.masks(Pruner(), Scored(), SPEED_SCHEDULE_END, {})
    assert [r["goal"] for r in constraint.rounds] == [1.5] * SPEED_ROUNDS + [2.0] * SPEED_ROUNDS


@pytest.fixture
def mlp_files(tmp_path):
    proto = mlp((64, 512, 256, 4))
    path = save(proto, tmp_path / "mlp.onnx")
    x = randn(96, 64, seed=5)
    labels = (x[:, 0] > 0).astype(np.int64)
    return (
        path,
        save_npz(tmp_path / "calib.npz", x=x[:64], labels=labels[:64]),
        save_npz(tmp_path / "eval.npz", x=x[64:], labels=labels[64:]),
        tmp_path,
    )


def test_a_target_speedup_run_reports_its_table_and_rounds_and_removes_the_shallowest_choice_that_met_it(mlp_files):
    path, calib, evaluation, tmp = mlp_files
    out = tmp / "fast.onnx"
    args = ["prune", str(path), str(out), "--structure", "channels", "--target-speedup", "1.2", "--method",
            "magnitude", "--calib", str(calib), "--eval", str(evaluation), "--speed-batch", "32",
            "--json", "-q"]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    jsonschema.validate(report, schema())
    target = report["pruning"]["channels"]["target_speedup"]
    assert target["target"] == 1.2 and target["table"]["groups"] == 2 and target["table"]["batch_size"] == 32
    rounds = target["rounds"]
    assert len(rounds) == SPEED_ROUNDS
    met = [r["classes"] for r in rounds if r["measured"] >= r["goal"]]
    chosen = min(met) if met else max(r["classes"] for r in rounds)  # the shallowest that met the goal
    removed = sum(row["before"] - row["kept"] for row in report["pruning"]["channels"]["layers"])
    assert removed == chosen
    dims = {t.name: tuple(t.dims) for t in onnx.load(str(out)).graph.initializer}
    assert dims["w0"][1] == dims["w1"][0] and dims["w1"][1] == dims["w2"][0]


def test_a_target_speedup_that_cannot_be_reached_stops_with_exit_11_and_writes_nothing(mlp_files):
    path, calib, evaluation, tmp = mlp_files
    out = tmp / "never.onnx"
    args = ["prune", str(path), str(out), "--structure", "channels", "--target-speedup", "1000", "--method",
            "magnitude", "--calib", str(calib), "--eval", str(evaluation), "--speed-runs", "3"]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 11
    assert "--target-speedup 1000 cannot be reached" in result.stderr and "nothing was written" in result.stderr
    assert not out.exists() and not (tmp / "never.report.json").exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--target-speedup", "1.5"], "--target-speedup needs --structure channels"),
        (["--structure", "channels", "--target-speedup", "1.5", "--sparsity", "0.5"], "not both"),
        (["--structure", "channels", "--target-speedup", "0.9"], "more than 1"),
        (["--structure", "channels"], "pass --sparsity"),
    ],
)
def test_speed_requests_that_do_not_make_sense_stop_with_exit_2(mlp_files, extra, message):
    path, calib, evaluation, tmp = mlp_files
    result = CliRunner().invoke(main, ["prune", str(path), str(tmp / "o.onnx"), "--calib", str(calib), *extra])
    assert result.exit_code == 2 and message in result.stderr
    assert not (tmp / "o.onnx").exists()


def test_the_config_rejects_an_initial_sparsity_with_a_speed_target(tmp_path):
    with pytest.raises(UsageError, match="--initial-sparsity does not apply"):
        PruneConfig(
            input=tmp_path / "a.onnx", output=tmp_path / "b.onnx", sparsity=0.0, structure="channels",
            target_speedup=1.5, schedule="gradual", initial_sparsity=0.1,
        )  # fmt: skip
