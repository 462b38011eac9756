"""The conv/cumsum quadratic terms against dense neighbourhood matrices and brute-force sums (float64)."""

from __future__ import annotations

import itertools

import pytest
import torch

from stages.match.costs import neighbour_mass_sum, neighbour_plan_sum, spatial_term, symmetry_term

GRID_PAIRS = [((4, 5), (3, 6)), ((3, 6), (4, 5)), ((2, 3), (5, 2))]


def neighbourhood_matrix(height: int, width: int, k: int) -> torch.Tensor:
    """The dense 0/1 Chebyshev k x k neighbourhood matrix of a row-major grid, built entry by entry."""
    cells = list(itertools.product(range(height), range(width)))
    matrix = torch.zeros(len(cells), len(cells), dtype=torch.float64)
    for (a, (ra, ca)), (b, (rb, cb)) in itertools.product(enumerate(cells), repeat=2):
        matrix[a, b] = float(abs(ra - rb) <= k // 2 and abs(ca - cb) <= k // 2)
    return matrix


def column_coordinates(height: int, width: int) -> torch.Tensor:
    """x (column) of every patch of a row-major grid."""
    return torch.arange(width, dtype=torch.float64).repeat(height)


def random_plan(src_grid, trg_grid, batch=2, seed=0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    n, m = src_grid[0] * src_grid[1], trg_grid[0] * trg_grid[1]
    plan = torch.rand(batch, n, m, dtype=torch.float64, generator=generator)
    return plan / plan.sum((1, 2), keepdim=True)


def brute_force(plan: torch.Tensor, tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """sum_ijkl T_ij T_kl L_ijkl and its autograd gradient, for an explicit [N, M, N, M] tensor L."""
    plan = plan.clone().requires_grad_(True)
    value = torch.einsum("bij,ijkl,bkl->b", plan, tensor, plan)
    (grad,) = torch.autograd.grad(value.sum(), plan)
    return value.detach(), grad


SIZES = [(3, 3), (5, 5), (3, 5), (5, 1)]  # (k_src, k_trg)


@pytest.mark.parametrize(("k", "k_trg"), SIZES)
@pytest.mark.parametrize(("src_grid", "trg_grid"), GRID_PAIRS)
def test_convolutions_equal_dense_neighbourhood_products(src_grid, trg_grid, k, k_trg):
    plan = random_plan(src_grid, trg_grid)
    src_adjacency, trg_adjacency = neighbourhood_matrix(*src_grid, k), neighbourhood_matrix(*trg_grid, k_trg)
    torch.testing.assert_close(
        neighbour_plan_sum(plan, src_grid, trg_grid, k, k_trg),
        src_adjacency @ plan @ trg_adjacency,
        rtol=1e-12,
        atol=0,
    )
    torch.testing.assert_close(
        neighbour_mass_sum(plan.sum(2), src_grid, k), plan.sum(2) @ src_adjacency, rtol=1e-12, atol=0
    )
    torch.testing.assert_close(
        neighbour_mass_sum(plan.sum(1), trg_grid, k_trg), plan.sum(1) @ trg_adjacency, rtol=1e-12, atol=0
    )


@pytest.mark.parametrize(("k", "k_trg"), SIZES)
@pytest.mark.parametrize(("src_grid", "trg_grid"), GRID_PAIRS)
def test_spatial_term_and_gradient_equal_brute_force(src_grid, trg_grid, k, k_trg):
    plan = random_plan(src_grid, trg_grid, seed=1)
    src_adjacency, trg_adjacency = neighbourhood_matrix(*src_grid, k), neighbourhood_matrix(*trg_grid, k_trg)
    a, b = src_adjacency[:, None, :, None], trg_adjacency[None, :, None, :]
    value, grad = brute_force(plan, a * (1 - b) + (1 - a) * b)
    term = spatial_term(plan, src_grid, trg_grid, k, k_trg)
    torch.testing.assert_close(term.value, value, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(term.grad, grad, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize(("src_grid", "trg_grid"), GRID_PAIRS)
def test_symmetry_term_and_gradient_equal_brute_force(src_grid, trg_grid):
    plan = random_plan(src_grid, trg_grid, seed=2)
    src_x, trg_x = column_coordinates(*src_grid), column_coordinates(*trg_grid)
    crossing = (src_x[:, None, None, None] - src_x[None, None, :, None]) * (
        trg_x[None, :, None, None] - trg_x[None, None, None, :]
    ) < 0
    value, grad = brute_force(plan, crossing.double())
    term = symmetry_term(plan, src_grid, trg_grid)
    torch.testing.assert_close(term.value, value, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(term.grad, grad, rtol=1e-10, atol=1e-14)


def test_order_preserving_plan_has_no_symmetry_cost_and_mirrored_plan_does():
    grid = (3, 4)
    identity = torch.eye(12, dtype=torch.float64)[None] / 12
    mirror = identity.view(1, 12, 3, 4).flip(3).reshape(1, 12, 12)
    assert symmetry_term(identity, grid, grid).value.item() == 0.0
    # Every ordered pair of patches in different columns (144 minus 4 columns x 3 x 3) is crossed, each 1/144.
    assert symmetry_term(mirror, grid, grid).value.item() == pytest.approx(108 / 144)
