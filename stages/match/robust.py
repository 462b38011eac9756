r"""Flip- and scale-aware GWOT: the paper's two failure cases (mirrored poses, objects of other sizes) handled
per pair on top of :func:`stages.match.gwot.gwot`, which is left as it is.

Flip (``flip="auto"``): each pair is solved twice, as it is and with the source mirrored left-right. The
mirrored solve uses the features of the mirrored source *image* (``src_flipped``: a store's
``tokens_flipped``, on the original grid; DINOv2 is not flip-equivariant, so mirroring the feature grid
would not do), laid out on the mirrored grid; its plan is mapped back to original source coordinates
(``plan[i, j] = plan_mirrored[i, Ws - 1 - j]``), so keypoint and flow readout need nothing else. The
mirrored orientation is kept only on evidence: when its converged objective is lower than the plain one
by more than ``flip_margin`` (in units of the feature cost), or lower at all and confirmed by the geometry
of the confident matches (:func:`order_agreement`: the share of mutual nearest neighbours that keep their
left-right order is higher by ``ORDER_MARGIN`` in the mirrored orientation). A margin of zero (the naive
rule) chooses the mirrored solve for a large share of real, unmirrored pairs, whose two objectives differ
by chance; on such pairs the matches are noise and both orders agree about half the time.

Scale (``scale="auto"``): the relative object scale ``s`` (target size / source size) is estimated without
annotations (:func:`estimate_scale`: a vote over pairs of mutual nearest neighbours). Where ``s`` is clearly
away from 1 (outside ``[1 / SCALE_DEAD_ZONE, SCALE_DEAD_ZONE]``) the spatial term takes neighbourhoods of
different sizes, ``k`` on the smaller object's grid and about ``k s`` (or ``k / s``) on the larger one's,
and the marginals are relaxed to ``min(rho, scale_rho)`` so that a small object is not forced to receive a
large one's mass; elsewhere the pair is solved exactly as plain GWOT. With both options the one scale
estimate (from the orientation with the stronger vote) serves both solves, so their objectives compare.

Every decision is per pair and the solver stops each pair on its own, so a pair's result does not depend
on the other pairs of its batch; pairs with equal neighbourhoods are solved together.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from pipeline.errors import PipelineError
from stages.match.grids import check_grids
from stages.match.gwot import GWOTResult, gwot
from stages.match.nn import nn_match
from stages.match.transport_plan import TransportPlan, stack_plans

FLIP_MODES = ("off", "auto")
SCALE_MODES = ("off", "auto")
SCALE_DEAD_ZONE = 1.3  # |log s| below log(1.3): the pair is solved as plain GWOT
MAX_VOTES = 256  # mutual matches kept per pair for the scale vote (the most similar ones)
MIN_SPAN = 3.0  # patches: pairs of matches closer than this in the source cast no vote (quantisation)
LOG_SCALE_BINS = torch.linspace(math.log(0.25), math.log(4.0), 57)  # the vote's histogram, ~0.05 apart
LOG_SCALE_BANDWIDTH = 0.1  # Gaussian smoothing of the vote, in log-scale units
ORDER_MARGIN = 0.5  # order agreement of the mirrored minus the original orientation that confirms a flip
MIN_ORDER_VOTES = 100  # fewer counted pairs of matches than this: the order vote is no evidence (0.5)


@dataclass(frozen=True)
class RobustResult:
    """A batch's flip- and scale-aware solution.

    ``plan`` (a :class:`TransportPlan`, ``[B, N, M]``) in original source coordinates; ``solver``: the kept solve's
    :class:`GWOTResult` per pair (its plan as solved, on the mirrored grid for mirrored pairs); ``mirrored [B]``
    bool: the orientation kept; ``objective [B]`` and ``objective_mirrored [B]``: the converged objectives of the
    two solves (NaN for the mirrored one without ``flip``); ``scale [B]``: the estimated relative scale (NaN without
    ``scale``); ``k_src``/``k_trg [B]``: the neighbourhoods used.
    """

    plan: TransportPlan
    solver: GWOTResult
    mirrored: torch.Tensor
    objective: torch.Tensor
    objective_mirrored: torch.Tensor
    scale: torch.Tensor
    k_src: torch.Tensor
    k_trg: torch.Tensor


def mirror_grid(values: torch.Tensor) -> torch.Tensor:
    """Mirror grids ``[B, H, W, ...]`` left-right (column ``j`` becomes ``W - 1 - j``)."""
    return values.flip(2)


def _patch_coordinates(grid: tuple[int, int], device: torch.device) -> torch.Tensor:
    """``[H * W, 2]`` (x, y) of a grid's patches, in patches, row-major."""
    ys, xs = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
    return torch.stack([xs.flatten(), ys.flatten()], 1).to(device, torch.float32)


@dataclass(frozen=True)
class ScaleEstimate:
    """Per pair: the relative scale ``s`` (target / source) and the vote's peak ``support`` in [0, 1]."""

    scale: torch.Tensor
    support: torch.Tensor


def _tentative_matches(
    src_feats: torch.Tensor, trg_feats: torch.Tensor, src_valid: torch.Tensor, trg_valid: torch.Tensor
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per pair, ``(src_xy, trg_xy)`` ``[K, 2]`` in patches: its ``MAX_VOTES`` most similar mutual nearest
    neighbours, the tentative matches both votes (:func:`estimate_scale`, :func:`order_agreement`) count."""
    matches = nn_match(src_feats, trg_feats, src_valid, trg_valid, mutual=True)
    src_xy = _patch_coordinates(tuple(src_feats.shape[1:3]), src_feats.device)
    trg_xy = _patch_coordinates(tuple(trg_feats.shape[1:3]), trg_feats.device)
    pairs = []
    for b in range(src_feats.shape[0]):
        sources = matches.keep[b].nonzero().flatten()
        best = matches.similarity[b, sources, matches.indices[b, sources]].argsort(descending=True)[:MAX_VOTES]
        sources = sources[best]
        pairs.append((src_xy[sources], trg_xy[matches.indices[b, sources]]))
    return pairs


def estimate_scale(
    src_feats: torch.Tensor,
    trg_feats: torch.Tensor,
    src_valid: torch.Tensor | None = None,
    trg_valid: torch.Tensor | None = None,
) -> ScaleEstimate:
    """The relative object scale of each pair, target size over source size, without annotations.

    The ``MAX_VOTES`` most similar mutual nearest neighbours are taken as tentative matches; every two of
    them at least ``MIN_SPAN`` patches apart in the source vote for ``log(|y_a - y_b| / |x_a - x_b|)``, and
    the mode of the Gaussian-smoothed vote is the estimate. Two correct matches vote for the true scale
    whatever the rotation; votes with a wrong match spread out, so the mode needs only a minority of
    correct matches (a similarity fit would need a majority). ``support`` is the vote's share within one
    bandwidth of the mode.
    """
    src_valid, trg_valid = check_grids(src_feats, trg_feats, src_valid, trg_valid)
    bins = LOG_SCALE_BINS.to(src_feats.device)
    scales, supports = [], []
    for src_points, trg_points in _tentative_matches(src_feats, trg_feats, src_valid, trg_valid):
        src_span = torch.cdist(src_points, src_points)
        trg_span = torch.cdist(trg_points, trg_points)
        counted = torch.triu(src_span >= MIN_SPAN, diagonal=1) & (trg_span > 0)
        votes = (trg_span[counted] / src_span[counted]).log()
        if votes.numel() == 0:
            scales.append(torch.ones((), device=bins.device))
            supports.append(torch.zeros((), device=bins.device))
            continue
        density = torch.exp(-0.5 * ((bins[:, None] - votes[None]) / LOG_SCALE_BANDWIDTH) ** 2).sum(1)
        mode = bins[density.argmax()]
        scales.append(mode.exp())
        supports.append(((votes - mode).abs() <= LOG_SCALE_BANDWIDTH).float().mean())
    return ScaleEstimate(scale=torch.stack(scales), support=torch.stack(supports))


def order_agreement(
    src_feats: torch.Tensor,
    trg_feats: torch.Tensor,
    src_valid: torch.Tensor | None = None,
    trg_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per pair, the share ``[B]`` in [0, 1] of tentative matches that keep their left-right order: of every
    two of them at least ``MIN_SPAN`` patches apart horizontally in the source (and apart in the target),
    those whose target columns are in the same order. Near 1 when most matches are right and the pair is
    not mirrored, near 0 when it is mirrored, about 0.5 when the matches are noise (0.5 with fewer than
    ``MIN_ORDER_VOTES`` votes: a small grid's handful of matches is no evidence)."""
    src_valid, trg_valid = check_grids(src_feats, trg_feats, src_valid, trg_valid)
    shares = []
    for src_points, trg_points in _tentative_matches(src_feats, trg_feats, src_valid, trg_valid):
        src_dx = src_points[:, None, 0] - src_points[None, :, 0]
        trg_dx = trg_points[:, None, 0] - trg_points[None, :, 0]
        counted = torch.triu(src_dx.abs() >= MIN_SPAN, diagonal=1) & (trg_dx != 0)
        kept = (src_dx * trg_dx)[counted] > 0
        enough = kept.numel() >= MIN_ORDER_VOTES
        shares.append(kept.float().mean() if enough else torch.tensor(0.5, device=src_feats.device))
    return torch.stack(shares)


def _odd(value: float) -> int:
    """The odd integer nearest to ``value`` (ties go up; at least 1)."""
    return max(1, 2 * math.floor(value / 2) + 1)


def neighbourhoods(scale: float, k: int, src_grid: tuple[int, int], trg_grid: tuple[int, int]) -> tuple[int, int]:
    """``(k_src, k_trg)`` for a relative scale: ``k`` on the smaller object's grid, ``k * ratio`` (odd, at
    most the grid's side) on the larger one's; ``(k, k)`` inside the dead zone."""
    if 1 / SCALE_DEAD_ZONE < scale < SCALE_DEAD_ZONE:
        return k, k
    if scale > 1:
        return k, min(_odd(k * scale), _odd(min(trg_grid) - 1))
    return min(_odd(k / scale), _odd(min(src_grid) - 1)), k


def _solve_grouped(
    src_feats: torch.Tensor,
    trg_feats: torch.Tensor,
    src_valid: torch.Tensor,
    trg_valid: torch.Tensor,
    k_src: list[int],
    k_trg: list[int],
    rho: list[float],
    solver_kwargs: dict,
) -> GWOTResult:
    """``gwot`` per group of pairs sharing ``(k_src, k_trg, rho)``, reassembled in batch order."""
    batch = src_feats.shape[0]
    groups: dict[tuple[int, int, float], list[int]] = {}
    for index, key in enumerate(zip(k_src, k_trg, rho, strict=True)):
        groups.setdefault(key, []).append(index)
    parts: dict[str, list[torch.Tensor | None]] = {}
    for (k, k_t, r), members in groups.items():
        at = torch.tensor(members, device=src_feats.device)
        result = gwot(
            src_feats[at], trg_feats[at], src_valid[at], trg_valid[at], **{**solver_kwargs, "rho": r}, k=k, k_trg=k_t
        )
        for name, value in vars(result).items():
            slots = parts.setdefault(name, [None] * batch)
            for position, index in enumerate(members):
                slots[index] = value[position]
    stacked = {name: torch.stack(values) for name, values in parts.items() if name != "plan"}
    return GWOTResult(plan=stack_plans(parts["plan"]), **stacked)


def _check_options(flip: str, scale: str, flip_margin: float, scale_rho: float) -> None:
    """Reject unknown modes and out-of-domain thresholds, naming the setting."""
    problems = []
    if flip not in FLIP_MODES:
        problems.append(f"flip must be one of {', '.join(FLIP_MODES)}, got {flip!r}")
    if scale not in SCALE_MODES:
        problems.append(f"scale must be one of {', '.join(SCALE_MODES)}, got {scale!r}")
    if not flip_margin >= 0:
        problems.append(f"flip_margin must be >= 0, got {flip_margin}")
    if not scale_rho > 0:
        problems.append(f"scale_rho must be > 0, got {scale_rho}")
    if problems:
        raise PipelineError("invalid GWOT settings: " + "; ".join(problems))


def robust_gwot(
    src_feats: torch.Tensor,
    trg_feats: torch.Tensor,
    src_valid: torch.Tensor | None = None,
    trg_valid: torch.Tensor | None = None,
    *,
    src_flipped: torch.Tensor | None = None,
    flip: str = "off",
    flip_margin: float = 0.02,
    scale: str = "off",
    scale_rho: float = 0.1,
    **solver_kwargs,
) -> RobustResult:
    """Flip- and/or scale-aware GWOT of a batch (see the module docstring).

    Args:
        src_feats, trg_feats, src_valid, trg_valid: as for :func:`stages.match.gwot.gwot`.
        src_flipped: ``[B, Hs, Ws, C]`` features of the mirrored source images on the original grid (a
            feature store's ``tokens_flipped``); required with ``flip="auto"``.
        flip: ``off`` or ``auto`` (solve both orientations, keep the mirrored one on evidence).
        flip_margin: how much lower (feature-cost units) the mirrored objective must be to be kept without
            the order vote's confirmation (with it: lower at all).
        scale: ``off`` or ``auto`` (neighbourhood sizes and marginals from the estimated relative scale).
        scale_rho: the marginal relaxation for pairs whose estimated scale is outside the dead zone.
        solver_kwargs: the other keyword arguments of :func:`stages.match.gwot.gwot` (``k`` and ``k_trg``
            included; with ``scale="auto"`` the estimated neighbourhoods replace them).
    """
    _check_options(flip, scale, flip_margin, scale_rho)
    src_valid, trg_valid = check_grids(src_feats, trg_feats, src_valid, trg_valid)
    if flip == "auto" and (src_flipped is None or src_flipped.shape != src_feats.shape):
        raise PipelineError(
            "flip='auto' needs src_flipped, the mirrored source images' features of the same shape as src_feats "
            f"{tuple(src_feats.shape)}; got {None if src_flipped is None else tuple(src_flipped.shape)}"
        )
    batch = src_feats.shape[0]
    src_grid, trg_grid = tuple(src_feats.shape[1:3]), tuple(trg_feats.shape[1:3])
    k, rho = solver_kwargs.pop("k", 5), solver_kwargs.pop("rho", 1.0)
    k_trg_given = solver_kwargs.pop("k_trg", None) or k
    mirrored_feats = mirror_grid(src_flipped) if flip == "auto" else None
    mirrored_valid = mirror_grid(src_valid)
    nan = torch.full((batch,), math.nan, device=src_feats.device)
    scales = nan
    k_src, k_trg, rhos = [k] * batch, [k_trg_given] * batch, [rho] * batch
    if scale == "auto":
        estimate = estimate_scale(src_feats, trg_feats, src_valid, trg_valid)
        if mirrored_feats is not None:
            other = estimate_scale(mirrored_feats, trg_feats, mirrored_valid, trg_valid)
            stronger = other.support > estimate.support
            estimate = ScaleEstimate(torch.where(stronger, other.scale, estimate.scale), estimate.support)
        scales = estimate.scale
        for b, value in enumerate(scales.tolist()):
            k_src[b], k_trg[b] = neighbourhoods(value, k, src_grid, trg_grid)
            if (k_src[b], k_trg[b]) != (k, k):
                rhos[b] = min(rho, scale_rho)
    solve = (k_src, k_trg, rhos, solver_kwargs)
    plain = _solve_grouped(src_feats, trg_feats, src_valid, trg_valid, *solve)
    objective_mirrored, mirrored = nan, torch.zeros(batch, dtype=torch.bool, device=src_feats.device)
    plan, solver = plain.plan, plain
    if mirrored_feats is not None:
        other = _solve_grouped(mirrored_feats, trg_feats, mirrored_valid, trg_valid, *solve)
        objective_mirrored = other.objective
        gap = plain.objective - other.objective
        mirrored = gap > flip_margin
        undecided = ((gap > 0) & ~mirrored).nonzero().flatten()  # only these need the order vote's confirmation
        if len(undecided):
            pick = (mirrored_feats, trg_feats, mirrored_valid, trg_valid, src_feats, src_valid)
            m_feats, t_feats, m_valid, t_valid, s_feats, s_valid = (tensor[undecided] for tensor in pick)
            order_gap = order_agreement(m_feats, t_feats, m_valid, t_valid) - order_agreement(
                s_feats, t_feats, s_valid, t_valid
            )
            mirrored[undecided] = order_gap >= ORDER_MARGIN
        plan = other.plan.mirror_rows(src_grid).where(mirrored, plain.plan)
        solver = GWOTResult(
            plan=other.plan.where(mirrored, plain.plan),
            **{
                name: torch.where(mirrored, getattr(other, name), value)
                for name, value in vars(plain).items()
                if name != "plan"
            },
        )
    device = src_feats.device
    return RobustResult(
        plan=plan,
        solver=solver,
        mirrored=mirrored,
        objective=plain.objective,
        objective_mirrored=objective_mirrored,
        scale=scales,
        k_src=torch.tensor(k_src, device=device),
        k_trg=torch.tensor(k_trg, device=device),
    )
