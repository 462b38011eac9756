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
from stages.match.gwot import ConvergenceWarning, gwot
from stages.match.sinkhorn import sinkhorn_unbalanced

TIGHT = dict(inner_iters=100_000, inner_tol=1e-15, outer_tol=0.0)
# Tests that run a fixed number of outer steps (outer_tol = 0) expect the solver's non-convergence warning.
pytestmark = pytest.mark.filterwarnings("ignore::stages.match.gwot.ConvergenceWarning")


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


@pytest.mark.parametrize(
    ("k", "k_trg", "w_s", "custom_init"), [(3, None, 0.05, False), (5, None, 0.2, True), (3, 5, 0.1, False)]
)
def test_balanced_spatial_solve_equals_pot_entropic_fgw(k, k_trg, w_s, custom_init):
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
        k_trg=k_trg,
        w_y=0.0,
        rho=math.inf,
        outer_iters=steps,
        init=init,
        **TIGHT,
    )
    k_trg = k if k_trg is None else k_trg
    s = w_s * math.sqrt(n * m) / (k * k_trg)  # the documented mapping to POT's (alpha, epsilon)
    expected = ot.gromov.entropic_fused_gromov_wasserstein(
        feature_cost(src_feats[0], trg_feats[0]),
        neighbourhood_matrix(*src_grid, k),
        neighbourhood_matrix(*trg_grid, k_trg),
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
    assert result.outer_steps.tolist() == [steps] and not result.converged.item()
    np.testing.assert_allclose(result.plan.dense()[0].numpy(), expected, rtol=1e-8, atol=1e-14)


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
    np.testing.assert_allclose(result.plan.dense()[0].numpy(), expected, rtol=1e-9, atol=1e-14)
    # The cost never changes, so the second step changes nothing and the pair has converged.
    assert result.outer_steps.tolist() == [2] and result.converged.item()


@pytest.mark.slow
@pytest.mark.parametrize("settings", [{}, {"w_y": 0.5}, {"rho": math.inf, "w_s": 0.3}])
def test_objective_does_not_increase_over_outer_steps(settings):
    src_feats, trg_feats = smooth_features(2, 6, 7, seed=5), smooth_features(2, 7, 6, seed=6)
    # A run of s steps is the first s steps of a longer one (the same iterates), so E after each step is
    # the final objective of a run with outer_iters = s.
    objective = torch.stack(
        [
            gwot(
                src_feats, trg_feats, outer_iters=s, inner_iters=300, inner_tol=1e-8, outer_tol=0.0, **settings
            ).objective
            for s in range(1, 7)
        ],
        dim=1,
    )
    assert (objective.diff(dim=1) <= 1e-9).all(), objective


def test_marginal_error_shrinks_as_rho_grows():
    src_feats, trg_feats = smooth_features(1, 4, 4, seed=7), smooth_features(1, 4, 4, seed=8)
    errors = [
        gwot(src_feats, trg_feats, rho=rho, outer_iters=5, inner_iters=1000).marginal_error[0].item()
        for rho in (0.1, 1.0, 10.0, 100.0)
    ]
    assert errors == sorted(errors, reverse=True) and errors[-1] < 0.1 * errors[0], errors


BATCH_OPTIONS = [
    {},
    {"w_y": 0.5, "k": 3, "k_trg": 5},
    {"rho": math.inf, "w_s": 0.3, "outer_tol": 1e-6},
    {"w_s": 0.0, "w_y": 0.0, "inner_iters": 400, "eps": 0.05},
]


@pytest.mark.parametrize("options", BATCH_OPTIONS)
def test_a_pair_solved_alone_equals_it_solved_in_any_batch(options):
    # Pairs of different difficulty, so that they stop at different outer and inner iterations.
    src_feats, trg_feats = smooth_features(4, 5, 6, seed=9), smooth_features(4, 4, 6, seed=10)
    trg_feats[1] = trg_feats[1] + 2.0 * smooth_features(1, 4, 6, seed=20)[0]
    trg_feats[3] = src_feats[3, :4] + 0.01 * smooth_features(1, 4, 6, seed=21)[0]
    src_valid = torch.ones(4, 5, 6, dtype=torch.bool)
    trg_valid = torch.ones(4, 4, 6, dtype=torch.bool)
    src_valid[0, 0, :], src_valid[2, :, 5], trg_valid[1, 3, :] = False, False, False
    settings = {"outer_iters": 8, "inner_iters": 60, **options}
    batch = gwot(src_feats, trg_feats, src_valid, trg_valid, **settings)
    assert len(set(zip(batch.outer_steps.tolist(), batch.inner_iters.tolist(), strict=True))) > 1, "pairs stop alike"
    reordered = [2, 0, 3]
    subset = gwot(src_feats[reordered], trg_feats[reordered], src_valid[reordered], trg_valid[reordered], **settings)
    for b in range(4):
        single = gwot(
            src_feats[b : b + 1], trg_feats[b : b + 1], src_valid[b : b + 1], trg_valid[b : b + 1], **settings
        )
        for result, row in [(batch, b)] + ([(subset, reordered.index(b))] if b in reordered else []):
            torch.testing.assert_close(result.plan.dense()[row], single.plan.dense()[0], rtol=1e-10, atol=1e-15)
            for name in ("objective", "marginal_error"):
                torch.testing.assert_close(getattr(result, name)[row], getattr(single, name)[0], rtol=1e-10, atol=1e-15)
            for name in ("outer_steps", "inner_iters", "converged"):
                assert getattr(result, name)[row] == getattr(single, name)[0], name
    assert torch.all(batch.plan.dense()[~src_valid.flatten(1)] == 0)
    assert torch.all(batch.plan.dense().transpose(1, 2)[~trg_valid.flatten(1)] == 0)
    assert batch.plan.dense().sum((1, 2)).min() > 0.5


@pytest.mark.filterwarnings("error::stages.match.gwot.ConvergenceWarning")
def test_unconverged_pairs_are_reported_and_counted_in_one_warning():
    src_feats, trg_feats = smooth_features(3, 5, 5, seed=15), smooth_features(3, 5, 5, seed=16)
    converged = gwot(src_feats, trg_feats, outer_iters=200, inner_iters=500, inner_tol=1e-9, outer_tol=1e-4)
    assert converged.converged.all() and (converged.outer_steps < 200).all()
    assert converged.outer_steps.dtype == converged.inner_iters.dtype == torch.int64
    assert (converged.inner_iters >= converged.outer_steps).all()
    with pytest.warns(ConvergenceWarning, match=r"3 of 3 pair\(s\) did not converge in outer_iters=2 .*outer_tol"):
        cut_short = gwot(src_feats, trg_feats, outer_iters=2, outer_tol=1e-12)
    assert not cut_short.converged.any() and cut_short.outer_steps.tolist() == [2, 2, 2]
    # warn=False (the match stage, which records the flags): the same result, and no warning (an error here).
    quiet = gwot(src_feats, trg_feats, outer_iters=2, outer_tol=1e-12, warn=False)
    torch.testing.assert_close(quiet.plan.dense(), cut_short.plan.dense(), rtol=0, atol=0)


@pytest.mark.slow
def test_float32_matches_float64_and_small_eps_stays_finite():
    src_feats, trg_feats = smooth_features(2, 8, 8, seed=11), smooth_features(2, 7, 9, seed=12)
    double = gwot(src_feats, trg_feats, inner_iters=2000, inner_tol=1e-9, outer_tol=0.0)
    single = gwot(src_feats.float(), trg_feats.float(), inner_iters=2000, inner_tol=1e-6, outer_tol=0.0)
    assert single.plan.dense().dtype == torch.float32 and single.objective.dtype == torch.float32
    assert (single.plan.dense().double() - double.plan.dense()).abs().sum((1, 2)).max() < 1e-3
    sharp = gwot(src_feats.float(), trg_feats.float(), eps=1e-3, inner_iters=500)
    assert torch.isfinite(sharp.plan.dense()).all() and torch.isfinite(sharp.objective).all()
    assert sharp.plan.dense().sum((1, 2)).min() > 0.5


def test_half_precision_features_give_a_float32_plan_and_inputs_are_not_modified():
    src_feats, trg_feats = smooth_features(1, 4, 4, seed=13).half(), smooth_features(1, 4, 4, seed=14).half()
    src_copy = src_feats.clone()
    result = gwot(src_feats, trg_feats, outer_iters=2)
    assert result.plan.dense().dtype == torch.float32 and result.plan.dense().shape == (1, 16, 16)
    assert result.objective.shape == result.marginal_error.shape == result.outer_steps.shape == (1,)
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
