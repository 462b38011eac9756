"""Coarse-to-fine GWOT helpers: average-pooled grids, and windows and starting plans placed from a coarse plan.

A grid is pooled by 2 in each direction (the last row or column alone when a side is odd): a coarse patch's
feature is the mean of its valid children's, and it is valid when any child is. A fine source patch's window
is centred where its coarse parent's mass went: the mass-weighted mean of the ``3 x 3`` coarse target patches
around the parent row's mode, in fine coordinates. The fine starting plan spreads each coarse entry evenly
over the fine (source, target) children pairs inside the windows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from stages.match.costs import Grid
from stages.match.windows import Windows

MIN_COARSE_SIDE = 8  # the coarsest level's smallest grid side (smaller grids are solved densely)
MIN_SAVING = 8  # windows pay for their gathers and extra levels once the target grid has 8x their patches


def pooled_side(side: int) -> int:
    """A grid side after pooling by 2."""
    return (side + 1) // 2


def worth_refining(src_grid: Grid, trg_grid: Grid, radius: int) -> bool:
    """Whether to solve these grids coarse-to-fine: both are large enough for a coarser level, and the
    windows (side ``2 radius + 1``) are small against the target grid (else the dense solve is faster)."""
    large = min(pooled_side(side) for side in (*src_grid, *trg_grid)) >= MIN_COARSE_SIDE
    return large and MIN_SAVING * (2 * radius + 1) ** 2 <= trg_grid[0] * trg_grid[1]


def coarse_size(k: int) -> int:
    """The odd neighbourhood size on a grid pooled by 2 that spans about the same area (5 -> 3, 3 -> 3)."""
    return 2 * ((k // 2 + 1) // 2) + 1


def pool_grid(feats: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Features ``[B, H, W, C]`` and validity ``[B, H, W]`` pooled by 2 (means over valid children)."""
    weights = valid.to(feats.dtype)[:, None]
    sums = F.avg_pool2d(feats.permute(0, 3, 1, 2) * weights, 2, ceil_mode=True, divisor_override=1)
    counts = F.avg_pool2d(weights, 2, ceil_mode=True, divisor_override=1)
    pooled = sums / counts.clamp_min(1)
    return pooled.permute(0, 2, 3, 1).contiguous(), counts[:, 0] > 0


def _parents(grid: Grid, device: torch.device) -> torch.Tensor:
    """Each fine patch's coarse parent (flat index on the pooled grid), ``[N]``."""
    rows, cols = torch.meshgrid(
        torch.arange(grid[0], device=device), torch.arange(grid[1], device=device), indexing="ij"
    )
    return ((rows // 2) * pooled_side(grid[1]) + cols // 2).flatten()


def _plan_values(plan: torch.Tensor, layout: Windows | None, rows: torch.Tensor, targets: torch.Tensor):
    """A plan's values at source patches ``rows [R]`` and target patches ``targets [B, R, J]``, ``[B, R, J]``,
    the plan dense ``[B, N, M]`` (``layout`` None) or windowed ``[B, N, K]``."""
    if layout is not None:
        return layout.values_at(plan, rows, targets)
    cells = rows[None, :, None] * plan.shape[2] + targets
    return torch.gather(plan.flatten(1), 1, cells.flatten(1)).view(cells.shape)


def _row_centres(plan: torch.Tensor, layout: Windows | None, trg_grid: Grid) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each row of a plan (dense, or windowed by ``layout``) sends its mass: the mass-weighted mean
    (y, x) of the ``3 x 3`` target patches around the row's mode, each ``[B, N]`` in target grid coordinates."""
    mode = plan.argmax(2)
    if layout is not None:
        mode = torch.gather(layout.index, 2, mode[:, :, None])[:, :, 0]
    mode_y, mode_x = mode // trg_grid[1], mode % trg_grid[1]
    offsets = torch.arange(-1, 2, device=plan.device)
    near_y = (mode_y[..., None] + offsets).clamp(0, trg_grid[0] - 1)  # [B, N, 3]
    near_x = (mode_x[..., None] + offsets).clamp(0, trg_grid[1] - 1)
    cells = (near_y[..., :, None] * trg_grid[1] + near_x[..., None, :]).flatten(2)  # [B, N, 9]
    mass = _plan_values(plan, layout, torch.arange(plan.shape[1], device=plan.device), cells)
    total = mass.sum(2).clamp_min(torch.finfo(mass.dtype).tiny)
    return (mass * (cells // trg_grid[1])).sum(2) / total, (mass * (cells % trg_grid[1])).sum(2) / total


def _windows_around(centre_y, centre_x, src_grid: Grid, trg_grid: Grid, radius: int) -> Windows:
    """Windows of side ``2 radius + 1`` (at most the target grid's) centred at ``[B, N]`` target points."""
    size = min(2 * radius + 1, trg_grid[0]), min(2 * radius + 1, trg_grid[1])
    top = torch.round(centre_y - (size[0] - 1) / 2).long()
    left = torch.round(centre_x - (size[1] - 1) / 2).long()
    return Windows.at(top, left, size, src_grid, trg_grid)


def place_windows(
    coarse_plan: torch.Tensor, coarse_layout: Windows | None, src_grid: Grid, trg_grid: Grid, radius: int
) -> Windows:
    """Windows on the fine grids centred where each fine source patch's coarse parent sent its mass in the
    coarse plan (dense ``[B, Nc, Mc]``, or windowed by ``coarse_layout``)."""
    coarse_trg = pooled_side(trg_grid[0]), pooled_side(trg_grid[1])
    centre_y, centre_x = _row_centres(coarse_plan, coarse_layout, coarse_trg)
    parents = _parents(src_grid, coarse_plan.device)
    # A coarse patch's centre lies between its two children: fine = 2 coarse + 0.5.
    return _windows_around(2 * centre_y[:, parents] + 0.5, 2 * centre_x[:, parents] + 0.5, src_grid, trg_grid, radius)


def place_windows_from_plan(plan: torch.Tensor, src_grid: Grid, trg_grid: Grid, radius: int) -> Windows:
    """Windows centred where each row of a plan ``[B, N, M]`` on the same grids sends its mass."""
    return _windows_around(*_row_centres(plan, None, trg_grid), src_grid, trg_grid, radius)


def upsample_plan(
    coarse_plan: torch.Tensor, coarse_layout: Windows | None, windows: Windows, src_valid, trg_valid
) -> torch.Tensor:
    """The fine starting plan ``[B, N, K]``: each entry of the coarse plan (dense, or windowed by
    ``coarse_layout``) shared evenly by its valid fine children pairs (validity ``[B, H, W]`` of the fine
    grids); zero at invalid patches."""
    src_parents = _parents(windows.src_grid, coarse_plan.device)
    trg_parents = _parents(windows.trg_grid, coarse_plan.device)
    src_weights, trg_weights = src_valid.flatten(1).to(coarse_plan.dtype), trg_valid.flatten(1).to(coarse_plan.dtype)
    src_children = torch.zeros_like(coarse_plan[:, :, 0]).index_add_(1, src_parents, src_weights)
    coarse_trg = pooled_side(windows.trg_grid[0]) * pooled_side(windows.trg_grid[1])
    trg_children = trg_weights.new_zeros(trg_weights.shape[0], coarse_trg).index_add_(1, trg_parents, trg_weights)
    src_share = src_weights / src_children[:, src_parents].clamp_min(1)  # [B, N]
    trg_share = trg_weights / trg_children[:, trg_parents].clamp_min(1)  # [B, M]
    values = _plan_values(coarse_plan, coarse_layout, src_parents, trg_parents[windows.index])  # [B, N, K]
    return values.mul_(src_share[:, :, None]).mul_(windows.trg(trg_share))


def upsample_potential(coarse_potential: torch.Tensor, grid: Grid) -> torch.Tensor:
    """A coarse level's dual potentials ``[B, Nc]`` read at each fine patch's parent, ``[B, N]``."""
    return coarse_potential[:, _parents(grid, coarse_potential.device)]
