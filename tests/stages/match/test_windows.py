"""Windowed (sparse) plans and the coarse-to-fine solver against the dense solver restricted to the windows."""

from __future__ import annotations

import math

import pytest
import torch

from stages.match import coarse_to_fine as c2f
from stages.match.costs import add_spatial_gradient, add_symmetry_gradient, spatial_term, symmetry_term
from stages.match.gwot import gwot
from stages.match.sinkhorn import DENSE, sinkhorn_unbalanced
from stages.match.windows import Windows
from tests.stages.match.test_gwot import smooth_features

pytestmark = pytest.mark.filterwarnings("ignore::stages.match.gwot.ConvergenceWarning")
GRID_PAIRS = [((6, 7), (5, 8)), ((5, 5), (9, 4))]
SHARED_GRIDS = ((6, 8), (9, 7))  # a source grid of even sides, for windows shared by 2 x 2 blocks


def random_windows(src_grid, trg_grid, size, batch=2, seed=0) -> Windows:
    """Windows at random places (some far apart, so that neighbours' windows overlap partly or not at all)."""
    generator = torch.Generator().manual_seed(seed)
    n = src_grid[0] * src_grid[1]
    top = torch.randint(0, trg_grid[0] - size[0] + 1, (batch, n), generator=generator)
    left = torch.randint(0, trg_grid[1] - size[1] + 1, (batch, n), generator=generator)
    return Windows.at(top, left, size, src_grid, trg_grid)


def windowed_plan(windows: Windows, seed=1) -> tuple[torch.Tensor, torch.Tensor]:
    """A random plan that is zero outside the windows: its entries ``[B, N, K]`` and its dense form."""
    generator = torch.Generator().manual_seed(seed)
    entries = torch.rand(*windows.index.shape, dtype=torch.float64, generator=generator)
    entries /= entries.sum((1, 2), keepdim=True)
    return entries, windows.dense(entries)


def shared_windows(windows: Windows) -> Windows:
    """The windows with every 2 x 2 block of source patches on its top-left child's window, as coarse-to-fine
    places them (source sides even)."""
    batch, (hs, ws) = windows.top.shape[0], windows.src_grid
    first = [
        corner.view(batch, hs // 2, 2, ws // 2, 2)[:, :, :1, :, :1].expand(batch, hs // 2, 2, ws // 2, 2)
        for corner in (windows.top, windows.left)
    ]
    return Windows.at(*(corner.reshape(batch, -1) for corner in first), windows.size, *SHARED_GRIDS)


@pytest.mark.parametrize("shared", [True, False])
def test_kernel_products_equal_the_dense_ones_with_and_without_block_shared_windows(shared):
    windows = random_windows(*SHARED_GRIDS, (3, 4), batch=2, seed=3)
    windows = shared_windows(windows) if shared else windows
    assert (windows._shared_blocks() is not None) == shared
    kernel, dense = windowed_plan(windows, seed=4)
    generator = torch.Generator().manual_seed(5)
    u, v = (
        torch.rand(2, 48, dtype=torch.float64, generator=generator),
        torch.rand(2, 63, dtype=torch.float64, generator=generator),
    )
    torch.testing.assert_close(windows.times_trg(kernel, v), DENSE.times_trg(dense, v), rtol=1e-12, atol=0)
    torch.testing.assert_close(windows.times_src(kernel, u), DENSE.times_src(dense, u), rtol=1e-12, atol=0)


@pytest.mark.parametrize(("k", "k_trg"), [(3, 3), (5, 3), (1, 5), (7, 3)])
@pytest.mark.parametrize("size", [(3, 3), (3, 4)])
def test_block_shared_windows_give_the_dense_spatial_gradient_restricted_to_them(k, k_trg, size):
    windows = shared_windows(random_windows(*SHARED_GRIDS, size, seed=6))
    assert windows._shared_blocks() is not None
    entries, dense = windowed_plan(windows, seed=7)
    expected = add_spatial_gradient(torch.zeros_like(dense), dense, *SHARED_GRIDS, k, k_trg, 0.7)
    got = windows.add_spatial_gradient(torch.zeros_like(entries), entries, k, k_trg, 0.7)
    torch.testing.assert_close(got, windows.restrict(expected), rtol=1e-12, atol=1e-15)
    spatial = spatial_term(dense, *SHARED_GRIDS, k, k_trg).value
    torch.testing.assert_close(windows.spatial_value(entries, k, k_trg), spatial, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize(("k", "k_trg"), [(3, 3), (5, 3), (3, 5), (1, 5)])
@pytest.mark.parametrize(("src_grid", "trg_grid"), GRID_PAIRS)
@pytest.mark.parametrize("size", [(3, 3), (3, 4)])
def test_windowed_gradients_equal_dense_gradients_restricted_to_the_windows(src_grid, trg_grid, k, k_trg, size):
    windows = random_windows(src_grid, trg_grid, size)
    entries, dense = windowed_plan(windows)
    expected = add_spatial_gradient(torch.zeros_like(dense), dense, src_grid, trg_grid, k, k_trg, 0.7)
    got = windows.add_spatial_gradient(torch.zeros_like(entries), entries, k, k_trg, 0.7)
    torch.testing.assert_close(got, windows.restrict(expected), rtol=1e-12, atol=1e-15)
    expected = add_symmetry_gradient(torch.zeros_like(dense), dense, src_grid, trg_grid, 0.3)
    got = windows.add_symmetry_gradient(torch.zeros_like(entries), entries, 0.3)
    torch.testing.assert_close(got, windows.restrict(expected), rtol=1e-12, atol=1e-15)
    spatial = spatial_term(dense, src_grid, trg_grid, k, k_trg).value
    torch.testing.assert_close(windows.spatial_value(entries, k, k_trg), spatial, rtol=1e-12, atol=1e-15)
    symmetry = symmetry_term(dense, src_grid, trg_grid).value
    torch.testing.assert_close(windows.symmetry_value(entries), symmetry, rtol=1e-12, atol=1e-15)


def test_windowed_sinkhorn_equals_dense_sinkhorn_with_the_outside_forbidden():
    src_grid, trg_grid = (4, 5), (5, 6)
    windows = random_windows(src_grid, trg_grid, (3, 3), seed=3)
    generator = torch.Generator().manual_seed(4)
    cost = 2 * torch.rand(2, 20, 30, dtype=torch.float64, generator=generator)
    src_mass, trg_mass = (
        torch.full((2, 20), 1 / 20, dtype=torch.float64),
        torch.full((2, 30), 1 / 30, dtype=torch.float64),
    )
    trg_mass[:, 7] = 0  # an invalid target patch
    trg_mass /= trg_mass.sum(1, keepdim=True)
    forbidden = windows.dense(torch.ones_like(windows.index, dtype=torch.float64)) == 0
    options = dict(eps=0.05, rho=1.0, max_iter=20_000, tol=1e-13)
    dense = sinkhorn_unbalanced(cost.masked_fill(forbidden, math.inf), src_mass, trg_mass, **options)
    sparse = sinkhorn_unbalanced(windows.restrict(cost), src_mass, trg_mass, layout=windows, **options)
    torch.testing.assert_close(windows.dense(sparse.plan), dense.plan, rtol=1e-9, atol=1e-15)
    torch.testing.assert_close(sparse.trg_potential, dense.trg_potential, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("options", [{}, {"k": 3, "k_trg": 5, "rho": math.inf}, {"w_y": 0.0, "w_s": 0.3}])
def test_windows_covering_the_whole_grid_give_the_dense_solve(options):
    src_feats, trg_feats = smooth_features(2, 6, 7, seed=1), smooth_features(2, 5, 8, seed=2)
    trg_valid = torch.ones(2, 5, 8, dtype=torch.bool)
    trg_valid[1, :, 0] = False
    start = gwot(src_feats, trg_feats, None, trg_valid, outer_iters=1, coarse_to_fine=False).plan.dense()
    settings = dict(outer_iters=4, inner_iters=200, init=start, **options)
    dense = gwot(src_feats, trg_feats, None, trg_valid, coarse_to_fine=False, **settings)
    windowed = gwot(src_feats, trg_feats, None, trg_valid, coarse_to_fine=True, window_radius=10, **settings)
    torch.testing.assert_close(windowed.plan.dense(), dense.plan.dense(), rtol=1e-9, atol=1e-14)
    for name in ("objective", "marginal_error"):
        torch.testing.assert_close(getattr(windowed, name), getattr(dense, name), rtol=1e-9, atol=1e-14)
    assert torch.equal(windowed.inner_iters, dense.inner_iters)


def test_coarse_to_fine_pairs_are_batch_independent_and_respect_invalid_patches_and_grid_sizes():
    src_feats, trg_feats = smooth_features(3, 17, 20, seed=5), smooth_features(3, 18, 16, seed=6)
    src_valid = torch.ones(3, 17, 20, dtype=torch.bool)
    trg_valid = torch.ones(3, 18, 16, dtype=torch.bool)
    src_valid[0, :3], trg_valid[1, :, -5:], trg_valid[2, 7] = False, False, False
    assert c2f.worth_refining((17, 20), (18, 16), radius=2) and not c2f.worth_refining((17, 20), (18, 16), radius=3)
    settings = dict(outer_iters=4, inner_iters=40, window_radius=2, k_trg=3)
    batch = gwot(src_feats, trg_feats, src_valid, trg_valid, **settings)
    for b in range(3):
        one = slice(b, b + 1)
        alone = gwot(src_feats[one], trg_feats[one], src_valid[one], trg_valid[one], **settings)
        torch.testing.assert_close(batch.plan.dense()[one], alone.plan.dense(), rtol=1e-10, atol=1e-15)
        assert torch.equal(batch.inner_iters[one], alone.inner_iters)
    assert torch.all(batch.plan.dense()[~src_valid.flatten(1)] == 0)
    assert torch.all(batch.plan.dense().transpose(1, 2)[~trg_valid.flatten(1)] == 0)
    # Each row carries mass only inside one 5 x 5 window, and the plans keep most of their mass.
    assert int((batch.plan.dense() > 0).sum(2).max()) <= 25
    assert batch.plan.dense().sum((1, 2)).min() > 0.5


def test_pooling_averages_valid_children_only():
    feats = torch.arange(2 * 3 * 5 * 1, dtype=torch.float64).view(2, 3, 5, 1)
    valid = torch.ones(2, 3, 5, dtype=torch.bool)
    valid[0, 0, 0] = False
    pooled, pooled_valid = c2f.pool_grid(feats, valid)
    assert pooled.shape == (2, 2, 3, 1) and pooled_valid.all()
    assert pooled[0, 0, 0, 0] == (1 + 5 + 6) / 3 and pooled[1, 1, 2, 0] == feats[1, 2, 4, 0]
    assert [c2f.coarse_size(k) for k in (1, 3, 5, 7, 9)] == [1, 3, 3, 5, 5]


@pytest.mark.parametrize(("coarse_src", "coarse_trg"), [((4, 5), (5, 6)), ((3, 3), (6, 4))])
def test_windows_and_starting_plan_from_a_windowed_coarse_plan_equal_those_from_its_dense_form(coarse_src, coarse_trg):
    coarse = random_windows(coarse_src, coarse_trg, (3, 3), seed=5)
    entries, dense = windowed_plan(coarse, seed=6)
    src_grid, trg_grid = (2 * coarse_src[0], 2 * coarse_src[1] - 1), (2 * coarse_trg[0] - 1, 2 * coarse_trg[1])
    from_windows = c2f.place_windows(entries, coarse, src_grid, trg_grid, radius=1)
    from_dense = c2f.place_windows(dense, None, src_grid, trg_grid, radius=1)
    torch.testing.assert_close(from_windows.index, from_dense.index)
    src_valid = torch.ones(2, *src_grid, dtype=torch.bool)
    trg_valid = torch.ones(2, *trg_grid, dtype=torch.bool)
    trg_valid[0, 0] = False
    torch.testing.assert_close(
        c2f.upsample_plan(entries, coarse, from_dense, src_valid, trg_valid),
        c2f.upsample_plan(dense, None, from_dense, src_valid, trg_valid),
        rtol=0,
        atol=0,
    )
