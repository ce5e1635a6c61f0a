"""Data-parallel statistics under torchrun (2 gloo processes on this machine): the same masks as
one process, weights to float precision, one writer."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch

from onnxprune import distributed
from onnxprune.bridge.bindings import read_tensor
from onnxprune.errors import UsageError

from builders import mlp, randn, save, save_npz

CLI = "import sys; from onnxprune_cli.main import main; sys.argv = ['onnxprune', *sys.argv[1:]]; main()"


def test_one_process_owns_every_item_and_shares_nothing():
    import torch

    assert distributed.world() == 1 and distributed.rank() == 0 and distributed.is_writer()
    assert list(distributed.owned(5)) == [0, 1, 2, 3, 4]
    parts = {"a": torch.arange(4.0)}
    shared = distributed.share(parts, {"a": 4, "b": 2})
    assert len(shared) == 1 and shared[0] is parts
    assert distributed.from_writer({"a": 1}) == {"a": 1}
    assert distributed.describe() == "1 process"


def test_items_go_to_the_least_loaded_rank_largest_first():
    # by hand: 5 -> rank 0 (5, 0); 3 -> rank 1 (5, 3); the other 3 -> rank 1 (5, 6); 1 -> rank 0 (6, 6)
    assert distributed.assign([5, 3, 3, 1], 2) == [0, 1, 1, 0]
    assert distributed.assign([1, 1, 1, 1, 1], 2) == [0, 1, 0, 1, 0]  # equal sizes: in order, alternating
    assert distributed.assign([4, 2], 1) == [0, 0]
    assert distributed.assign([2, 9, 2], 3) == [1, 0, 2]


def test_one_process_gets_its_own_values_back():
    values = {0: torch.arange(3.0), 2: torch.tensor([True, False])}
    assert distributed.from_owners(values, [0, 0, 0], torch.device("cpu")) == values


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_statistics(rank: int, port: int, folder: str) -> None:
    """One gloo rank: the gradients it computes, and the statistics it streams and collects."""
    import torch
    import torch.distributed as dist

    from onnxprune.bridge.convert import convert
    from onnxprune.data import Dataset, input_specs
    from onnxprune.estimators.diagonal import SquaredGradients
    from onnxprune.estimators.woodfisher import BlockGram
    from onnxprune.gradients import FisherLoss, GradientSource

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        proto = mlp(hidden=6, inputs=5, classes=3, seed=1)
        data = Dataset({"x": randn(20, 5, seed=2)}, None, "test")
        loss = FisherLoss(0, "logits", "logits", "sampled")
        source = GradientSource(convert(proto), data, input_specs(proto), loss, 7, 2, 0, torch.device("cpu"))
        computed: list[int] = []
        seen: list[int] = []
        squares, grams = SquaredGradients(6 * 5), BlockGram(6 * 5, 4)

        def consume(k, g):
            seen.append(k)
            squares.update(g["w1"][None])
            grams.update(g["w1"][None])

        source.stream(["w1"], consume, progress=lambda n: computed.append(n))
        rows = source.collect(["w1"])["w1"]
        torch.save({"computed": len(computed), "seen": seen, "total": squares.total, "count": squares.count,
                    "gram": grams._folded(), "rows": rows}, f"{folder}/rank{rank}.pt")  # fmt: skip
    finally:
        dist.destroy_process_group()


def test_each_rank_computes_its_share_and_folds_every_gradient_in_one_process_order(tmp_path):
    import torch
    import torch.multiprocessing as mp

    from onnxprune.bridge.convert import convert
    from onnxprune.data import Dataset, input_specs
    from onnxprune.estimators.diagonal import SquaredGradients
    from onnxprune.estimators.woodfisher import BlockGram
    from onnxprune.gradients import FisherLoss, GradientSource

    mp.spawn(_rank_statistics, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    parts = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert parts[0]["computed"] == 4 and parts[1]["computed"] == 3  # gradients 0, 2, 4, 6 and 1, 3, 5
    proto = mlp(hidden=6, inputs=5, classes=3, seed=1)
    data = Dataset({"x": randn(20, 5, seed=2)}, None, "test")
    loss = FisherLoss(0, "logits", "logits", "sampled")
    source = GradientSource(convert(proto), data, input_specs(proto), loss, 7, 2, 0, torch.device("cpu"))
    whole = source.collect(["w1"])["w1"]
    squares, grams = SquaredGradients(6 * 5), BlockGram(6 * 5, 4)
    for row in whole:
        squares.update(row[None])
        grams.update(row[None])
    assert torch.count_nonzero(whole.abs().sum(1)) == 7
    for part in parts:
        assert part["seen"] == list(range(7))  # every gradient, in one process's order
        assert torch.equal(part["rows"], whole)
        assert part["count"] == 7
        # the same sums in the same order: equal bit for bit, not to a rounding
        assert torch.equal(part["total"], squares.total)
        assert torch.equal(part["gram"], grams._folded())
    torch.testing.assert_close(squares.total, (whole.double() ** 2).sum(0), rtol=1e-12, atol=1e-15)


def _rank_exchange(rank: int, port: int, folder: str) -> None:
    """One gloo rank's items (by owners [0, 1, 0, 1]) and everything it received."""
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        own = {
            0: {0: torch.tensor([1.0, 1e-300, -2.5], dtype=torch.float64), 2: torch.tensor([True, False, True])},
            1: {1: torch.arange(6, dtype=torch.float32).reshape(2, 3) / 7},  # item 3: rank 1 has no value
        }[rank]
        torch.save(distributed.from_owners(own, [0, 1, 0, 1], torch.device("cpu")), f"{folder}/got{rank}.pt")
        # gradient rows sent to the rank that folds them: a to 0, b and c to 1; rank 1 sends no c,
        # and in a last round rank 1 has no gradient to send
        sizes, owners = {"a": 2, "b": 3, "c": 1}, {"a": 0, "b": 1, "c": 1}
        parts = {"a": torch.full((2,), rank + 0.5), "b": torch.arange(3.0) + 10 * rank, "c": torch.tensor([-1.0])}
        rows = [distributed.share(parts if rank == 0 else {k: parts[k] for k in "ab"}, sizes, owners)]
        rows.append(distributed.share(None if rank == 1 else parts, sizes, owners))
        torch.save(rows, f"{folder}/rows{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_every_rank_receives_each_item_from_its_owner_exactly(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_rank_exchange, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        got = torch.load(tmp_path / f"got{rank}.pt")
        assert sorted(got) == [0, 1, 2]  # item 3's owner had nothing for it
        assert got[0].dtype == torch.float64 and got[0].tolist() == [1.0, 1e-300, -2.5]  # not through float32
        assert got[1].shape == (2, 3) and torch.equal(got[1], torch.arange(6, dtype=torch.float32).reshape(2, 3) / 7)
        assert got[2].dtype == torch.bool and got[2].tolist() == [True, False, True]
    # each rank gets from every rank, in rank order, only the rows of the names it owns
    first, last = torch.load(tmp_path / "rows0.pt"), torch.load(tmp_path / "rows1.pt")
    assert [sorted(p) for p in first[0]] == [["a"], ["a"]] and first[0][1]["a"].tolist() == [1.5, 1.5]
    assert first[1][0]["a"].tolist() == [0.5, 0.5] and first[1][1] is None
    assert [sorted(p) for p in last[0]] == [["b", "c"], ["b"]]
    assert last[0][0]["b"].tolist() == [0.0, 1.0, 2.0] and last[0][1]["b"].tolist() == [10.0, 11.0, 12.0]
    assert last[0][0]["c"].tolist() == [-1.0] and last[1][1] is None and sorted(last[1][0]) == ["b", "c"]


def _split_run() -> dict:
    """tests/test_oneshot.py's MLP (two tensors) pruned in two steps on a budget that holds one
    tensor's statistics: each group's gradients collected again for its update."""
    from test_oneshot import run

    from onnxprune.config import PruneConfig
    from onnxprune.estimators import ESTIMATORS

    estimator = ESTIMATORS.get("woodfisher")(PruneConfig(input="i", output="o", sparsity=0.5, block_size=8))
    budget = estimator.memory((16, 6), 32).alone + 100
    result = run(budget=budget, steps=2, sparsity=0.7)[3]
    return {
        "arrays": result.arrays,
        "storage": result.plan.storage,
        "collections": [s.collections for s in result.steps],
    }


def _rank_split_run(rank: int, port: int, folder: str) -> None:
    from datetime import timedelta

    import torch.distributed as dist

    from onnxprune import distributed
    from onnxprune.estimators import woodfisher

    woodfisher.FOLD_ROWS, woodfisher.CHUNK_BYTES = 1, 8 * 8 * 8  # as the test below sets them in one process
    # a rank taking another branch around a collective would wait forever: fail within a minute
    init = f"tcp://127.0.0.1:{port}"
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=3, timeout=timedelta(seconds=60))
    try:
        torch.save(_split_run(), f"{folder}/rank{rank}.pt")
        # every tensor on rank 0: it cannot hold both tensors' statistics, and the others, owning
        # none, must collect each group's gradients again with it
        distributed.assign = lambda sizes, ranks: [0] * len(sizes)
        torch.save(_split_run(), f"{folder}/rank{rank}_first.pt")
    finally:
        dist.destroy_process_group()


def test_three_ranks_plan_their_own_tensors_and_collect_again_as_one_process(tmp_path, monkeypatch):
    # 2 tensors on 3 ranks on a budget that holds one tensor's statistics: one process collects
    # each group's gradients again for its update; split, each rank plans only its own tensor and
    # keeps its statistics (rank 2 computes none, yet joins every collection); with every tensor
    # on one rank, all three collect again as one process does
    import torch.multiprocessing as mp

    from onnxprune.estimators import woodfisher

    mp.spawn(_rank_split_run, args=(_free_port(), str(tmp_path)), nprocs=3, join=True)
    monkeypatch.setattr(woodfisher, "FOLD_ROWS", 1)
    monkeypatch.setattr(woodfisher, "CHUNK_BYTES", 8 * 8 * 8)
    one = _split_run()
    assert one["storage"] == "recompute" and one["collections"] == [4, 4]  # two groups, each twice, per step
    for rank in range(3):
        for suffix, storage, collections in (("", "memory", [1, 1]), ("_first", "recompute", [4, 4])):
            got = torch.load(tmp_path / f"rank{rank}{suffix}.pt", weights_only=False)
            assert got["storage"] == storage and got["collections"] == collections, (rank, suffix)
            for name, values in one["arrays"].items():
                assert np.array_equal(got["arrays"][name] == 0, values == 0), f"rank {rank}{suffix}, {name}: masks"
                np.testing.assert_allclose(got["arrays"][name], values, rtol=1e-5, atol=1e-6)


def _files(tmp_path):
    model = save(mlp(hidden=24, inputs=10, classes=4, seed=3), tmp_path / "mlp.onnx")
    x = randn(96, 10, seed=4)
    labels = np.argmax(x[:, :4] + 0.3 * x[:, 4:8], axis=1).astype(np.int64)
    calib = save_npz(tmp_path / "calib.npz", x=x, labels=labels)
    return model, calib


def _prune(args: list[str], ranks: int, cwd) -> subprocess.CompletedProcess:
    args = [*args, "--device", "cpu"]  # gloo on the CPU: a machine with one GPU cannot hold two NCCL ranks
    if ranks == 1:
        command = [sys.executable, "-c", CLI, *args]
    else:
        # torchrun's own module, with a rendezvous of its own (--standalone: a free port)
        runner = "import sys; from torch.distributed.run import main; main()"
        script = cwd / "onnxprune_main.py"
        script.write_text(CLI.replace("; ", "\n"))
        command = [sys.executable, "-c", runner, "--standalone", f"--nproc-per-node={ranks}", str(script), *args]
    return subprocess.run(command, capture_output=True, text=True, cwd=cwd, timeout=300)


# WoodFisher in the default suite (its tensors split over the ranks: masks chosen from every tensor's
# scores, or per tensor while scoring); the other two (another way of summing each) in `make test-slow`
@pytest.mark.parametrize(
    "method, allocation",
    [
        ("woodfisher", "global"),
        ("woodfisher", "layer"),
        pytest.param("diagonal-fisher", "global", marks=pytest.mark.slow),
        pytest.param("fishleg", "global", marks=pytest.mark.slow),
    ],
)
def test_two_ranks_prune_as_one_process(tmp_path, method, allocation):
    model, calib = _files(tmp_path)
    outputs = {}
    for ranks in (1, 2):
        out = tmp_path / f"out{ranks}.onnx"
        args = ["prune", str(model), str(out), "--sparsity", "0.7", "--method", method, "--calib", str(calib),
                "--num-grads", "32", "--damp", "1e-3", "--allocation", allocation, "--progress", "off",
                "--json", "-v"]  # fmt: skip
        done = _prune(args, ranks, tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
        split = "woodfisher: statistics, scores and updates of 2 tensors split over 2 ranks (this rank: 1 of them"
        assert (split in done.stderr) == (ranks == 2 and method == "woodfisher")
        report = json.loads(done.stdout)  # one JSON document: rank 0's alone
        assert report["environment"]["ranks"] == ("1 process" if ranks == 1 else "2 ranks (gloo)")
        assert report["fisher"]["num_grads"] == 32
        outputs[ranks] = (onnx.load(out), report)
    (one, one_report), (two, two_report) = outputs[1], outputs[2]
    for name in ("w1", "w2"):
        a, b = read_tensor(one, name), read_tensor(two, name)
        assert np.array_equal(a == 0, b == 0), f"{name}: masks differ"
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    assert two_report["validation"]["quality"]["after"] == pytest.approx(one_report["validation"]["quality"]["after"])
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".onnx") == ["mlp.onnx", "out1.onnx", "out2.onnx"]


def test_two_ranks_fine_tune_as_one_process(tmp_path):
    # each rank runs half of every mini-batch under DistributedDataParallel; the summed gradients
    # give every rank the step one process takes, so the weights agree to float precision
    model, calib = _files(tmp_path)
    outputs = {}
    for ranks in (1, 2):
        out = tmp_path / f"out{ranks}.onnx"
        args = ["prune", str(model), str(out), "--sparsity", "0.5", "--method", "magnitude", "--calib", str(calib),
                "--finetune-steps", "12", "--batch-size", "16", "--lr", "0.01", "--progress", "off", "-v",
                "--json"]  # fmt: skip
        done = _prune(args, ranks, tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
        assert ("split over 2 ranks (DistributedDataParallel)" in done.stderr) == (ranks == 2)
        outputs[ranks] = (onnx.load(out), json.loads(done.stdout))
    (one, one_report), (two, two_report) = outputs[1], outputs[2]
    curve = one_report["finetune"]["loss_curve"]
    assert len(curve) == 12 and curve[-1] < curve[0]  # it trained
    np.testing.assert_allclose(two_report["finetune"]["loss_curve"], curve, rtol=1e-5)
    dense = onnx.load(model)
    for name in ("w1", "w2"):
        a, b = read_tensor(one, name), read_tensor(two, name)
        assert np.array_equal(a == 0, b == 0), f"{name}: masks differ"
        assert not np.allclose(a, np.where(a == 0, 0, read_tensor(dense, name)))  # fine-tuning moved it
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("local_rank", ["0", "1"])
def test_more_ranks_than_gpus_stop_every_rank_with_a_setting_that_fits(monkeypatch, local_rank):
    # NCCL cannot put two ranks on one GPU: torch failed with "invalid device ordinal" on rank 1
    monkeypatch.setenv("LOCAL_RANK", local_rank)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    fits = r"2 ranks on this machine but torch sees 1 GPU.*--nproc-per-node 1.*--device cpu"
    with pytest.raises(UsageError, match=fits):
        distributed._own_gpu()
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert distributed._own_gpu() == 0
