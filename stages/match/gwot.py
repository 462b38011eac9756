r"""The GWOT matcher: fused, unbalanced, entropic Gromov-Wasserstein transport between two patch grids.

For a source grid ``Hs x Ws`` (N = Hs*Ws patches) and a target grid ``Ht x Wt`` (M = Ht*Wt), the plan
``T [N, M]`` minimises ::

    E(T) = <Cf, T> + w_s * lambda * Q_s(T) + w_y * Q_y(T)
           + rho * KL(T1 | a) + rho * KL(T^T1 | b) - eps * H(T)

    Cf_ij  = 1 - cos(f_i, f_j)                                    feature cost, in [0, 2]
    Q_s(T) = sum_ijkl T_ij T_kl [As_ik (1 - At_jl) + (1 - As_ik) At_jl]   spatial GW term
    Q_y(T) = sum_ijkl T_ij T_kl [(x_i - x_k)(x_j - x_l) < 0]            left-right order term
    lambda = sqrt(N M) / (k_src k_trg)
    H(T)   = -sum_ij T_ij (log T_ij - 1),   KL(p | a) = sum_i p_i log(p_i / a_i) - p_i + a_i

with ``As``/``At`` the 0/1 Chebyshev neighbourhood matrices of the grids (centre included), ``k_src x k_src``
on the source and ``k_trg x k_trg`` on the target (``k_trg = k_src = k`` by default), ``x``
a patch's column, and ``a``/``b`` uniform over the valid patches (total mass 1; invalid patches get none).
``lambda`` puts ``w_s`` on the scale of ``Cf``: for a plan of mass 1 the gradient's parts are O(k_src^2 / N)
and O(k_trg^2 / M), so ``lambda``, the inverse of their geometric mean, makes ``lambda * grad Q_s`` O(1)
whatever the grid and kernel sizes, like ``grad Q_y``; with one size ``k`` on both grids it is
``sqrt(N M) / k^2``.
With ``rho = inf`` the KL terms are the constraints ``T1 = a``, ``T^T1 = b`` and are left out of ``E``.

Solver: mirror descent in the KL geometry with step ``1 / eps`` (Peyre, Cuturi & Solomon 2016): each outer
step linearises the quadratic terms at the current plan and solves the entropic unbalanced problem ::

    T_{t+1} = argmin_T <Cf + w_s lambda grad Q_s(T_t) + w_y grad Q_y(T_t), T> - eps H(T) + rho KL terms

with the warm-started Sinkhorn of :mod:`stages.match.sinkhorn` (the unbalanced GW relaxation of Sejourne,
Vialard & Peyre 2021). The gradients are convolutions and cumulative sums (:mod:`stages.match.costs`).

Each pair of a batch stops on its own, once its plan moves less than ``outer_tol`` in a step (and each
Sinkhorn solve likewise per pair): pairs that are done are frozen and leave the working set, so a pair's
plan does not depend on the batch it is solved in. The objective and marginal error are computed once, at
the end. A pair that used all ``outer_iters`` steps without converging is counted in one
:class:`ConvergenceWarning` per call.

References:
    G. Peyre, M. Cuturi, J. Solomon. Gromov-Wasserstein averaging of kernel and distance matrices. ICML 2016.
    T. Sejourne, F.-X. Vialard, G. Peyre. The unbalanced Gromov Wasserstein distance: conic formulation and
    relaxation. NeurIPS 2021.
    The GWOT paper (BMVC 2025): the matcher summarised in docs/DESIGN.md, "The method".
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass

import torch

from pipeline.errors import PipelineError
from stages.match import coarse_to_fine as c2f
from stages.match.costs import Grid, add_spatial_gradient, add_symmetry_gradient, spatial_term, symmetry_term
from stages.match.grids import check_grids, cosine_similarity
from stages.match.sinkhorn import DENSE, DenseLayout, sinkhorn_unbalanced
from stages.match.transport_plan import TransportPlan
from stages.match.windows import Windows


class ConvergenceWarning(UserWarning):
    """Some pairs of a GWOT solve used all their outer steps without converging."""


@dataclass(frozen=True)
class GWOTResult:
    """Per pair of the batch: the plan (a :class:`TransportPlan`, ``[B, N, M]`` dense or ``[B, N, K]`` on
    windows of the target grid, as solved); the final objective ``E`` ``[B]``; the final marginal
    error ``|T1 - a|_1 + |T^T1 - b|_1`` ``[B]``; the mirror-descent steps used ``outer_steps [B]`` and the
    Sinkhorn iterations used over all of them ``inner_iters [B]`` (int64); whether the plan converged to
    ``outer_tol`` within ``outer_iters`` steps ``converged [B]`` (bool)."""

    plan: TransportPlan
    objective: torch.Tensor
    marginal_error: torch.Tensor
    outer_steps: torch.Tensor
    inner_iters: torch.Tensor
    converged: torch.Tensor


def _check_hyperparameters(
    eps: float,
    w_s: float,
    k: int,
    k_trg: int,
    w_y: float,
    rho: float,
    outer_iters: int,
    inner_iters: int,
    window_radius: int,
) -> None:
    """Reject settings outside the solver's domain, naming the knob."""
    problems = []
    if window_radius < 1:
        problems.append(f"window_radius must be >= 1 (target patches around the coarse match), got {window_radius}")
    if not eps > 0:
        problems.append(f"eps must be > 0, got {eps}")
    if not (w_s >= 0 and w_y >= 0):
        problems.append(f"w_s and w_y must be >= 0, got w_s={w_s}, w_y={w_y}")
    if not (k >= 1 and k % 2 == 1):
        problems.append(f"k must be a positive odd neighbourhood size, got {k}")
    if not (k_trg >= 1 and k_trg % 2 == 1):
        problems.append(f"k_trg must be a positive odd neighbourhood size (or None for k), got {k_trg}")
    if not rho > 0:
        problems.append(f"rho must be > 0 (math.inf for hard marginals), got {rho}")
    if outer_iters < 1 or inner_iters < 1:
        problems.append(f"outer_iters and inner_iters must be >= 1, got {outer_iters}, {inner_iters}")
    if problems:
        raise PipelineError("invalid GWOT settings: " + "; ".join(problems))


def _marginals(valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Uniform masses over the valid patches of each grid, ``[B, H, W] -> [B, H*W]`` summing to 1."""
    mass = valid.flatten(1).to(dtype)
    return mass / mass.sum(1, keepdim=True)


def _kl(mass: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Generalised KL divergence per pair, ``[B, N] x [B, N] -> [B]``."""
    return (torch.special.xlogy(mass, mass) - torch.special.xlogy(mass, reference) - mass + reference).sum(1)


def _check_init(init: torch.Tensor, src_mass: torch.Tensor, trg_mass: torch.Tensor) -> None:
    """The caller's starting plan must be ``[B, N, M]``, finite and non-negative."""
    expected = (src_mass.shape[0], src_mass.shape[1], trg_mass.shape[1])
    if init.shape != expected:
        raise PipelineError(f"init plan must have shape {expected}, got {tuple(init.shape)}")
    if not (torch.isfinite(init).all() and (init >= 0).all()):
        raise PipelineError("init plan must be finite and non-negative")


@dataclass(frozen=True)
class _Problem:
    """Everything fixed during a solve: the feature cost at the plan's entries, the marginals, the grids,
    the weights and the plan's layout (dense ``[B, N, M]`` or windows ``[B, N, K]``)."""

    feature_cost: torch.Tensor
    src_mass: torch.Tensor
    trg_mass: torch.Tensor
    src_grid: Grid
    trg_grid: Grid
    eps: float
    spatial_weight: float  # w_s * lambda
    w_y: float
    rho: float
    k_src: int
    k_trg: int
    layout: DenseLayout | Windows

    def pairs(self, ids: torch.Tensor) -> _Problem:
        """The same problem restricted to the pairs ``ids`` of the batch."""
        return dataclasses.replace(
            self,
            feature_cost=self.feature_cost[ids],
            src_mass=self.src_mass[ids],
            trg_mass=self.trg_mass[ids],
            layout=self.layout.pairs(ids),
        )

    def step_cost(self, plan: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``Cf + w_s lambda grad Q_s(T) + w_y grad Q_y(T)`` at ``plan``, written into ``out``."""
        out.copy_(self.feature_cost)
        windows = self.layout if isinstance(self.layout, Windows) else None
        if self.spatial_weight > 0 and windows is None:
            add_spatial_gradient(out, plan, self.src_grid, self.trg_grid, self.k_src, self.k_trg, self.spatial_weight)
        elif self.spatial_weight > 0:
            windows.add_spatial_gradient(out, plan, self.k_src, self.k_trg, self.spatial_weight)
        if self.w_y > 0 and windows is None:
            add_symmetry_gradient(out, plan, self.src_grid, self.trg_grid, self.w_y)
        elif self.w_y > 0:
            windows.add_symmetry_gradient(out, plan, self.w_y)
        return out

    def trg_marginal(self, plan: torch.Tensor) -> torch.Tensor:
        """``T^T 1`` per pair, ``[B, M]``."""
        return self.layout.column_sum(plan) if isinstance(self.layout, Windows) else plan.sum(1)

    def objective(self, plan: torch.Tensor) -> torch.Tensor:
        """``E(T)`` per pair, ``[B]`` (the KL terms are constraints, left out, when ``rho = inf``)."""
        value = (self.feature_cost * plan).sum((1, 2))
        value = value + self.eps * (torch.special.xlogy(plan, plan).sum((1, 2)) - plan.sum((1, 2)))
        windows = self.layout if isinstance(self.layout, Windows) else None
        if self.spatial_weight > 0:
            spatial = (
                spatial_term(plan, self.src_grid, self.trg_grid, self.k_src, self.k_trg).value
                if windows is None
                else windows.spatial_value(plan, self.k_src, self.k_trg)
            )
            value = value + self.spatial_weight * spatial
        if self.w_y > 0:
            symmetry = (
                symmetry_term(plan, self.src_grid, self.trg_grid).value
                if windows is None
                else windows.symmetry_value(plan)
            )
            value = value + self.w_y * symmetry
        if not math.isinf(self.rho):
            value = value + self.rho * (_kl(plan.sum(2), self.src_mass) + _kl(self.trg_marginal(plan), self.trg_mass))
        return value

    def marginal_error(self, plan: torch.Tensor) -> torch.Tensor:
        """``|T1 - a|_1 + |T^T1 - b|_1`` per pair, ``[B]``."""
        src_error = (plan.sum(2) - self.src_mass).abs().sum(1)
        return src_error + (self.trg_marginal(plan) - self.trg_mass).abs().sum(1)


@dataclass(frozen=True)
class _Settings:
    """The solver's keyword settings, as :func:`gwot` takes them (``k_trg`` resolved)."""

    eps: float
    w_s: float
    k: int
    k_trg: int
    w_y: float
    rho: float
    outer_iters: int
    inner_iters: int
    outer_tol: float
    inner_tol: float
    coarse_to_fine: bool
    window_radius: int


def gwot(
    src_feats: torch.Tensor,
    trg_feats: torch.Tensor,
    src_valid: torch.Tensor | None = None,
    trg_valid: torch.Tensor | None = None,
    *,
    eps: float = 0.02,
    w_s: float = 0.1,
    k: int = 5,
    k_trg: int | None = None,
    w_y: float = 0.1,
    rho: float = 1.0,
    outer_iters: int = 10,
    inner_iters: int = 50,
    outer_tol: float = 1e-3,
    inner_tol: float = 1e-4,
    coarse_to_fine: bool = True,
    window_radius: int = 4,
    init: torch.Tensor | None = None,
    warn: bool = True,
) -> GWOTResult:
    """Solve the GWOT problem of the module docstring for a batch of feature-grid pairs, each pair on its own.

    Args:
        src_feats: ``[B, Hs, Ws, C]`` source patch features; ``trg_feats``: ``[B, Ht, Wt, C]``.
        src_valid, trg_valid: ``[B, H, W]`` bool, patches that may carry mass (None: all).
        eps: entropic regularisation, in units of the feature cost ``Cf`` (range [0, 2]).
        w_s: weight of the spatial term, on the ``Cf`` scale thanks to ``lambda = sqrt(N M) / (k k_trg)``.
        k: odd side of the square neighbourhood (in patches) that counts as "close" on the source grid.
        k_trg: the same on the target grid (None: ``k``), e.g. larger for a target object larger than the
            source's.
        w_y: weight of the left-right order term (its gradient is in [0, 2] for a plan of mass 1).
        rho: marginal relaxation strength; ``math.inf`` forces the marginals (balanced transport).
        outer_iters: most mirror-descent steps (per level); a pair stops earlier once
            ``|T_{t+1} - T_t|_1 <= outer_tol``.
        inner_iters: most Sinkhorn iterations per step; a pair stops earlier once its dual potentials move
            less than ``inner_tol`` (cost units) in an iteration.
        coarse_to_fine: solve on grids average-pooled by 2 first (recursively, while the pooled grids keep
            sides of at least 8), then at full resolution only within a window of target patches around
            where each source patch's coarse mass went (a sparse plan: O(N K) memory and work instead of
            O(N M)). Grids too small to pool, or with fewer than 8 K target patches, are solved densely
            (faster there).
        window_radius: the windows' half side in patches (``K = (2 r + 1)^2`` target patches per source
            patch, at most the whole target grid).
        init: starting plan ``[B, N, M]`` (default ``a b^T``); its potentials are not known, so the first
            Sinkhorn solve starts cold. With ``coarse_to_fine`` it replaces the coarse levels: the windows
            are centred on each row's mass in it.
        warn: whether to warn about pairs that did not converge (``False`` for a caller that reports the
            ``converged`` flags itself: no filter on the process-wide, thread-unsafe warnings state).

    The defaults (sharp plans at ``eps`` = 1% of the cost range, quadratic weights a tenth of the cost scale,
    mildly unbalanced marginals, warm-started 10 x 50 iterations) were chosen on warped photos with DAISY
    descriptors (``tests/stages/match/test_quality.py``), not yet swept on DINOv2 features.

    Returns a :class:`GWOTResult` on the features' device, in their dtype (float32 for half precision), with the
    plan as solved (windowed by coarse-to-fine; ``.dense()`` is its ``[B, N, M]`` array); its step and iteration
    counts add up all levels, and ``converged`` is the full-resolution level's. Settings ``w_s = 0`` and/or
    ``w_y = 0`` give the ablations, both zero gives plain entropic OT. Warns
    (:class:`ConvergenceWarning`, unless ``warn`` is false) when pairs did not converge.

    Mapping to POT (``rho = inf``, ``w_y = 0``, ``k_trg = k``, dense): with ``s = w_s * lambda`` the iterates
    equal those of ``ot.gromov.entropic_fused_gromov_wasserstein(M=Cf, C1=As, C2=At, p=a, q=b,
    loss_fun="square_loss", alpha=s / (1 + s), epsilon=eps / (1 + s), G0=init, max_iter=outer_iters,
    solver="PGD")``: for 0/1 matrices ``(As_ik - At_jl)^2`` is ``S``, POT's ``gwggrad`` is ``grad Q_s`` at
    fixed marginals, and POT's step cost ``(1 - alpha) Cf + alpha gwggrad`` with ``epsilon`` is ours divided
    by ``1 + s``. The inner problem is ``ot.unbalanced.sinkhorn_unbalanced(a, b, C_t, reg=eps, reg_m=rho,
    reg_type="entropy")``.
    """
    k_trg = k if k_trg is None else k_trg
    _check_hyperparameters(eps, w_s, k, k_trg, w_y, rho, outer_iters, inner_iters, window_radius)
    src_valid, trg_valid = check_grids(src_feats, trg_feats, src_valid, trg_valid)
    settings = _Settings(
        eps, w_s, k, k_trg, w_y, rho, outer_iters, inner_iters, outer_tol, inner_tol, coarse_to_fine, window_radius
    )
    level = _solve(src_feats, trg_feats, src_valid, trg_valid, settings, init)
    unconverged = int((~level.converged).sum())
    if unconverged and warn:
        warnings.warn(
            f"GWOT: {unconverged} of {len(level.converged)} pair(s) did not converge in outer_iters={outer_iters} "
            f"steps (plan change > outer_tol={outer_tol}); raise outer_iters, or eps for smoother plans",
            ConvergenceWarning,
            stacklevel=2,
        )
    problem = level.problem
    layout = problem.layout
    windows = None if layout is DENSE else layout.without_scratch()
    return GWOTResult(
        plan=TransportPlan(level.plan, windows),
        objective=problem.objective(level.plan),
        marginal_error=problem.marginal_error(level.plan),
        outer_steps=level.outer_steps,
        inner_iters=level.inner_iters,
        converged=level.converged,
    )


@dataclass(frozen=True)
class _Level:
    """One level's solution: its problem, plan (in the problem's layout), potentials and counts."""

    problem: _Problem
    plan: torch.Tensor
    potentials: tuple[torch.Tensor, torch.Tensor]
    outer_steps: torch.Tensor
    inner_iters: torch.Tensor
    converged: torch.Tensor


def _solve(src_feats, trg_feats, src_valid, trg_valid, settings: _Settings, init: torch.Tensor | None) -> _Level:
    """Solve one level: densely, or (coarse-to-fine) on windows placed from a coarser level or ``init``."""
    dtype = torch.promote_types(src_feats.dtype, torch.float32)  # cosine_similarity's
    src_grid, trg_grid = tuple(src_feats.shape[1:3]), tuple(trg_feats.shape[1:3])
    n, m = src_grid[0] * src_grid[1], trg_grid[0] * trg_grid[1]
    src_mass, trg_mass = _marginals(src_valid, dtype), _marginals(trg_valid, dtype)
    if init is not None:
        _check_init(init, src_mass, trg_mass)
    potentials = torch.zeros_like(src_mass), torch.zeros_like(trg_mass)
    coarse = None
    if settings.coarse_to_fine and init is None and c2f.worth_refining(src_grid, trg_grid, settings.window_radius):
        coarse_settings = dataclasses.replace(
            settings, k=c2f.coarse_size(settings.k), k_trg=c2f.coarse_size(settings.k_trg)
        )
        (coarse_src, coarse_src_valid), (coarse_trg, coarse_trg_valid) = (
            c2f.pool_grid(src_feats, src_valid),
            c2f.pool_grid(trg_feats, trg_valid),
        )
        coarse = _solve(coarse_src, coarse_trg, coarse_src_valid, coarse_trg_valid, coarse_settings, None)
        coarse_layout = None if coarse.problem.layout is DENSE else coarse.problem.layout
        windows = c2f.place_windows(coarse.plan, coarse_layout, src_grid, trg_grid, settings.window_radius)
        plan = c2f.upsample_plan(coarse.plan, coarse_layout, windows, src_valid, trg_valid)
        potentials = tuple(
            c2f.upsample_potential(potential, grid)
            for potential, grid in zip(coarse.potentials, (src_grid, trg_grid), strict=True)
        )
    elif settings.coarse_to_fine and init is not None:
        windows = c2f.place_windows_from_plan(init, src_grid, trg_grid, settings.window_radius)
        plan = windows.restrict(init).to(dtype, copy=True)
    else:
        windows = None
        plan = (src_mass[:, :, None] * trg_mass[:, None, :]) if init is None else init.to(dtype, copy=True)
    problem = _Problem(
        feature_cost=1 - cosine_similarity(src_feats, trg_feats)
        if windows is None
        else windows.feature_cost(src_feats, trg_feats),
        src_mass=src_mass,
        trg_mass=trg_mass,
        src_grid=src_grid,
        trg_grid=trg_grid,
        eps=settings.eps,
        spatial_weight=settings.w_s * math.sqrt(n * m) / (settings.k * settings.k_trg),
        w_y=settings.w_y,
        rho=settings.rho,
        k_src=settings.k,
        k_trg=settings.k_trg,
        layout=DENSE if windows is None else windows,
    )
    plan, potentials, outer_steps, inner_used, converged = _mirror_descent(
        problem, plan, potentials, settings.outer_iters, settings.outer_tol, settings.inner_iters, settings.inner_tol
    )
    if coarse is not None:
        outer_steps, inner_used = outer_steps + coarse.outer_steps, inner_used + coarse.inner_iters
    return _Level(problem, plan, potentials, outer_steps, inner_used, converged)


def _mirror_descent(
    problem: _Problem,
    plan: torch.Tensor,
    potentials: tuple[torch.Tensor, torch.Tensor],
    outer_iters: int,
    outer_tol: float,
    inner_iters: int,
    inner_tol: float,
):
    """Run the outer loop from ``plan`` (overwritten) and warm-start ``potentials`` with a mask of active
    pairs; returns the final plans and potentials and per pair the outer steps, inner iterations and
    convergence.

    The working set holds the active pairs (``ids``), their plans and two scratch buffers (step cost, next
    plan) that are reused step after step; a pair that is done is copied out and the set compacted.
    """
    batch = plan.shape[0]
    device = plan.device
    ids = torch.arange(batch, device=device)
    outer_steps = torch.zeros(batch, dtype=torch.int64, device=device)
    inner_used = torch.zeros(batch, dtype=torch.int64, device=device)
    converged = torch.zeros(batch, dtype=torch.bool, device=device)
    final_potentials = tuple(potential.clone() for potential in potentials)
    work, final = problem, None
    cost, spare = torch.empty_like(plan), torch.empty_like(plan)
    for step in range(outer_iters):
        solution = sinkhorn_unbalanced(
            work.step_cost(plan, out=cost),
            work.src_mass,
            work.trg_mass,
            eps=problem.eps,
            rho=problem.rho,
            max_iter=inner_iters,
            tol=inner_tol,
            init=potentials,
            out=spare,
            layout=work.layout,
        )
        change = torch.sub(solution.plan, plan, out=cost).abs_().sum((1, 2))
        plan, spare = solution.plan, plan
        potentials = solution.src_potential, solution.trg_potential
        outer_steps[ids] += 1
        inner_used[ids] += solution.iterations
        calm = change <= outer_tol
        finished = calm | (step == outer_iters - 1)
        converged[ids[calm]] = True
        if not bool(finished.any()):
            continue
        for kept, potential in zip(final_potentials, potentials, strict=True):
            kept[ids[finished]] = potential[finished]
        if final is None and bool(finished.all()):  # the whole batch at once: the plans are in order
            return plan, final_potentials, outer_steps, inner_used, converged
        if final is None:
            final = torch.empty((batch, *plan.shape[1:]), dtype=plan.dtype, device=device)
        final[ids[finished]] = plan[finished]
        keep = torch.where(~finished)[0]
        if not keep.numel():
            break
        ids, work, plan = ids[keep], work.pairs(keep), plan[keep]
        potentials = potentials[0][keep], potentials[1][keep]
        cost, spare = torch.empty_like(plan), torch.empty_like(plan)
    return final, final_potentials, outer_steps, inner_used, converged
