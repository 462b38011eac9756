"""Batched entropic unbalanced optimal transport: scaling Sinkhorn with absorption, stable in float32.

Solves, for each pair of a batch, ::

    min_{T >= 0}  <C, T> - eps H(T) + rho KL(T1 | a) + rho KL(T^T1 | b),
    H(T) = -sum_ij T_ij (log T_ij - 1),   KL(p | a) = sum_i p_i log(p_i / a_i) - p_i + a_i,

which is POT's ``ot.unbalanced.sinkhorn_unbalanced(a, b, C, reg=eps, reg_m=rho, reg_type="entropy")`` (the
entropy is relative to the all-ones measure, not ``KL(T | a b^T)``, which is ``reg_type="kl"``).
``rho = inf`` turns the KL terms into the hard constraints ``T1 = a``, ``T^T1 = b`` (balanced Sinkhorn).

The optimal plan is ``T_ij = exp((f_i + g_j - C_ij) / eps)`` with the fixed point (Chizat et al. 2018)
``f_i = tau eps (log a_i - log sum_j exp((g_j - C_ij) / eps))``, ``tau = rho / (rho + eps)``, and likewise
for ``g``. The iterations run in the scaling form ``T = diag(u) K diag(v)`` (two matrix-vector products per
iteration) on a kernel ``K_ij = exp((f_i + g_j - C_ij) / eps)`` that has the current potentials absorbed
into it, so ``u`` and ``v`` stay near 1; whenever ``|log u|`` or ``|log v|`` exceeds ``ABSORB_AT`` they are
absorbed again (Schmitzer 2019). One log-domain sweep first puts (possibly warm-started) potentials on the
scale of the cost, so nothing under- or overflows even at ``eps = 1e-3`` with costs in [0, 2] in float32.
Patches with zero mass (invalid ones) get potential ``-inf`` and no mass.

The plan is dense ``[B, N, M]`` by default; with a :class:`stages.match.windows.Windows` layout it holds, per
source patch, only a window of ``K`` target patches ``[B, N, K]`` (the coarse-to-fine solver's sparse plans),
and entries outside the windows are zero. Only the layout's few operations differ (:class:`DenseLayout`).

Each pair of a batch stops on its own (a mask of active pairs): its convergence checks, absorptions and
iteration count are its own, so its result does not depend on the other pairs of the batch. Pairs that
are done leave the working set, which is compacted, so later iterations stream only the active pairs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from pipeline.errors import PipelineError

ABSORB_AT = 20.0  # |log u| beyond which the scalings are folded into the kernel (e^20 ~ 5e8)
LOG_SCALING_LIMIT = 50.0  # |log u| is clipped here between absorptions so that u*K*v cannot overflow
CHECK_EVERY = 5  # iterations between convergence checks (each check synchronises a GPU)


class DenseLayout:
    """Plans stored in full, ``[B, N, M]``: the operations Sinkhorn needs on them (see ``Windows`` for the
    windowed layout with the same methods)."""

    def trg(self, values: torch.Tensor) -> torch.Tensor:
        """Target values ``[B, M]`` broadcast to the plan's entries."""
        return values[:, None, :]

    def column_logsumexp(self, entries: torch.Tensor) -> torch.Tensor:
        """``log sum_i exp(x_ij)`` per target patch, ``[B, M]``."""
        return torch.logsumexp(entries, dim=1)

    def times_trg(self, kernel: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """``K v`` per pair, ``[B, N]`` (row vector times matrix: several times faster on CPU)."""
        return torch.bmm(values[:, None, :], kernel.transpose(1, 2))[:, 0]

    def times_src(self, kernel: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """``K^T u`` per pair, ``[B, M]``."""
        return torch.bmm(values[:, None, :], kernel)[:, 0]

    def pairs(self, ids: torch.Tensor) -> DenseLayout:
        """The layout of the pairs ``ids`` (a dense layout has no per-pair state)."""
        return self


DENSE = DenseLayout()


@dataclass(frozen=True)
class SinkhornResult:
    """Plan ``[B, N, M]``, dual potentials ``[B, N]``/``[B, M]`` (``-inf`` at zero mass), and per pair the
    iterations run ``[B]`` (int64) and whether the potentials converged to ``tol`` ``[B]`` (bool)."""

    plan: torch.Tensor
    src_potential: torch.Tensor
    trg_potential: torch.Tensor
    iterations: torch.Tensor
    converged: torch.Tensor


def _scaled_gap(
    cost: torch.Tensor,
    src_potential: torch.Tensor,
    trg_potential: torch.Tensor,
    eps: float,
    layout: DenseLayout,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``(f_i + g_j - C_ij) / eps`` on the plan's entries, built in one buffer (``out`` if given: fresh
    N x M buffers are slow, the kernel zero-fills their pages)."""
    out = torch.neg(cost, out=out)
    return out.add_(src_potential[:, :, None]).add_(layout.trg(trg_potential)).div_(eps)


def _log_domain_potentials(cost, src_potential, trg_potential, log_a, log_b, eps, tau, layout, buffer):
    """One exact potential sweep ``f = tau eps (log a - LSE_j((g_j - C_ij) / eps))``, then ``g`` likewise
    from the new ``f`` (``buffer``, shaped like ``cost``, is scratch space). A patch that no finite cost
    reaches (a target patch outside every window) can take no mass: its log mass becomes ``-inf`` too.
    Returns the potentials and the log masses."""
    gap = _scaled_gap(cost, torch.zeros_like(log_a), trg_potential, eps, layout, out=buffer)
    softmin = torch.logsumexp(gap, dim=2)
    log_a = torch.where(torch.isfinite(softmin), log_a, -math.inf)
    src_potential = torch.where(torch.isfinite(log_a), tau * eps * (log_a - softmin), -math.inf)
    gap = _scaled_gap(cost, src_potential, torch.zeros_like(log_b), eps, layout, out=buffer)
    softmin = layout.column_logsumexp(gap)
    log_b = torch.where(torch.isfinite(softmin), log_b, -math.inf)
    trg_potential = torch.where(torch.isfinite(log_b), tau * eps * (log_b - softmin), -math.inf)
    return src_potential, trg_potential, log_a, log_b


def _log_scaling(
    kernel_product: torch.Tensor, log_mass: torch.Tensor, absorbed: torch.Tensor, tau: float, damping: float
) -> torch.Tensor:
    """``log u = tau (log a - log K v) - f / (rho + eps)`` on rows with mass; 0 elsewhere (K rows are 0)."""
    tiny = torch.finfo(kernel_product.dtype).tiny
    log_u = kernel_product.clamp_min_(tiny).log_().sub_(log_mass).mul_(-tau)
    if damping:
        log_u.sub_(damping * absorbed)
    # Clipping only delays a far jump to after the next absorption; Sinkhorn converges from any iterate.
    log_u.clamp_(-LOG_SCALING_LIMIT, LOG_SCALING_LIMIT)
    return log_u.masked_fill_(~torch.isfinite(log_mass), 0.0)


def _absorbed(potential: torch.Tensor, log_scaling: torch.Tensor, log_mass: torch.Tensor, eps: float):
    """``f + eps log u`` on patches with mass, ``-inf`` elsewhere."""
    return torch.where(torch.isfinite(log_mass), potential + eps * log_scaling, -math.inf)


def sinkhorn_unbalanced(
    cost: torch.Tensor,
    src_mass: torch.Tensor,
    trg_mass: torch.Tensor,
    *,
    eps: float,
    rho: float = math.inf,
    max_iter: int = 1000,
    tol: float = 1e-6,
    init: tuple[torch.Tensor, torch.Tensor] | None = None,
    out: torch.Tensor | None = None,
    layout: DenseLayout = DENSE,
) -> SinkhornResult:
    """Entropic (unbalanced for finite ``rho``) OT between ``src_mass [B, N]`` and ``trg_mass [B, M]``.

    ``cost [B, N, M]``; masses are non-negative (zero for patches that must not be matched). ``init`` is a
    pair of potentials ``([B, N], [B, M])`` from an earlier solve (a warm start); zeros otherwise. Each
    pair stops after ``max_iter`` iterations or once none of its potentials moved more than ``tol`` (cost
    units) in an iteration. ``out`` (shaped like ``cost``, not ``cost`` itself) receives the plan, so that
    a caller solving many problems reuses one buffer. ``layout`` says how ``cost`` and the plan are stored
    (dense ``[B, N, M]``, or windowed ``[B, N, K]``).
    """
    if layout is DENSE and (
        cost.ndim != 3 or src_mass.shape != cost.shape[:2] or trg_mass.shape != (cost.shape[0], cost.shape[2])
    ):
        raise PipelineError(
            "expected cost [B, N, M], src_mass [B, N], trg_mass [B, M]; got "
            f"{list(cost.shape)}, {list(src_mass.shape)}, {list(trg_mass.shape)}"
        )
    batch = cost.shape[0]
    log_a, log_b = src_mass.log(), trg_mass.log()
    tau = 1.0 if math.isinf(rho) else rho / (rho + eps)
    damping = 0.0 if math.isinf(rho) else 1.0 / (rho + eps)
    if init is None:
        src_potential, trg_potential = torch.zeros_like(log_a), torch.zeros_like(log_b)
    else:
        src_potential, trg_potential = init
    src_potential = torch.where(torch.isfinite(log_a), src_potential.nan_to_num(neginf=0.0), -math.inf)
    trg_potential = torch.where(torch.isfinite(log_b), trg_potential.nan_to_num(neginf=0.0), -math.inf)
    plan = torch.empty_like(cost) if out is None else out
    src_potential, trg_potential, log_a, log_b = _log_domain_potentials(
        cost, src_potential, trg_potential, log_a, log_b, eps, tau, layout, plan
    )
    kernel = _scaled_gap(cost, src_potential, trg_potential, eps, layout, out=plan).exp_()
    # The working set: the pairs still iterating (``ids``), their kernels, masses, potentials and scalings.
    ids = torch.arange(batch, device=cost.device)
    log_u, log_v = torch.zeros_like(log_a), torch.zeros_like(log_b)
    final_src, final_trg = src_potential.clone(), trg_potential.clone()
    iterations = torch.zeros(batch, dtype=torch.int64, device=cost.device)
    converged = torch.zeros(batch, dtype=torch.bool, device=cost.device)
    done_iterations = 1
    while ids.numel():
        steps = min(CHECK_EVERY, max_iter - done_iterations)
        for step in range(steps):
            if step == steps - 1:
                previous = torch.cat([log_u, log_v], dim=1)
            log_u = _log_scaling(layout.times_trg(kernel, log_v.exp()), log_a, src_potential, tau, damping)
            log_v = _log_scaling(layout.times_src(kernel, log_u.exp()), log_b, trg_potential, tau, damping)
        done_iterations += steps
        if steps > 0:
            current = torch.cat([log_u, log_v], dim=1)
            change = (current - previous).abs_().amax(1)
            absorb = current.abs().amax(1) > ABSORB_AT
            calm = (eps * change <= tol) & ~absorb
        else:
            absorb = calm = torch.zeros(ids.numel(), dtype=torch.bool, device=cost.device)
        if bool(absorb.any()):
            src_potential = torch.where(absorb[:, None], _absorbed(src_potential, log_u, log_a, eps), src_potential)
            trg_potential = torch.where(absorb[:, None], _absorbed(trg_potential, log_v, log_b, eps), trg_potential)
            if ids.numel() == batch and bool(absorb.all()):  # every pair (e.g. a batch of one): in place
                _scaled_gap(cost, src_potential, trg_potential, eps, layout, out=kernel).exp_()
            else:
                fresh = torch.where(absorb)[0]
                kernel[fresh] = _scaled_gap(
                    cost[ids[fresh]], src_potential[fresh], trg_potential[fresh], eps, layout.pairs(fresh)
                ).exp_()
            log_u = log_u.masked_fill(absorb[:, None], 0.0)
            log_v = log_v.masked_fill(absorb[:, None], 0.0)
        finished = calm | (done_iterations >= max_iter)
        if not bool(finished.any()):
            continue
        rows = ids[finished]
        iterations[rows], converged[rows] = done_iterations, calm[finished]
        final_src[rows] = _absorbed(src_potential[finished], log_u[finished], log_a[finished], eps)
        final_trg[rows] = _absorbed(trg_potential[finished], log_v[finished], log_b[finished], eps)
        scalings = log_u.exp()[:, :, None], layout.trg(log_v.exp())
        if kernel is plan and bool(finished.all()):  # every pair of the batch at once: scale in place
            plan.mul_(scalings[0]).mul_(scalings[1])
            break
        plan[rows] = kernel[finished] * scalings[0][finished] * scalings[1][finished]
        keep = ~finished
        ids, kernel, log_a, log_b, layout = ids[keep], kernel[keep], log_a[keep], log_b[keep], layout.pairs(keep)
        src_potential, trg_potential, log_u, log_v = src_potential[keep], trg_potential[keep], log_u[keep], log_v[keep]
    return SinkhornResult(
        plan=plan, src_potential=final_src, trg_potential=final_trg, iterations=iterations, converged=converged
    )
