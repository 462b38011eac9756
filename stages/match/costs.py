"""The GWOT quadratic terms (spatial and left-right symmetry) and their gradients, without dense matrices.

A plan ``T`` is a batch ``[B, N, M]`` over a source grid ``Hs x Ws`` (N = Hs*Ws, row-major patches) and a
target grid ``Ht x Wt`` (M = Ht*Wt). ``As``/``At`` are the 0/1 Chebyshev neighbourhood matrices of the grids,
``k_src x k_src`` on the source and ``k_trg x k_trg`` on the target (a patch is its own neighbour); ``x`` is a
patch's column index.

Spatial term::

    Q_s(T) = sum_ijkl T_ij T_kl [As_ik (1 - At_jl) + (1 - As_ik) At_jl]
           = (T1)^T As (T1) + (T^T1)^T At (T^T1) - 2 <T, As T At>
    grad Q_s = 2 (As T1) 1^T + 2 1 (At T^T1)^T - 4 As T At

``As T At`` is a box filter (a convolution with ``ones(k, k)`` and zero padding) over the source grid
followed by one over the target grid: O(N M k^2), never an N x N matrix.

The solver only needs the gradients, added into its step cost in place (:func:`add_spatial_gradient`,
:func:`add_symmetry_gradient`); the values (:func:`spatial_term`, :func:`symmetry_term`) are diagnostics.

Symmetry term::

    Q_y(T) = sum_ijkl T_ij T_kl [(x_i - x_k)(x_j - x_l) < 0] = <T, G>,   grad Q_y = 2 G,
    G_ij   = sum_kl T_kl (|s_ik| |s_jl| - s_ik s_jl) / 2,   s_ik = sgn(x_i - x_k), s_jl = sgn(x_j - x_l)

``G`` depends on (column of i, column of j) only, so the plan is first summed per (source column, target
column) into ``P [B, Ws, Wt]``; ``sum s s P`` is then a signed cumulative sum along both axes and
``sum |s||s| P`` is the total minus the own row and own column of ``P`` plus ``P`` itself: O(N M).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

Grid = tuple[int, int]


@dataclass(frozen=True)
class QuadraticTerm:
    """A quadratic term's value per pair ``[B]`` and its gradient with respect to the plan ``[B, N, M]``."""

    value: torch.Tensor
    grad: torch.Tensor


def box_sum(images: torch.Tensor, k: int) -> torch.Tensor:
    """Sum over each ``k x k`` window (zero padding) of every channel: ``[B, C, H, W] -> [B, C, H, W]``.

    A depthwise convolution with a ``ones(k, k)`` kernel, i.e. ``A x`` for the grid's neighbourhood matrix
    ``A`` applied to each channel; the input may be a strided view (channels-last is fastest on CPU).
    """
    channels = images.shape[1]
    kernel = torch.ones(channels, 1, k, k, dtype=images.dtype, device=images.device)
    return F.conv2d(images, kernel, padding=k // 2, groups=channels)


def neighbour_plan_sum(plan: torch.Tensor, src_grid: Grid, trg_grid: Grid, k_src: int, k_trg: int) -> torch.Tensor:
    """``As T At`` for a plan ``[B, N, M]``: a box filter over the source grid, then over the target grid."""
    batch, n, m = plan.shape
    (hs, ws), (ht, wt) = src_grid, trg_grid
    # [B, Hs, Ws, M] permuted to [B, M, Hs, Ws]: the plan's own memory order is channels-last for this conv.
    over_src = box_sum(plan.reshape(batch, hs, ws, m).permute(0, 3, 1, 2), k_src)
    over_src = over_src.permute(0, 2, 3, 1).reshape(batch, n, ht, wt)
    return box_sum(over_src, k_trg).reshape(batch, n, m)


def neighbour_mass_sum(mass: torch.Tensor, grid: Grid, k: int) -> torch.Tensor:
    """``A m`` for masses ``[B, N]`` on a grid: the total mass of each patch's ``k x k`` neighbourhood."""
    batch = mass.shape[0]
    return box_sum(mass.reshape(batch, 1, *grid), k).reshape(batch, -1)


def add_spatial_gradient(
    cost: torch.Tensor, plan: torch.Tensor, src_grid: Grid, trg_grid: Grid, k_src: int, k_trg: int, weight: float
) -> torch.Tensor:
    """``cost += weight * grad Q_s(T)`` in place for a plan ``[B, N, M]``; returns ``cost``."""
    cross = neighbour_plan_sum(plan, src_grid, trg_grid, k_src, k_trg)  # As T At, [B, N, M]
    cost.add_(cross, alpha=-4 * weight)
    cost.add_(neighbour_mass_sum(plan.sum(2), src_grid, k_src)[:, :, None], alpha=2 * weight)
    return cost.add_(neighbour_mass_sum(plan.sum(1), trg_grid, k_trg)[:, None, :], alpha=2 * weight)


def spatial_term(plan: torch.Tensor, src_grid: Grid, trg_grid: Grid, k_src: int, k_trg: int) -> QuadraticTerm:
    """``Q_s(T)`` and its gradient for a plan ``[B, N, M]`` (see the module docstring)."""
    src_mass, trg_mass = plan.sum(2), plan.sum(1)
    src_neighbours = neighbour_mass_sum(src_mass, src_grid, k_src)  # As T1, [B, N]
    trg_neighbours = neighbour_mass_sum(trg_mass, trg_grid, k_trg)  # At T^T1, [B, M]
    cross = neighbour_plan_sum(plan, src_grid, trg_grid, k_src, k_trg)  # As T At, [B, N, M]
    value = (src_mass * src_neighbours).sum(1) + (trg_mass * trg_neighbours).sum(1) - 2 * (plan * cross).sum((1, 2))
    grad = add_spatial_gradient(torch.zeros_like(plan), plan, src_grid, trg_grid, k_src, k_trg, 1.0)
    return QuadraticTerm(value=value, grad=grad)


def _signed_sum(values: torch.Tensor, dim: int) -> torch.Tensor:
    """``out[c] = sum_{c' < c} values[c'] - sum_{c' > c} values[c']`` along ``dim`` (a sgn-kernel product)."""
    inclusive = values.cumsum(dim)
    return 2 * inclusive - values - values.sum(dim, keepdim=True)


def column_crossings(columns: torch.Tensor) -> torch.Tensor:
    """``G`` per (source column, target column) ``[B, Ws, Wt]`` from the plan's column sums ``P [B, Ws, Wt]``."""
    total = columns.sum((1, 2), keepdim=True)
    apart = total - columns.sum(2, keepdim=True) - columns.sum(1, keepdim=True) + columns
    signed = _signed_sum(_signed_sum(columns, 1), 2)
    return (apart - signed) / 2


def _column_sums(plan: torch.Tensor, src_grid: Grid, trg_grid: Grid) -> torch.Tensor:
    """``P [B, Ws, Wt]``: the plan summed per (source column, target column)."""
    return plan.reshape(plan.shape[0], *src_grid, *trg_grid).sum((1, 3))


def add_symmetry_gradient(
    cost: torch.Tensor, plan: torch.Tensor, src_grid: Grid, trg_grid: Grid, weight: float
) -> torch.Tensor:
    """``cost += weight * grad Q_y(T)`` in place for a plan ``[B, N, M]``; returns ``cost``."""
    crossing = column_crossings(_column_sums(plan, src_grid, trg_grid))
    cost.view(cost.shape[0], *src_grid, *trg_grid).add_(crossing[:, None, :, None, :], alpha=2 * weight)
    return cost


def symmetry_term(plan: torch.Tensor, src_grid: Grid, trg_grid: Grid) -> QuadraticTerm:
    """``Q_y(T)`` and its gradient for a plan ``[B, N, M]`` (see the module docstring)."""
    columns = _column_sums(plan, src_grid, trg_grid)
    value = (columns * column_crossings(columns)).sum((1, 2))
    grad = add_symmetry_gradient(torch.zeros_like(plan), plan, src_grid, trg_grid, 1.0)
    return QuadraticTerm(value=value, grad=grad)
