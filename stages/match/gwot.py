r"""The GWOT matcher: fused, unbalanced, entropic Gromov-Wasserstein transport between two patch grids.

For a source grid ``Hs x Ws`` (N = Hs*Ws patches) and a target grid ``Ht x Wt`` (M = Ht*Wt), the plan
``T [N, M]`` minimises ::

    E(T) = <Cf, T> + w_s * lambda * Q_s(T) + w_y * Q_y(T)
           + rho * KL(T1 | a) + rho * KL(T^T1 | b) - eps * H(T)

    Cf_ij  = 1 - cos(f_i, f_j)                                    feature cost, in [0, 2]
    Q_s(T) = sum_ijkl T_ij T_kl [As_ik (1 - At_jl) + (1 - As_ik) At_jl]   spatial GW term
    Q_y(T) = sum_ijkl T_ij T_kl [(x_i - x_k)(x_j - x_l) < 0]            left-right order term
    lambda = sqrt(N M) / k^2
    H(T)   = -sum_ij T_ij (log T_ij - 1),   KL(p | a) = sum_i p_i log(p_i / a_i) - p_i + a_i

with ``As``/``At`` the 0/1 Chebyshev ``k x k`` neighbourhood matrices of the grids (centre included), ``x``
a patch's column, and ``a``/``b`` uniform over the valid patches (total mass 1; invalid patches get none).
``lambda`` puts ``w_s`` on the scale of ``Cf``: for a plan of mass 1, ``Q_s`` and its gradient are
O(k^2 / N), so ``lambda * grad Q_s`` is O(1) whatever the grid and kernel sizes, like ``grad Q_y``.
With ``rho = inf`` the KL terms are the constraints ``T1 = a``, ``T^T1 = b`` and are left out of ``E``.

Solver: mirror descent in the KL geometry with step ``1 / eps`` (Peyre, Cuturi & Solomon 2016): each outer
step linearises the quadratic terms at the current plan and solves the entropic unbalanced problem ::

    T_{t+1} = argmin_T <Cf + w_s lambda grad Q_s(T_t) + w_y grad Q_y(T_t), T> - eps H(T) + rho KL terms

with the warm-started Sinkhorn of :mod:`stages.match.sinkhorn` (the unbalanced GW relaxation of Sejourne,
Vialard & Peyre 2021). The gradients are convolutions and cumulative sums (:mod:`stages.match.costs`).

References:
    G. Peyre, M. Cuturi, J. Solomon. Gromov-Wasserstein averaging of kernel and distance matrices. ICML 2016.
    T. Sejourne, F.-X. Vialard, G. Peyre. The unbalanced Gromov Wasserstein distance: conic formulation and
    relaxation. NeurIPS 2021.
    The GWOT paper (BMVC 2025): the matcher summarised in docs/DESIGN.md, "The method".
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from pipeline.errors import PipelineError
from stages.match.costs import Grid, QuadraticTerm, spatial_term, symmetry_term
from stages.match.nn import check_grids, cosine_similarity
from stages.match.sinkhorn import sinkhorn_unbalanced


@dataclass(frozen=True)
class GWOTResult:
    """The plan ``[B, N, M]`` and, per outer step ``s``: the objective ``E`` after it ``objective [B, S]``,
    the marginal error ``|T1 - a|_1 + |T^T1 - b|_1`` after it ``marginal_error [B, S]`` and the Sinkhorn
    iterations it ran ``inner_iters`` (length S; the most over the batch)."""

    plan: torch.Tensor
    objective: torch.Tensor
    marginal_error: torch.Tensor
    inner_iters: tuple[int, ...]


def _check_hyperparameters(
    eps: float, w_s: float, k: int, w_y: float, rho: float, outer_iters: int, inner_iters: int
) -> None:
    """Reject settings outside the solver's domain, naming the knob."""
    problems = []
    if not eps > 0:
        problems.append(f"eps must be > 0, got {eps}")
    if not (w_s >= 0 and w_y >= 0):
        problems.append(f"w_s and w_y must be >= 0, got w_s={w_s}, w_y={w_y}")
    if not (k >= 1 and k % 2 == 1):
        problems.append(f"k must be a positive odd neighbourhood size, got {k}")
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


def _init_plan(init: torch.Tensor | None, src_mass: torch.Tensor, trg_mass: torch.Tensor) -> torch.Tensor:
    """The starting plan: ``a b^T`` or the caller's ``[B, N, M]`` plan (checked, not modified)."""
    product = src_mass[:, :, None] * trg_mass[:, None, :]
    if init is None:
        return product
    if init.shape != product.shape:
        raise PipelineError(f"init plan must have shape {tuple(product.shape)}, got {tuple(init.shape)}")
    if not (torch.isfinite(init).all() and (init >= 0).all()):
        raise PipelineError("init plan must be finite and non-negative")
    return init.to(product)


@dataclass(frozen=True)
class _Problem:
    """Everything fixed during a solve: the feature cost, the marginals, the grids and the weights."""

    feature_cost: torch.Tensor
    src_mass: torch.Tensor
    trg_mass: torch.Tensor
    src_grid: Grid
    trg_grid: Grid
    eps: float
    spatial_weight: float  # w_s * lambda
    w_y: float
    rho: float
    k: int

    def quadratic_terms(self, plan: torch.Tensor) -> list[tuple[float, QuadraticTerm]]:
        """The weighted quadratic terms at ``plan`` that are switched on."""
        terms = []
        if self.spatial_weight > 0:
            terms.append((self.spatial_weight, spatial_term(plan, self.src_grid, self.trg_grid, self.k)))
        if self.w_y > 0:
            terms.append((self.w_y, symmetry_term(plan, self.src_grid, self.trg_grid)))
        return terms

    def linearised_cost(self, terms: list[tuple[float, QuadraticTerm]]) -> torch.Tensor:
        """``Cf + sum_w w * grad Q`` at the plan the terms were evaluated at, ``[B, N, M]``."""
        cost = self.feature_cost.clone()
        for weight, term in terms:
            cost.add_(term.grad, alpha=weight)
        return cost

    def objective(self, plan: torch.Tensor, terms: list[tuple[float, QuadraticTerm]]) -> torch.Tensor:
        """``E(T)`` per pair, ``[B]`` (the KL terms are constraints, left out, when ``rho = inf``)."""
        value = (self.feature_cost * plan).sum((1, 2))
        value = value + self.eps * (torch.special.xlogy(plan, plan).sum((1, 2)) - plan.sum((1, 2)))
        for weight, term in terms:
            value = value + weight * term.value
        if not math.isinf(self.rho):
            value = value + self.rho * (_kl(plan.sum(2), self.src_mass) + _kl(plan.sum(1), self.trg_mass))
        return value

    def marginal_error(self, plan: torch.Tensor) -> torch.Tensor:
        """``|T1 - a|_1 + |T^T1 - b|_1`` per pair, ``[B]``."""
        return (plan.sum(2) - self.src_mass).abs().sum(1) + (plan.sum(1) - self.trg_mass).abs().sum(1)


def gwot(
    src_feats: torch.Tensor,
    trg_feats: torch.Tensor,
    src_valid: torch.Tensor | None = None,
    trg_valid: torch.Tensor | None = None,
    *,
    eps: float = 0.02,
    w_s: float = 0.1,
    k: int = 5,
    w_y: float = 0.1,
    rho: float = 1.0,
    outer_iters: int = 10,
    inner_iters: int = 50,
    outer_tol: float = 1e-3,
    inner_tol: float = 1e-4,
    init: torch.Tensor | None = None,
) -> GWOTResult:
    """Solve the GWOT problem of the module docstring for a batch of feature-grid pairs.

    Args:
        src_feats: ``[B, Hs, Ws, C]`` source patch features; ``trg_feats``: ``[B, Ht, Wt, C]``.
        src_valid, trg_valid: ``[B, H, W]`` bool, patches that may carry mass (None: all).
        eps: entropic regularisation, in units of the feature cost ``Cf`` (range [0, 2]).
        w_s: weight of the spatial term, on the ``Cf`` scale thanks to ``lambda = sqrt(N M) / k^2``.
        k: odd side of the square neighbourhood (in patches) that counts as "close".
        w_y: weight of the left-right order term (its gradient is in [0, 2] for a plan of mass 1).
        rho: marginal relaxation strength; ``math.inf`` forces the marginals (balanced transport).
        outer_iters: most mirror-descent steps; stops earlier once ``|T_{t+1} - T_t|_1 <= outer_tol``.
        inner_iters: most Sinkhorn iterations per step; stops earlier once the dual potentials move less
            than ``inner_tol`` (cost units) in an iteration.
        init: starting plan ``[B, N, M]`` (default ``a b^T``); its potentials are not known, so the first
            Sinkhorn solve starts cold.

    The defaults (sharp plans at ``eps`` = 1% of the cost range, quadratic weights a tenth of the cost scale,
    mildly unbalanced marginals, warm-started 10 x 50 iterations) were chosen on warped photos with DAISY
    descriptors (``tests/stages/match/test_quality.py``), not yet swept on DINOv2 features.

    Returns a :class:`GWOTResult` on the features' device, in their dtype (float32 for half precision).
    Settings ``w_s = 0`` and/or ``w_y = 0`` give the ablations, both zero gives plain entropic OT.

    Mapping to POT (``rho = inf``, ``w_y = 0``): with ``s = w_s * lambda`` the iterates equal those of
    ``ot.gromov.entropic_fused_gromov_wasserstein(M=Cf, C1=As, C2=At, p=a, q=b, loss_fun="square_loss",
    alpha=s / (1 + s), epsilon=eps / (1 + s), G0=init, max_iter=outer_iters, solver="PGD")``: for 0/1
    matrices ``(As_ik - At_jl)^2`` is ``S``, POT's ``gwggrad`` is ``grad Q_s`` at fixed marginals, and POT's
    step cost ``(1 - alpha) Cf + alpha gwggrad`` with ``epsilon`` is ours divided by ``1 + s``. The inner
    problem is ``ot.unbalanced.sinkhorn_unbalanced(a, b, C_t, reg=eps, reg_m=rho, reg_type="entropy")``.
    """
    _check_hyperparameters(eps, w_s, k, w_y, rho, outer_iters, inner_iters)
    src_valid, trg_valid = check_grids(src_feats, trg_feats, src_valid, trg_valid)
    feature_cost = 1 - cosine_similarity(src_feats, trg_feats)
    src_grid, trg_grid = tuple(src_feats.shape[1:3]), tuple(trg_feats.shape[1:3])
    n, m = src_grid[0] * src_grid[1], trg_grid[0] * trg_grid[1]
    problem = _Problem(
        feature_cost=feature_cost,
        src_mass=_marginals(src_valid, feature_cost.dtype),
        trg_mass=_marginals(trg_valid, feature_cost.dtype),
        src_grid=src_grid,
        trg_grid=trg_grid,
        eps=eps,
        spatial_weight=w_s * math.sqrt(n * m) / k**2,
        w_y=w_y,
        rho=rho,
        k=k,
    )
    plan = _init_plan(init, problem.src_mass, problem.trg_mass)
    terms = problem.quadratic_terms(plan)
    potentials = None
    objective, marginal_error, inner_used = [], [], []
    for _ in range(outer_iters):
        solution = sinkhorn_unbalanced(
            problem.linearised_cost(terms),
            problem.src_mass,
            problem.trg_mass,
            eps=eps,
            rho=rho,
            max_iter=inner_iters,
            tol=inner_tol,
            init=potentials,
        )
        change = torch.sub(solution.plan, plan).abs_().sum((1, 2)).max()
        plan, potentials = solution.plan, (solution.src_potential, solution.trg_potential)
        terms = problem.quadratic_terms(plan)
        objective.append(problem.objective(plan, terms))
        marginal_error.append(problem.marginal_error(plan))
        inner_used.append(solution.iterations)
        if change <= outer_tol:
            break
    return GWOTResult(
        plan=plan,
        objective=torch.stack(objective, dim=1),
        marginal_error=torch.stack(marginal_error, dim=1),
        inner_iters=tuple(inner_used),
    )
