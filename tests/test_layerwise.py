"""Layer-wise maths on tiny tensors against hand-computed values: SparseGPT against the closed-form
OBS update, conv unfolding against an explicit im2col, Wanda by hand, N:M masks and their checker."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from onnxprune.activations import InputStatistics
from onnxprune.layerwise_maths import conv_patches, damped, gram, sparsegpt, wanda_scores
from onnxprune.masks import parse_pattern, pattern_masks, pattern_violations


@pytest.fixture(autouse=True)
def float64():
    """These hand computations run in float64 (restored after each test: other files use float32)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def spd(size: int, seed: int) -> torch.Tensor:
    x = torch.randn(3 * size, size, generator=torch.Generator().manual_seed(seed))
    return x.T @ x / len(x) + 0.1 * torch.eye(size)


def test_sparsegpt_pruning_one_weight_equals_the_closed_form_obs_update():
    h = spd(4, 0)
    w = torch.tensor([[0.01, 1.0, -2.0, 1.5]])
    new, keep = sparsegpt(w, h, prune=1)
    inverse = torch.linalg.inv(h)
    expected = w - w[0, 0] * inverse[:, 0] / inverse[0, 0]  # δw = −w_q H⁻¹e_q / [H⁻¹]_qq
    assert keep.tolist() == [[False, True, True, True]]
    assert new[0, 0] == 0
    torch.testing.assert_close(new, expected, rtol=0, atol=1e-12)


def test_sparsegpt_pruning_a_later_column_moves_only_the_columns_not_yet_visited():
    """Column 2 pruned (forced): columns 0 and 1 are fixed already, so the update is the OBS
    update of the sub-problem on columns 2.. with the inverse of H restricted to them."""
    h = spd(5, 1)
    w = torch.tensor([[0.5, -1.0, 0.3, 2.0, -0.7]])
    forced = torch.tensor([[False, False, True, False, False]])
    new, keep = sparsegpt(w, h, prune=1, forced=forced)
    sub = torch.linalg.inv(h[2:, 2:])
    expected = w.clone()
    expected[0, 2:] = w[0, 2:] - w[0, 2] * sub[:, 0] / sub[0, 0]
    assert keep.tolist() == (~forced).tolist()
    torch.testing.assert_close(new, expected, rtol=0, atol=1e-12)


def test_sparsegpt_lazy_block_updates_equal_one_block():
    """With the mask fixed (all pruned entries forced), column blocks of 3 give the same weights
    as one block of all 10 columns: the batched updates are exact, not an approximation."""
    generator = torch.Generator().manual_seed(2)
    w = torch.randn(6, 10, generator=generator)
    forced = torch.rand(6, 10, generator=generator) < 0.4
    h = spd(10, 3)
    one, keep_one = sparsegpt(w, h, int(forced.sum()), forced, block=10)
    blocked, keep_blocked = sparsegpt(w, h, int(forced.sum()), forced, block=3)
    assert torch.equal(keep_one, ~forced) and torch.equal(keep_blocked, ~forced)
    torch.testing.assert_close(blocked, one, rtol=0, atol=1e-12)


@pytest.mark.parametrize("block", [4, 7, 16])
def test_sparsegpt_prunes_exactly_the_count_including_forced_entries(block):
    generator = torch.Generator().manual_seed(4)
    w = torch.randn(8, 16, generator=generator)
    forced = torch.zeros(8, 16, dtype=torch.bool)
    forced[0, :5] = True
    w[forced] = 0
    new, keep = sparsegpt(w, spd(16, 5), prune=77, forced=forced, block=block)
    assert int((~keep).sum()) == 77 and bool((~keep)[forced].all())
    assert bool((new[~keep] == 0).all()) and bool((new[keep] != 0).all())


def test_sparsegpt_reduces_the_layer_output_error_against_the_same_mask_without_update():
    generator = torch.Generator().manual_seed(6)
    x = torch.randn(200, 12, generator=generator) @ torch.randn(12, 12, generator=generator)  # correlated
    w = torch.randn(5, 12, generator=generator)
    h, _ = damped(gram(x) / len(x), 1e-6)
    new, keep = sparsegpt(w, h, prune=30)
    error_updated = ((x @ (new - w).T) ** 2).sum()
    error_masked = ((x @ (torch.where(keep, w, 0) - w).T) ** 2).sum()
    # the best any update could do with this mask: per row, least squares on the kept inputs
    best = 0.0
    for r in range(len(w)):
        kept = x[:, keep[r]]
        fit = kept @ torch.linalg.lstsq(kept, x @ w[r]).solution if keep[r].any() else 0.0
        best += float((fit - x @ w[r]).square().sum())
    assert 0 < best <= error_updated < 0.8 * error_masked
    print(f"output error: least squares {best:.1f}, sparsegpt {error_updated:.1f}, masked {error_masked:.1f}")


def test_sparsegpt_with_an_input_that_never_fires_stays_finite_and_prunes_it_first():
    x = torch.randn(50, 4, generator=torch.Generator().manual_seed(7))
    x[:, 1] = 0  # a dead input
    h, lam = damped(gram(x) / len(x), 0.01)
    assert lam > 0
    new, keep = sparsegpt(torch.tensor([[1.0, 5.0, 1.0, 1.0]]), h, prune=1)
    assert keep.tolist() == [[True, False, True, True]] and bool(torch.isfinite(new).all())


def im2col(x: torch.Tensor, kernel, stride, padding, dilation, groups) -> torch.Tensor:
    """Patches by explicit loops: [groups, n·positions, channels/groups · kh · kw]."""
    x = F.pad(x, (padding[1], padding[1], padding[0], padding[0]))
    n, channels, height, width = x.shape
    out_h = (height - dilation[0] * (kernel[0] - 1) - 1) // stride[0] + 1
    out_w = (width - dilation[1] * (kernel[1] - 1) - 1) // stride[1] + 1
    per = channels // groups
    rows = [[] for _ in range(groups)]
    for b, i, j in itertools.product(range(n), range(out_h), range(out_w)):
        for g in range(groups):
            rows[g].append(
                [
                    float(x[b, g * per + c, i * stride[0] + a * dilation[0], j * stride[1] + e * dilation[1]])
                    for c in range(per)
                    for a in range(kernel[0])
                    for e in range(kernel[1])
                ]
            )
    return torch.tensor(rows)


@pytest.mark.parametrize("groups", [1, 3])
def test_conv_unfolding_gives_the_same_hessian_as_an_explicit_im2col(groups):
    x = torch.randn(2, 3, 5, 6, generator=torch.Generator().manual_seed(8))
    settings = dict(kernel=(3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2), groups=groups)
    patches = conv_patches(x, **settings)
    explicit = im2col(x, **settings)
    torch.testing.assert_close(patches, explicit, rtol=0, atol=1e-12)
    for g in range(groups):
        torch.testing.assert_close(gram(patches[g]), explicit[g].T @ explicit[g], rtol=1e-12, atol=1e-12)
    # and the patches are what the weight multiplies, in its canonical [out, in/g · k] order
    weight = torch.randn(6, 3 // groups, 3, 2, generator=torch.Generator().manual_seed(9))
    conv = F.conv2d(x, weight, stride=(2, 1), padding=(1, 0), dilation=(1, 2), groups=groups)
    rows = weight.reshape(groups, 6 // groups, -1)
    by_patches = torch.cat([patches[g] @ rows[g].T for g in range(groups)], dim=1)  # [n·L, out]
    torch.testing.assert_close(by_patches, conv.permute(0, 2, 3, 1).reshape(-1, 6), rtol=1e-10, atol=1e-10)


def test_conv1d_patches_are_the_2d_patches_of_height_one():
    x = torch.randn(2, 4, 9, generator=torch.Generator().manual_seed(10))
    weight = torch.randn(5, 4, 3, generator=torch.Generator().manual_seed(11))
    patches = conv_patches(x, (3,), (2,), (1,), (1,), 1)
    out = F.conv1d(x, weight, stride=2, padding=1)
    torch.testing.assert_close(patches[0] @ weight.reshape(5, -1).T, out.permute(0, 2, 1).reshape(-1, 5))


def test_wanda_scores_by_hand():
    w = torch.tensor([[1.0, -2.0], [3.0, 0.5]])
    x = torch.tensor([[1.0, 0.0], [1.0, 2.0]])
    stats = InputStatistics(2, full=False)
    stats.update(x[:1].unsqueeze(0))
    stats.update(x[1:].unsqueeze(0))
    expected = torch.tensor([[math.sqrt(2), 4.0], [3 * math.sqrt(2), 1.0]], dtype=torch.float32)
    torch.testing.assert_close(wanda_scores(w, stats.column_norms()[0]), expected)


def test_input_statistics_over_several_batches_equal_the_mean_over_all():
    x = torch.randn(2, 30, 6, generator=torch.Generator().manual_seed(12))
    stats = InputStatistics(6)
    for part in (x[:, :7], x[:, 7:19], x[:, 19:]):
        stats.update(part)
    expected = torch.stack([x[g].T @ x[g] / 30 for g in range(2)])
    torch.testing.assert_close(stats.hessian(), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(stats.column_norms(), x.norm(dim=1), rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------ N:M


@pytest.mark.parametrize(("n", "m", "kernel", "cols"), [(2, 4, 1, 16), (2, 4, 1, 10), (1, 4, 9, 8 * 9), (4, 8, 4, 12)])
def test_pattern_masks_keep_at_most_n_in_every_group_and_prune_the_lowest(n, m, kernel, cols):
    rows = 5
    scores = torch.rand(rows * cols, generator=torch.Generator().manual_seed(13))
    keep = pattern_masks(scores, rows, n, m, kernel)
    matrix = torch.where(keep, scores, 0).reshape(rows, cols)
    assert pattern_violations(matrix, n, m, kernel) == 0
    # each group (inputs at one kernel position) keeps its n highest scores
    by_position = scores.reshape(rows, cols // kernel, kernel)
    kept = keep.reshape(rows, cols // kernel, kernel)
    for r, k, start in itertools.product(range(rows), range(kernel), range(0, cols // kernel, m)):
        group = by_position[r, start : start + m, k]
        expected = group >= group.sort(descending=True).values[min(n, len(group)) - 1]
        assert torch.equal(kept[r, start : start + m, k], expected)


def test_pattern_checker_finds_a_group_with_too_many_non_zeros():
    matrix = torch.tensor([[1.0, 0.0, 2.0, 0.0, 1.0, 1.0, 1.0, 0.0]])
    assert pattern_violations(matrix, 2, 4) == 1
    assert pattern_violations(matrix, 3, 4) == 0
    # with a kernel of 2 the groups are columns (0, 2, 4, 6) and (1, 3, 5, 7)
    assert pattern_violations(matrix, 2, 4, kernel=2) == 1  # (1, 2, 1, 1): 4 non-zeros
    assert pattern_violations(matrix, 3, 4, kernel=2) == 1


def test_pattern_masks_prune_already_pruned_entries_first():
    scores = torch.tensor([5.0, -1.0, 3.0, 4.0])
    assert pattern_masks(scores, 1, 2, 4).tolist() == [True, False, False, True]


def test_sparsegpt_with_a_pattern_honours_it_and_prunes_forced_entries():
    generator = torch.Generator().manual_seed(14)
    w = torch.randn(6, 16, generator=generator)
    forced = torch.zeros(6, 16, dtype=torch.bool)
    forced[1, 3] = True
    w[forced] = 0
    new, keep = sparsegpt(w, spd(16, 15), prune=0, forced=forced, block=6, pattern=(2, 4))
    assert pattern_violations(new, 2, 4) == 0 and bool((~keep)[forced].all())
    assert int((~keep).sum()) == 6 * 16 // 2


@pytest.mark.parametrize("text", ["2", "4:2", "0:4", "a:b", "2:2"])
def test_bad_patterns_are_refused(text):
    with pytest.raises(ValueError, match="N:M"):
        parse_pattern(text)
