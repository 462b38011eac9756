"""The GWOT solver: against POT's entropic FGW and unbalanced Sinkhorn, its diagnostics, batching, dtypes."""

from __future__ import annotations

import itertools
import math
import warnings

import numpy as np
import ot
import pytest
import torch

from pipeline.errors import PipelineError
from stages.match.gwot import gwot
from stages.match.sinkhorn import sinkhorn_unbalanced

TIGHT = dict(inner_iters=100_000, inner_tol=1e-15, outer_tol=0.0)


def neighbourhood_matrix(height: int, width: int, k: int) -> np.ndarray:
    """The dense 0/1 Chebyshev k x k neighbourhood matrix of a row-major grid."""
    cells = list(itertools.product(range(height), range(width)))
    return np.array([[float(abs(r - s) <= k // 2 and abs(c - d) <= k // 2) for s, d in cells] for r, c in cells])


def smooth_features(batch, height, width, channels=8, seed=0, dtype=torch.float64):
    """Random features that vary smoothly over the grid (neighbours look alike, as real patch features do)."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(batch, channels, height + 2, width + 2, generator=generator, dtype=dtype)
    smooth = torch.nn.functional.avg_pool2d(noise, 3, stride=1)
    return smooth.permute(0, 2, 3, 1).contiguous()


def feature_cost(src_feats, trg_feats) -> np.ndarray:
    src = torch.nn.functional.normalize(src_feats.flatten(0, 1), dim=-1)
    trg = torch.nn.functional.normalize(trg_feats.flatten(0, 1), dim=-1)
    return (1 - src @ trg.T).numpy()


@pytest.mark.parametrize(("k", "w_s", "custom_init"), [(3, 0.05, False), (5, 0.2, True)])
def test_balanced_spatial_solve_equals_pot_entropic_fgw(k, w_s, custom_init):
    src_grid, trg_grid, eps, steps = (4, 5), (3, 6), 0.05, 6
    src_feats, trg_feats = smooth_features(1, *src_grid, seed=1), smooth_features(1, *trg_grid, seed=2)
    n, m = 20, 18
    p, q = np.full(n, 1 / n), np.full(m, 1 / m)
    init = None
    if custom_init:  # a plan with the right marginals that is not the product a b^T
        other = sinkhorn_unbalanced(
            torch.rand(1, n, m, dtype=torch.float64),
            torch.from_numpy(p)[None],
            torch.from_numpy(q)[None],
            eps=0.5,
            max_iter=100_000,
            tol=1e-15,
        )
        init = other.plan
    result = gwot(
        src_feats,
        trg_feats,
        eps=eps,
        w_s=w_s,
        k=k,
        w_y=0.0,
        rho=math.inf,
        outer_iters=steps,
        init=init,
        **TIGHT,
    )
    s = w_s * math.sqrt(n * m) / k**2  # the documented mapping to POT's (alpha, epsilon)
    expected = ot.gromov.entropic_fused_gromov_wasserstein(
        feature_cost(src_feats[0], trg_feats[0]),
        neighbourhood_matrix(*src_grid, k),
        neighbourhood_matrix(*trg_grid, k),
        p,
        q,
        loss_fun="square_loss",
        epsilon=eps / (1 + s),
        alpha=s / (1 + s),
        G0=None if init is None else init[0].numpy(),
        max_iter=steps,
        tol=0.0,
        solver="PGD",
        numItermax=100_000,
        stopThr=1e-15,
    )
    assert len(result.inner_iters) == steps
    np.testing.assert_allclose(result.plan[0].numpy(), expected, rtol=1e-8, atol=1e-14)


def test_without_quadratic_terms_one_step_is_unbalanced_entropic_ot():
    src_feats, trg_feats = smooth_features(1, 4, 4, seed=3), smooth_features(1, 3, 5, seed=4)
    result = gwot(
        src_feats,
        trg_feats,
        eps=0.05,
        w_s=0.0,
        w_y=0.0,
        rho=0.5,
        outer_iters=5,
        **TIGHT | {"outer_tol": 1e-12},
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # POT warns that reg_type="entropy" replaces its reference measure
        expected = ot.unbalanced.sinkhorn_unbalanced(
            np.full(16, 1 / 16),
            np.full(15, 1 / 15),
            feature_cost(src_feats[0], trg_feats[0]),
            0.05,
            0.5,
            reg_type="entropy",
            method="sinkhorn",
            numItermax=100_000,
            stopThr=1e-15,
        )
    np.testing.assert_allclose(result.plan[0].numpy(), expected, rtol=1e-9, atol=1e-14)
    assert len(result.inner_iters) == 2  # the cost never changes, so the second step changes nothing


@pytest.mark.parametrize("settings", [{}, {"w_y": 0.5}, {"rho": math.inf, "w_s": 0.3}])
def test_objective_does_not_increase_over_outer_steps(settings):
    src_feats, trg_feats = smooth_features(2, 6, 7, seed=5), smooth_features(2, 7, 6, seed=6)
    result = gwot(src_feats, trg_feats, outer_iters=12, inner_iters=300, inner_tol=1e-8, **settings)
    steps = result.objective.diff(dim=1)
    assert (steps <= 1e-9).all(), result.objective


def test_marginal_error_shrinks_as_rho_grows():
    src_feats, trg_feats = smooth_features(1, 4, 4, seed=7), smooth_features(1, 4, 4, seed=8)
    errors = [
        gwot(src_feats, trg_feats, rho=rho, outer_iters=5, inner_iters=1000).marginal_error[0, -1].item()
        for rho in (0.1, 1.0, 10.0, 100.0)
    ]
    assert errors == sorted(errors, reverse=True) and errors[-1] < 0.1 * errors[0], errors


def test_batch_equals_single_solves_and_invalid_patches_get_no_mass():
    src_feats, trg_feats = smooth_features(3, 5, 6, seed=9), smooth_features(3, 4, 6, seed=10)
    src_valid = torch.ones(3, 5, 6, dtype=torch.bool)
    trg_valid = torch.ones(3, 4, 6, dtype=torch.bool)
    src_valid[0, 0, :], src_valid[2, :, 5], trg_valid[1, 3, :] = False, False, False
    # No early stops, so that every pair runs the same iterations alone and in the batch.
    settings = dict(outer_iters=5, inner_iters=100, inner_tol=0.0, outer_tol=0.0)
    batch = gwot(src_feats, trg_feats, src_valid, trg_valid, **settings)
    for b in range(3):
        single = gwot(
            src_feats[b : b + 1], trg_feats[b : b + 1], src_valid[b : b + 1], trg_valid[b : b + 1], **settings
        )
        torch.testing.assert_close(batch.plan[b : b + 1], single.plan, rtol=1e-10, atol=1e-15)
        torch.testing.assert_close(batch.objective[b : b + 1], single.objective, rtol=1e-10, atol=1e-15)
    assert torch.all(batch.plan[~src_valid.flatten(1)] == 0)
    assert torch.all(batch.plan.transpose(1, 2)[~trg_valid.flatten(1)] == 0)
    assert batch.plan.sum((1, 2)).min() > 0.5


def test_float32_matches_float64_and_small_eps_stays_finite():
    src_feats, trg_feats = smooth_features(2, 8, 8, seed=11), smooth_features(2, 7, 9, seed=12)
    double = gwot(src_feats, trg_feats, inner_iters=2000, inner_tol=1e-9, outer_tol=0.0)
    single = gwot(src_feats.float(), trg_feats.float(), inner_iters=2000, inner_tol=1e-6, outer_tol=0.0)
    assert single.plan.dtype == torch.float32 and single.objective.dtype == torch.float32
    assert (single.plan.double() - double.plan).abs().sum((1, 2)).max() < 1e-3
    sharp = gwot(src_feats.float(), trg_feats.float(), eps=1e-3, inner_iters=500)
    assert torch.isfinite(sharp.plan).all() and torch.isfinite(sharp.objective).all()
    assert sharp.plan.sum((1, 2)).min() > 0.5


def test_half_precision_features_give_a_float32_plan_and_inputs_are_not_modified():
    src_feats, trg_feats = smooth_features(1, 4, 4, seed=13).half(), smooth_features(1, 4, 4, seed=14).half()
    src_copy = src_feats.clone()
    result = gwot(src_feats, trg_feats, outer_iters=2)
    assert result.plan.dtype == torch.float32 and result.plan.shape == (1, 16, 16)
    assert result.objective.shape == result.marginal_error.shape == (1, len(result.inner_iters))
    assert torch.equal(src_feats, src_copy)


def test_bad_inputs_are_rejected_with_what_was_expected():
    feats = smooth_features(2, 4, 4)
    with pytest.raises(PipelineError, match=r"must agree on the batch size"):
        gwot(feats, feats[:1])
    with pytest.raises(PipelineError, match=r"k must be a positive odd"):
        gwot(feats, feats, k=4)
    with pytest.raises(PipelineError, match=r"eps must be > 0"):
        gwot(feats, feats, eps=0.0)
    empty = torch.ones(2, 4, 4, dtype=torch.bool)
    empty[1] = False
    with pytest.raises(PipelineError, match=r"src grids of pairs \[1\] have no valid patch"):
        gwot(feats, feats, empty)
    with pytest.raises(PipelineError, match=r"init plan must have shape \(2, 16, 16\)"):
        gwot(feats, feats, init=torch.ones(2, 16, 15))
