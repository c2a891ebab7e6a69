"""Krylov solvers: conjugate gradient, BiCGSTAB and restarted GMRES.

Each solver runs batched cycles over the unconverged columns (one matvec per
step for all of them) and is restarted from the true residual, recomputed with
one extra matvec after every cycle, until every column reaches ``tol`` or the
``max_iter`` budget is spent.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from captum_sam.solvers._common import (
    Matvec,
    SolveResult,
    SolverOptions,
    _apply,
    _as_2d,
    _check_convergence,
    _coldot,
    _colnorm,
    _relative,
    _restore,
    _safe_div,
)


def _cg_cycle(
    matvec: Matvec, x: Tensor, r: Tensor, bnorm: Tensor, tol: float, budget: int
) -> tuple[Tensor, int]:
    """CG from residual ``r`` until the recursive residuals reach ``tol``."""
    p = r.clone()
    rr = _coldot(r, r)
    active = _safe_div(rr.sqrt(), bnorm) > tol
    used = 0
    while used < budget and bool(active.any()):
        ia = active.nonzero().squeeze(1)
        pa = p[:, ia]
        ap = _apply(matvec, pa)
        used += 1
        curv = _coldot(pa, ap)
        alpha = _safe_div(rr[ia], curv)
        x[:, ia] += alpha * pa
        ra = r[:, ia] - alpha * ap
        rr_new = _coldot(ra, ra)
        beta = _safe_div(rr_new, rr[ia])
        r[:, ia] = ra
        p[:, ia] = ra + beta * pa
        rr[ia] = rr_new
        # curv == 0 means no progress is possible from this direction: stop.
        active[ia] = (_safe_div(rr_new.sqrt(), bnorm[ia]) > tol) & (curv != 0)
    return x, used


def _bicgstab_cycle(
    matvec: Matvec, x: Tensor, r: Tensor, bnorm: Tensor, tol: float, budget: int
) -> tuple[Tensor, int]:
    """BiCGSTAB from residual ``r`` (shadow residual ``r``) until ``tol``."""
    m = r.shape[1]
    shadow = r.clone()
    ones = torch.ones(m, dtype=r.dtype, device=r.device)
    rho, alpha, omega = ones.clone(), ones.clone(), ones.clone()
    p = torch.zeros_like(r)
    v = torch.zeros_like(r)
    active = _relative(r, bnorm) > tol
    used = 0
    while used < budget and bool(active.any()):
        ia = active.nonzero().squeeze(1)
        ra, sh = r[:, ia], shadow[:, ia]
        rho_new = _coldot(sh, ra)
        beta = _safe_div(rho_new, rho[ia]) * _safe_div(alpha[ia], omega[ia])
        pa = ra + beta * (p[:, ia] - omega[ia] * v[:, ia])
        va = _apply(matvec, pa)
        used += 1
        alpha_a = _safe_div(rho_new, _coldot(sh, va))
        s = ra - alpha_a * va
        half_done = _relative(s, bnorm[ia]) <= tol
        if used < budget and not bool(half_done.all()):
            t = _apply(matvec, s)
            used += 1
            omega_a = torch.where(half_done, 0.0, _safe_div(_coldot(t, s), _coldot(t, t)))
        else:  # finish with the half step only
            t = torch.zeros_like(s)
            omega_a = torch.zeros_like(alpha_a)
        x[:, ia] += alpha_a * pa + omega_a * s
        r_new = s - omega_a * t
        r[:, ia] = r_new
        p[:, ia] = pa
        v[:, ia] = va
        rho[ia], alpha[ia], omega[ia] = rho_new, alpha_a, omega_a
        # rho == 0 or omega == 0 is a breakdown: the outer loop restarts.
        breakdown = (rho_new == 0) | (omega_a == 0) | (alpha_a == 0)
        active[ia] = (_relative(r_new, bnorm[ia]) > tol) & ~breakdown
    return x, used


def _gmres_cycle(
    matvec: Matvec,
    x: Tensor,
    r: Tensor,
    bnorm: Tensor,
    tol: float,
    budget: int,
    restart: int,
) -> tuple[Tensor, int]:
    """One GMRES(restart) cycle, batched over columns.

    Each column has its own Arnoldi basis and Hessenberg matrix; the Hessenberg
    matrices are reduced to triangular form by batched Givens rotations, which also
    give the residual estimates used to stop the cycle early.
    """
    dim, m = r.shape
    k = min(restart, budget)
    dtype, device = r.dtype, r.device
    eps = torch.finfo(dtype).eps
    beta = _colnorm(r)
    # basis[c, i] is the i-th Arnoldi vector of column c (contiguous per column)
    basis = torch.zeros(m, k + 1, dim, dtype=dtype, device=device)
    basis[:, 0] = _safe_div(r, beta).mT
    tri = torch.zeros(m, k, k, dtype=dtype, device=device)  # rotated Hessenberg
    cs = torch.zeros(m, k, dtype=dtype, device=device)
    sn = torch.zeros(m, k, dtype=dtype, device=device)
    g = torch.zeros(m, k + 1, dtype=dtype, device=device)
    g[:, 0] = beta
    steps = torch.zeros(m, dtype=torch.long, device=device)  # usable steps
    broken = beta == 0
    n = 0
    for j in range(k):
        w = _apply(matvec, basis[:, j].mT.contiguous()).mT.unsqueeze(2)  # (m, dim, 1)
        n = j + 1
        w_norm = torch.linalg.vector_norm(w, dim=(1, 2))
        # classical Gram-Schmidt, twice (numerically as good as modified GS)
        v = basis[:, : j + 1]  # (m, j + 1, dim)
        h = v @ w
        w = w - v.mT @ h
        h2 = v @ w
        w = w - v.mT @ h2
        h = (h + h2).squeeze(2)  # (m, j + 1)
        w = w.squeeze(2)  # (m, dim)
        h_next = torch.linalg.vector_norm(w, dim=1)
        lucky = h_next <= 10 * eps * w_norm
        basis[:, j + 1] = torch.where(lucky.unsqueeze(1), 0.0, _safe_div(w, h_next.unsqueeze(1)))
        h_next = torch.where(lucky, 0.0, h_next)
        col = torch.cat([h, h_next.unsqueeze(1)], dim=1)  # (m, j + 2)
        for i in range(j):
            top = cs[:, i] * col[:, i] + sn[:, i] * col[:, i + 1]
            col[:, i + 1] = -sn[:, i] * col[:, i] + cs[:, i] * col[:, i + 1]
            col[:, i] = top
        a, c = col[:, j], col[:, j + 1]
        den = torch.hypot(a, c)
        ok = den > 0
        cs[:, j] = torch.where(ok, _safe_div(a, den), 1.0)
        sn[:, j] = torch.where(ok, _safe_div(c, den), 0.0)
        col[:, j] = den
        tri[:, : j + 1, j] = col[:, : j + 1]
        g[:, j + 1] = -sn[:, j] * g[:, j]
        g[:, j] = cs[:, j] * g[:, j]
        valid = ok & ~broken
        steps = torch.where(valid, j + 1, steps)
        broken = broken | ~valid | lucky
        estimate = _safe_div(g[:, j + 1].abs(), bnorm)
        if bool((broken | (estimate <= tol)).all()):
            break
    # Solve the triangular systems; steps past a column's breakdown are masked
    # out with an identity block so the batched solve stays well defined.
    idx = torch.arange(n, device=device)
    unused = idx.unsqueeze(0) >= steps.unsqueeze(1)  # (m, n)
    keep = ~(unused.unsqueeze(2) | unused.unsqueeze(1))
    rmat = torch.where(keep, tri[:, :n, :n], 0.0) + torch.diag_embed(unused.to(dtype))
    rhs = torch.where(unused, 0.0, g[:, :n]).unsqueeze(2)
    y = torch.linalg.solve_triangular(rmat, rhs, upper=True).squeeze(2)  # (m, n)
    x += (y.unsqueeze(1) @ basis[:, :n]).squeeze(1).mT
    return x, n


def _krylov(
    name: str,
    cycle: Callable[..., tuple[Tensor, int]],
    matvec: Matvec,
    b: Tensor,
    options: SolverOptions,
    x0: Tensor | None,
    **kwargs: int,
) -> SolveResult:
    """Drive restarted Krylov cycles on the unconverged columns.

    After each cycle the true residual is recomputed with one extra matvec; the
    columns that still miss ``tol`` are restarted from it.
    """
    bb, vector = _as_2d(b)
    bnorm = _colnorm(bb)
    nonzero = bnorm > 0
    if x0 is None:
        x = torch.zeros_like(bb)
        r = bb.clone()
    else:
        x, _ = _as_2d(x0, "x0")
        if x.shape != bb.shape:
            raise ValueError(f"x0 must have the shape of b {tuple(b.shape)}")
        x = torch.where(nonzero, x.to(bb), 0.0)
        r = bb - _apply(matvec, x)
    residual = _relative(r, bnorm)
    iterations = 0
    while iterations < options.max_iter:
        active = nonzero & (residual > options.tolerance(bb.dtype))
        if not bool(active.any()):
            break
        ia = active.nonzero().squeeze(1)
        xa, used = cycle(
            matvec,
            x[:, ia].clone(),
            r[:, ia].clone(),
            bnorm[ia],
            options.tolerance(bb.dtype),
            options.max_iter - iterations,
            **kwargs,
        )
        iterations += used
        x[:, ia] = xa
        ra = bb[:, ia] - _apply(matvec, xa)
        r[:, ia] = ra
        residual[ia] = _relative(ra, bnorm[ia])
    _check_convergence(name, residual, options.tolerance(bb.dtype), iterations)
    return SolveResult(_restore(x, vector), residual, iterations)


def cg(
    matvec: Matvec,
    b: Tensor,
    options: SolverOptions = SolverOptions(),
    x0: Tensor | None = None,
) -> SolveResult:
    """Conjugate gradient for a symmetric positive-definite ``A``.

    All columns are iterated together (one matvec per iteration on the columns
    that have not converged yet).  When the recursive residuals reach
    ``options.tol`` the true residual is checked with one extra matvec and the
    columns that miss ``tol`` are restarted from it.

    Args:
        matvec: ``X (dim, k) -> A @ X (dim, k)``; ``A`` must be SPD.
        b: Right-hand side(s), shape ``(dim,)`` or ``(dim, m)``.
        options: Uses ``tol`` and ``max_iter``.
        x0: Optional initial guess, shape of ``b`` (costs one extra matvec).

    Returns:
        ``SolveResult`` with ``x`` of the shape of ``b`` and the ``(m,)`` true
        relative residuals (a 1-D ``b`` counts as ``m = 1``).

    Warns:
        ConvergenceWarning: If a column misses ``tol`` after ``max_iter``.
    """
    return _krylov("cg", _cg_cycle, matvec, b, options, x0)


def bicgstab(
    matvec: Matvec,
    b: Tensor,
    options: SolverOptions = SolverOptions(),
    x0: Tensor | None = None,
) -> SolveResult:
    """BiCGSTAB for any nonsingular ``A`` (symmetric or not).

    Each BiCGSTAB step costs two matvecs (each on all unconverged columns);
    ``options.max_iter`` and ``SolveResult.iterations`` count matvecs.  On a
    breakdown or when the recursive residual reaches ``tol``, the true residual is
    recomputed (one extra matvec) and the solve restarts from it if needed.

    Args:
        matvec: ``X (dim, k) -> A @ X (dim, k)``.
        b: Right-hand side(s), shape ``(dim,)`` or ``(dim, m)``.
        options: Uses ``tol`` and ``max_iter``.
        x0: Optional initial guess, shape of ``b`` (costs one extra matvec).

    Returns:
        ``SolveResult`` with ``x`` of the shape of ``b`` and the ``(m,)`` true
        relative residuals.

    Warns:
        ConvergenceWarning: If a column misses ``tol`` after ``max_iter`` matvecs.
    """
    return _krylov("bicgstab", _bicgstab_cycle, matvec, b, options, x0)


def gmres(
    matvec: Matvec,
    b: Tensor,
    options: SolverOptions = SolverOptions(),
    x0: Tensor | None = None,
) -> SolveResult:
    """Restarted GMRES(``options.restart``) for any nonsingular ``A``.

    The columns are vectorised: a batched Arnoldi process builds one Krylov basis
    per column (one matvec per step for all columns) and the per-column Hessenberg
    least-squares problems are solved together with batched Givens rotations.  A
    cycle stops early when every column's residual estimate is below ``tol``; the
    true residual is then recomputed with one extra matvec per cycle.  Memory is
    ``(restart + 1) * dim * m`` entries for the bases.

    Args:
        matvec: ``X (dim, k) -> A @ X (dim, k)``.
        b: Right-hand side(s), shape ``(dim,)`` or ``(dim, m)``.
        options: Uses ``tol``, ``max_iter`` (total Arnoldi steps) and ``restart``.
        x0: Optional initial guess, shape of ``b`` (costs one extra matvec).

    Returns:
        ``SolveResult`` with ``x`` of the shape of ``b`` and the ``(m,)`` true
        relative residuals.

    Warns:
        ConvergenceWarning: If a column misses ``tol`` after ``max_iter`` steps.
    """
    return _krylov("gmres", _gmres_cycle, matvec, b, options, x0, restart=options.restart)
