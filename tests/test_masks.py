"""Mask selection: exact counts, hand-computed examples, tie-breaking."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from onnxprune.masks import global_masks, keep_lowest_pruned, layer_masks, profile_masks, prune_count


def test_prune_count_rounds_to_nearest_element():
    assert prune_count(10, 0.8) == 8
    assert prune_count(72, 0.8) == 58  # 57.6
    assert prune_count(5, 0.5) == 3  # 2.5 rounds up
    assert prune_count(4, 0.0) == 0
    assert prune_count(3, 0.99) == 3


def test_keep_lowest_pruned_on_a_4x4_example():
    scores = torch.tensor(
        [
            [0.9, 0.1, 0.5, 0.3],
            [0.2, 0.8, 0.05, 0.7],
            [0.6, 0.4, 0.95, 0.15],
            [0.35, 0.25, 0.45, 0.85],
        ]
    )
    keep = keep_lowest_pruned(scores, 6)  # the six lowest: 0.05 0.1 0.15 0.2 0.25 0.3
    expected = torch.tensor(
        [
            [1, 0, 1, 0],
            [0, 1, 0, 1],
            [1, 1, 1, 0],
            [1, 0, 1, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(keep, expected)


def test_ties_are_broken_by_position():
    keep = keep_lowest_pruned(torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0]), 3)
    # both zeros go, then the first of the equal ones
    assert keep.tolist() == [False, False, True, False, True]


def test_zero_and_all():
    s = torch.rand(3, 3)
    assert keep_lowest_pruned(s, 0).all()
    assert not keep_lowest_pruned(s, 9).any()


def test_non_finite_scores_are_refused():
    with pytest.raises(ValueError):
        keep_lowest_pruned(torch.tensor([1.0, float("nan")]), 1)


def test_layer_and_global_masks_by_hand():
    scores = {"a": torch.tensor([[1.0, 2.0], [3.0, 4.0]]), "b": torch.tensor([10.0, 20.0, 30.0, 40.0])}
    layer = layer_masks(scores, 0.5)
    assert layer["a"].tolist() == [[False, False], [True, True]]
    assert layer["b"].tolist() == [False, False, True, True]
    glob = global_masks(scores, 0.5)  # the four lowest of all eight are all of `a`
    assert not glob["a"].any() and glob["b"].all()


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 40), min_size=1, max_size=5),
    sparsity=st.floats(0.0, 0.999),
    seed=st.integers(0, 10_000),
    integer_scores=st.booleans(),
)
def test_counts_are_exact_global_and_per_layer(sizes, sparsity, seed, integer_scores):
    g = torch.Generator().manual_seed(seed)
    scores = {
        f"t{i}": (torch.randint(0, 3, (n,), generator=g).float() if integer_scores else torch.rand(n, generator=g))
        for i, n in enumerate(sizes)
    }
    total = sum(sizes)
    glob = global_masks(scores, sparsity)
    assert sum(int((~m).sum()) for m in glob.values()) == prune_count(total, sparsity)
    for name, m in layer_masks(scores, sparsity).items():
        assert int((~m).sum()) == prune_count(scores[name].numel(), sparsity)
    # every kept score is >= every pruned score (global)
    kept = torch.cat([scores[n][glob[n]] for n in scores])
    dropped = torch.cat([scores[n][~glob[n]] for n in scores])
    if kept.numel() and dropped.numel():
        assert kept.min() >= dropped.max()


def test_profile_masks_take_counts_from_the_profile_and_entries_from_the_scores_by_hand():
    # global magnitude at 50% over a = [4, 3, 2, 1] and b = [0.5, 5]: prunes 0.5, 1, 2 → a loses 2, b 1
    profile = {"a": torch.tensor([4.0, 3.0, 2.0, 1.0]), "b": torch.tensor([0.5, 5.0])}
    # the estimator ranks a's entries the other way round and b's too
    scores = {"a": torch.tensor([1.0, 2.0, 3.0, 4.0]), "b": torch.tensor([9.0, 1.0])}
    masks = profile_masks(scores, 0.5, profile)
    assert masks["a"].tolist() == [False, False, True, True]  # a's two lowest scores go
    assert masks["b"].tolist() == [True, False]  # b's one lowest score goes, whatever its magnitude
