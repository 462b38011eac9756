"""The unbalanced Sinkhorn against POT (float64), and its float32 stability at small eps."""

from __future__ import annotations

import math
import warnings

import numpy as np
import ot
import pytest
import torch

from pipeline.errors import PipelineError
from stages.match.sinkhorn import sinkhorn_unbalanced


def problem(n=12, m=15, batch=1, seed=0, dtype=torch.float64, empty=True):
    """A random cost in [0, 2] and random marginals of mass 1, with one empty source and target patch."""
    generator = torch.Generator().manual_seed(seed)
    cost = 2 * torch.rand(batch, n, m, generator=generator, dtype=dtype)
    src_mass = torch.rand(batch, n, generator=generator, dtype=dtype)
    trg_mass = torch.rand(batch, m, generator=generator, dtype=dtype)
    if empty:
        src_mass[:, 3], trg_mass[:, 5] = 0, 0
    return cost, src_mass / src_mass.sum(1, keepdim=True), trg_mass / trg_mass.sum(1, keepdim=True)


def pot_unbalanced(cost, src_mass, trg_mass, eps, rho):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # POT warns that reg_type="entropy" replaces its reference measure
        return ot.unbalanced.sinkhorn_unbalanced(
            src_mass[0].numpy(),
            trg_mass[0].numpy(),
            cost[0].numpy(),
            eps,
            rho,
            reg_type="entropy",
            method="sinkhorn",
            numItermax=200_000,
            stopThr=1e-15,
        )


@pytest.mark.parametrize(("eps", "rho"), [(0.1, 1.0), (0.05, 0.1), (0.02, 10.0)])
def test_unbalanced_solve_equals_pot(eps, rho):
    cost, src_mass, trg_mass = problem()
    result = sinkhorn_unbalanced(cost, src_mass, trg_mass, eps=eps, rho=rho, max_iter=200_000, tol=1e-14)
    expected = pot_unbalanced(cost, src_mass, trg_mass, eps, rho)
    np.testing.assert_allclose(result.plan[0].numpy(), expected, rtol=1e-9, atol=1e-14)


@pytest.mark.parametrize("eps", [0.1, 0.02])
def test_infinite_rho_is_balanced_sinkhorn(eps):
    cost, src_mass, trg_mass = problem(seed=1, empty=False)  # POT's balanced Sinkhorn divides by the masses
    result = sinkhorn_unbalanced(cost, src_mass, trg_mass, eps=eps, rho=math.inf, max_iter=200_000, tol=1e-14)
    expected = ot.sinkhorn(
        src_mass[0].numpy(), trg_mass[0].numpy(), cost[0].numpy(), eps, numItermax=200_000, stopThr=1e-15
    )
    np.testing.assert_allclose(result.plan[0].numpy(), expected, rtol=1e-9, atol=1e-14)
    torch.testing.assert_close(result.plan.sum(2), src_mass, rtol=0, atol=1e-12)
    torch.testing.assert_close(result.plan.sum(1), trg_mass, rtol=0, atol=1e-12)


def test_zero_mass_patches_get_no_mass_and_minus_infinite_potentials():
    cost, src_mass, trg_mass = problem(seed=2)
    result = sinkhorn_unbalanced(cost, src_mass, trg_mass, eps=0.05, rho=1.0)
    assert torch.all(result.plan[:, 3, :] == 0) and torch.all(result.plan[:, :, 5] == 0)
    assert result.src_potential[0, 3] == -math.inf and result.trg_potential[0, 5] == -math.inf
    assert torch.isfinite(result.src_potential[:, src_mass[0] > 0]).all()


@pytest.mark.slow
@pytest.mark.parametrize("rho", [1.0, math.inf])
def test_float32_at_small_eps_is_finite_and_close_to_float64(rho):
    cost, src_mass, trg_mass = problem(n=64, m=49, batch=2, seed=3, dtype=torch.float32)
    single = sinkhorn_unbalanced(cost, src_mass, trg_mass, eps=1e-3, rho=rho, max_iter=5000, tol=1e-7)
    double = sinkhorn_unbalanced(
        cost.double(), src_mass.double(), trg_mass.double(), eps=1e-3, rho=rho, max_iter=5000, tol=1e-10
    )
    assert single.plan.dtype == torch.float32 and torch.isfinite(single.plan).all()
    # Masses of order 1/N survive (no underflow): the plan carries its full marginals.
    assert single.plan.sum((1, 2)).min() > 0.9
    assert (single.plan.double() - double.plan).abs().sum((1, 2)).max() < 1e-3


def test_warm_start_from_converged_potentials_needs_few_iterations_and_agrees():
    cost, src_mass, trg_mass = problem(seed=4)
    cold = sinkhorn_unbalanced(cost, src_mass, trg_mass, eps=0.02, rho=1.0, max_iter=100_000, tol=1e-12)
    warm = sinkhorn_unbalanced(
        cost,
        src_mass,
        trg_mass,
        eps=0.02,
        rho=1.0,
        max_iter=100_000,
        tol=1e-12,
        init=(cold.src_potential, cold.trg_potential),
    )
    assert warm.iterations < cold.iterations / 10
    torch.testing.assert_close(warm.plan, cold.plan, rtol=1e-9, atol=1e-14)


def test_each_pair_stops_on_its_own_and_equals_its_solve_alone():
    cost, src_mass, trg_mass = problem(batch=3, seed=5)
    cost[1] *= 0.1  # a flat cost converges in fewer iterations
    init = torch.zeros(3, 12, dtype=torch.float64), torch.zeros(3, 15, dtype=torch.float64)
    init[0][2] = 0.3  # a warm start that is off for pair 2
    options = dict(eps=0.02, rho=1.0, max_iter=400, tol=1e-9)
    batch = sinkhorn_unbalanced(cost, src_mass, trg_mass, init=init, **options)
    assert len(set(batch.iterations.tolist())) == 3 and batch.iterations.dtype == torch.int64
    for b in range(3):
        one = slice(b, b + 1)
        alone = sinkhorn_unbalanced(
            cost[one], src_mass[one], trg_mass[one], init=(init[0][one], init[1][one]), **options
        )
        torch.testing.assert_close(batch.plan[one], alone.plan, rtol=1e-12, atol=1e-16)
        torch.testing.assert_close(batch.src_potential[one], alone.src_potential, rtol=1e-12, atol=1e-16)
        assert batch.iterations[b] == alone.iterations[0] and batch.converged[b] == alone.converged[0]
    assert batch.converged.all()
    capped = sinkhorn_unbalanced(cost, src_mass, trg_mass, **options | {"max_iter": 7})
    assert capped.iterations.tolist() == [7, 7, 7] and not capped.converged.any()


def test_mismatched_shapes_are_rejected():
    cost, src_mass, trg_mass = problem()
    with pytest.raises(PipelineError, match=r"expected cost \[B, N, M\], src_mass \[B, N\], trg_mass \[B, M\]; got"):
        sinkhorn_unbalanced(cost, src_mass[:, :5], trg_mass, eps=0.1)
