"""Inverse Hessian-vector-product solvers for influence functions.

Every solver works on a linear operator ``A`` of size ``dim x dim`` that is only
available through a function ``matvec(X) -> A @ X`` acting on a block ``X`` of shape
``(dim, m)``.  All right-hand sides of a solve are processed together: the iterative
solvers issue exactly one ``matvec`` call per iteration, whatever ``m`` is, because a
matvec is a pass over a dataset and is by far the most expensive operation.  Only
the dense solver ever forms ``A``.  The module is pure torch and device-agnostic.

Choosing a solver:
    * ``dense``: small ``dim`` and checks.  Exact (LU), but forms ``A`` with
      ``dim`` matvec columns and needs O(dim^2) memory.
    * ``cg``: symmetric positive-definite ``A``: the fast variant, plain influence
      functions with damping, Gauss-Newton curvature.  Cheapest iterative method.
    * ``gmres`` / ``bicgstab``: any nonsingular ``A``, in particular the
      non-symmetric full/exact SAM-HIF matrices.  GMRES is the robust default;
      BiCGSTAB needs less memory (no Krylov basis) but two matvecs per step.
    * ``neumann`` / ``lissa``: the truncated series used by the paper (LiSSA is its
      stochastic minibatch form).  They need a scale above the spectral radius and
      diverge for indefinite matrices (a :class:`ConvergenceWarning` is issued).
    * ``arnoldi``: low-rank eigendecomposition of a symmetric ``A``; an
      approximation by design, cheap when many test/train vectors are solved.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "ConvergenceWarning",
    "InverseOperator",
    "Matvec",
    "SampledMatvec",
    "SolveResult",
    "SolverOptions",
    "arnoldi",
    "bicgstab",
    "cg",
    "dense_matrix",
    "gmres",
    "lissa",
    "neumann",
    "spectral_radius",
]

Matvec = Callable[[Tensor], Tensor]
"""``X (dim, m) -> A @ X (dim, m)``."""

SampledMatvec = Callable[[Tensor, int], Tensor]
"""``(X (dim, m), step) -> A_step @ X (dim, m)``, an unbiased estimate of ``A @ X``."""

METHODS = ("auto", "dense", "cg", "bicgstab", "gmres", "neumann", "lissa", "arnoldi")
"""Valid values of ``InverseOperator(method=...)``."""

# Relative Ritz residual below which the spectral-radius estimate stops early.
_POWER_RTOL = 1e-6
# Arnoldi steps per restart cycle of the spectral-radius estimate.
_POWER_WINDOW = 10
# A Neumann/LiSSA column whose relative residual exceeds this has diverged.
_DIVERGED = 1e10


class ConvergenceWarning(UserWarning):
    """A solve finished without reaching the requested tolerance.

    The message names the solver and the worst relative residual over the columns.
    """


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class SolverOptions:
    """Settings shared by all solvers.

    Attributes:
        tol: Target relative residual ``||A x - b|| / ||b||`` of every column.
        max_iter: Cap on the matvecs spent in the iterations of ``cg``,
            ``bicgstab`` and ``gmres`` (residual checks are not counted).
        restart: Restart length of GMRES (size of each Krylov basis).
        neumann_terms: ``J``, the number of series terms of ``neumann``.
        scale: Scale ``s`` of ``neumann``/``lissa``; must exceed the spectral
            radius of ``A``.  ``None`` uses ``1.1 *`` a power-iteration estimate.
        power_iters: Maximum power-iteration steps for the automatic scale.
        lissa_depth: Recursion depth of each LiSSA estimate.
        lissa_repeats: Number of independent LiSSA estimates that are averaged.
        rank: Number of eigenpairs kept by ``arnoldi``.
        krylov_dim: Krylov subspace size of ``arnoldi``; ``None`` means
            ``min(dim, 2 * rank + 10)``.  Must be at least ``rank``.
        chunk_size: Identity columns per matvec call when forming ``A`` densely.
        dense_max_dim: ``method="auto"`` uses the dense solver when
            ``dim <= dense_max_dim`` (0 disables it).
        seed: Seed of the power-iteration and Arnoldi start vectors.

    Raises:
        ValueError: If a field has an invalid type or value; the message names
            the field and what was expected.
    """

    tol: float = 1e-6
    max_iter: int = 1000
    restart: int = 50
    neumann_terms: int = 1000
    scale: float | None = None
    power_iters: int = 100
    lissa_depth: int = 1000
    lissa_repeats: int = 1
    rank: int = 50
    krylov_dim: int | None = None
    chunk_size: int = 256
    dense_max_dim: int = 5000
    seed: int = 0

    def __post_init__(self) -> None:
        for name in (
            "max_iter",
            "restart",
            "neumann_terms",
            "power_iters",
            "lissa_depth",
            "lissa_repeats",
            "rank",
            "chunk_size",
        ):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name in ("dense_max_dim", "seed"):
            value = getattr(self, name)
            if not _is_int(value) or value < 0:
                raise ValueError(f"{name} must be a non-negative int, got {value!r}")
        if not _is_real(self.tol) or not (0 < self.tol < math.inf):
            raise ValueError(f"tol must be a finite float > 0, got {self.tol!r}")
        if self.scale is not None and (not _is_real(self.scale) or not (0 < self.scale < math.inf)):
            raise ValueError(f"scale must be None or a finite float > 0, got {self.scale!r}")
        if self.krylov_dim is not None and (
            not _is_int(self.krylov_dim) or self.krylov_dim < self.rank
        ):
            raise ValueError(
                f"krylov_dim must be None or an int >= rank ({self.rank}), got {self.krylov_dim!r}"
            )


class SolveResult(NamedTuple):
    """Result of a solve.

    Attributes:
        x: Solution, same shape, dtype and device as ``b``.
        residual: ``(m,)`` relative residuals ``||A x - b|| / ||b||`` of the
            columns (0 where ``b`` is zero, NaN when not computable).
        iterations: Matvecs spent in the iterations (residual checks and
            power-iteration steps excluded).
    """

    x: Tensor
    residual: Tensor
    iterations: int


# --------------------------------------------------------------------------- helpers


def _as_2d(b: Tensor, name: str = "b") -> tuple[Tensor, bool]:
    """Return ``b`` as a detached ``(dim, m)`` tensor and whether it was 1-D."""
    if not isinstance(b, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(b).__name__}")
    if b.ndim not in (1, 2):
        raise ValueError(f"{name} must have shape (dim,) or (dim, m), got {b.shape}")
    if not b.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {b.dtype}")
    b = b.detach()
    return (b.unsqueeze(1), True) if b.ndim == 1 else (b, False)


def _restore(x: Tensor, vector: bool) -> Tensor:
    return x.squeeze(1) if vector else x


def _apply(matvec: Callable[..., Tensor], x: Tensor, *args: int) -> Tensor:
    """Call ``matvec(x, *args)`` on a ``(dim, k)`` block and check the result."""
    out = matvec(x, *args)
    if not isinstance(out, Tensor) or out.shape != x.shape:
        shape = getattr(out, "shape", type(out).__name__)
        raise ValueError(
            f"matvec must map a ({x.shape[0]}, {x.shape[1]}) tensor to the same shape, got {shape}"
        )
    return out.detach().to(x.dtype)


def _colnorm(x: Tensor) -> Tensor:
    return torch.linalg.vector_norm(x, dim=0)


def _coldot(x: Tensor, y: Tensor) -> Tensor:
    return (x * y).sum(dim=0)


def _safe_div(num: Tensor, den: Tensor) -> Tensor:
    """``num / den`` with 0 where ``den == 0``."""
    ok = den != 0
    return torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), 0.0)


def _relative(r: Tensor, bnorm: Tensor) -> Tensor:
    """Relative residual norms per column, 0 where ``bnorm == 0``."""
    return _safe_div(_colnorm(r), bnorm)


def _hint(name: str, worst: float = math.nan) -> str:
    if name in ("neumann", "lissa"):
        if not worst <= 1.0:
            return (
                "; the series diverges unless the scale exceeds the spectral radius "
                "and A is positive definite (indefinite matrices need gmres/bicgstab)"
            )
        terms = "neumann_terms" if name == "neumann" else "lissa_depth"
        return f"; the series converges slowly for ill-conditioned A: raise {terms} or use cg/gmres"
    if name == "dense":
        return "; the matrix is singular or very ill-conditioned"
    if name == "cg":
        return "; cg needs a symmetric positive-definite matrix, or raise max_iter"
    return "; raise max_iter or loosen tol"


def _check_convergence(
    name: str, residual: Tensor, tol: float, iterations: int, stacklevel: int = 3
) -> None:
    """Warn with :class:`ConvergenceWarning` when a column misses ``tol``."""
    if residual.numel() == 0 or bool((residual <= tol).all()):
        return
    bad = residual[~(residual <= tol)]
    worst = math.nan if bool(bad.isnan().any()) else float(bad.max())
    warnings.warn(
        f"{name} did not converge: worst relative residual {worst:.3e} > "
        f"tol {tol:.1e} after {iterations} iterations{_hint(name, worst)}",
        ConvergenceWarning,
        stacklevel=stacklevel,
    )


def _random_start(dim: int, dtype: torch.dtype, device, seed: int) -> Tensor:
    """Seeded unit vector ``(dim, 1)``, identical on every device."""
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(dim, 1, generator=gen, dtype=torch.float64)
    v = v.to(device=device, dtype=dtype)
    return v / _colnorm(v)


# --------------------------------------------------------------------------- dense


def dense_matrix(
    matvec: Matvec,
    dim: int,
    *,
    dtype: torch.dtype,
    device: torch.device | str,
    chunk_size: int = 256,
) -> Tensor:
    """Form ``A`` by applying ``matvec`` to blocks of identity columns.

    Args:
        matvec: ``X (dim, k) -> A @ X (dim, k)``.
        dim: Size of ``A``.
        dtype: dtype of the identity blocks and of the result.
        device: Device of the identity blocks and of the result.
        chunk_size: Identity columns per matvec call (``ceil(dim / chunk_size)``
            calls in total).

    Returns:
        ``A`` of shape ``(dim, dim)``.
    """
    if not _is_int(dim) or dim < 1:
        raise ValueError(f"dim must be a positive int, got {dim!r}")
    if not _is_int(chunk_size) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    a = torch.empty(dim, dim, dtype=dtype, device=device)
    for start in range(0, dim, chunk_size):
        stop = min(start + chunk_size, dim)
        eye = torch.zeros(dim, stop - start, dtype=dtype, device=device)
        cols = torch.arange(stop - start, device=device)
        eye[cols + start, cols] = 1
        a[:, start:stop] = _apply(matvec, eye)
    return a


# --------------------------------------------------------------------------- Krylov


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
        active = nonzero & (residual > options.tol)
        if not bool(active.any()):
            break
        ia = active.nonzero().squeeze(1)
        xa, used = cycle(
            matvec,
            x[:, ia].clone(),
            r[:, ia].clone(),
            bnorm[ia],
            options.tol,
            options.max_iter - iterations,
            **kwargs,
        )
        iterations += used
        x[:, ia] = xa
        ra = bb[:, ia] - _apply(matvec, xa)
        r[:, ia] = ra
        residual[ia] = _relative(ra, bnorm[ia])
    _check_convergence(name, residual, options.tol, iterations, stacklevel=4)
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


# --------------------------------------------------------------------------- series


def spectral_radius(
    matvec: Matvec,
    dim: int,
    *,
    dtype: torch.dtype,
    device: torch.device | str,
    iters: int = 100,
    seed: int = 0,
) -> float:
    """Estimate ``max |eigenvalue|`` of ``A`` by (Krylov-accelerated) power iteration.

    Plain power iteration converges slowly when the top eigenvalues are clustered,
    so the power iterates are accelerated by a restarted Arnoldi process: cycles
    of up to 10 steps (one ``(dim, 1)`` matvec each, 11 stored vectors), each
    restarted from the Ritz vector of largest modulus.  The estimate is the largest
    Ritz value modulus; it stops before ``iters`` matvecs when that Ritz pair's
    residual ``||A y - theta y||`` falls below ``1e-6 |theta|`` or the Krylov space
    is invariant.  For a symmetric ``A`` the estimate never exceeds the spectral
    radius.

    Args:
        matvec: ``X (dim, k) -> A @ X (dim, k)``.
        dim: Size of ``A``.
        dtype: dtype of the iterates.
        device: Device of the iterates.
        iters: Maximum number of matvecs.
        seed: Seed of the random start vector.

    Returns:
        The estimate (0.0 for the zero matrix).
    """
    if not _is_int(iters) or iters < 1:
        raise ValueError(f"iters must be a positive int, got {iters!r}")
    if not _is_int(dim) or dim < 1:
        raise ValueError(f"dim must be a positive int, got {dim!r}")
    eps = torch.finfo(dtype).eps
    v = _random_start(dim, dtype, device, seed)
    window = min(_POWER_WINDOW, dim)
    estimate = 0.0
    used = 0
    while used < iters:
        k = min(window, iters - used)
        basis = torch.zeros(dim, k + 1, dtype=dtype, device=device)
        basis[:, :1] = v
        hess = torch.zeros(k + 1, k, dtype=torch.float64)
        ritz = torch.ones(1, dtype=torch.complex128)
        for j in range(k):
            w = _apply(matvec, basis[:, j : j + 1])
            used += 1
            w_norm = float(_colnorm(w))
            q = basis[:, : j + 1]
            h = q.mT @ w
            w = w - q @ h
            h2 = q.mT @ w
            w = w - q @ h2
            h_next = float(_colnorm(w))
            hess[: j + 1, j] = (h + h2).squeeze(1).to("cpu", torch.float64)
            hess[j + 1, j] = h_next
            values, vectors = torch.linalg.eig(hess[: j + 1, : j + 1])
            top = int(values.abs().argmax())
            estimate = float(values[top].abs())
            ritz = vectors[:, top]
            ritz_residual = h_next * float(ritz[-1].abs() / torch.linalg.norm(ritz))
            if not math.isfinite(estimate):
                return estimate
            if h_next <= 10 * eps * w_norm or ritz_residual <= _POWER_RTOL * estimate:
                return estimate
            basis[:, j + 1 : j + 2] = w / h_next
        # restart from the real (else imaginary) part of the top Ritz vector
        coef = ritz.real if bool(ritz.real.abs().sum() > 0) else ritz.imag
        v = basis[:, : coef.numel()] @ coef.to(device=device, dtype=dtype).unsqueeze(1)
        v = v / _colnorm(v)
    return estimate


def _scale(
    matvec: Matvec | None, options: SolverOptions, dim: int, dtype, device, name: str
) -> float:
    if options.scale is not None:
        return float(options.scale)
    if matvec is None:
        raise ValueError(f"{name} needs options.scale or an exact matvec to estimate it")
    radius = spectral_radius(
        matvec,
        dim,
        dtype=dtype,
        device=device,
        iters=options.power_iters,
        seed=options.seed,
    )
    if not (radius > 0 and math.isfinite(radius)):
        raise ValueError(
            f"{name}: power iteration gave spectral radius {radius}; pass options.scale explicitly"
        )
    return 1.1 * radius


def neumann(matvec: Matvec, b: Tensor, options: SolverOptions = SolverOptions()) -> SolveResult:
    """Truncated Neumann series ``A^{-1} b ~= (1/s) sum_{j=0}^{J} (I - A/s)^j b``.

    Computed by ``x_0 = b``, ``x_{j+1} = b + (I - A/s) x_j`` and returned as
    ``x_j / s``, with ``J = options.neumann_terms`` and
    ``s = options.scale or 1.1 * spectral_radius(A)``.  The series converges iff
    every eigenvalue ``l`` of ``A`` satisfies ``|1 - l/s| < 1``: ``A`` must be
    positive definite (positive real parts) and ``s`` above its spectral radius.

    The matvec ``A x_j`` of each step also gives the exact residual of ``x_j / s``
    (``A x_j / s - b = x_j - x_{j+1}``), so every term is checked for free and a
    column stops as soon as it reaches ``tol``.  Diverging columns stop once their
    residual exceeds ``1e10``.  At most ``J + 1`` matvecs are made.

    Args:
        matvec: ``X (dim, k) -> A @ X (dim, k)``.
        b: Right-hand side(s), shape ``(dim,)`` or ``(dim, m)``.
        options: Uses ``tol``, ``neumann_terms``, ``scale``, ``power_iters`` and
            ``seed``.

    Returns:
        ``SolveResult`` with ``x`` of the shape of ``b`` and the ``(m,)`` relative
        residuals (``iterations`` excludes power-iteration matvecs).

    Warns:
        ConvergenceWarning: If a column misses ``tol`` (in particular when the
            series diverges).
    """
    bb, vector = _as_2d(b)
    bnorm = _colnorm(bb)
    if not bool((bnorm > 0).any()):
        return SolveResult(_restore(bb.clone(), vector), torch.zeros_like(bnorm), 0)
    s = _scale(matvec, options, bb.shape[0], bb.dtype, bb.device, "neumann")
    x = bb.clone()
    residual = torch.zeros_like(bnorm)
    active = bnorm > 0
    iterations = 0
    for j in range(options.neumann_terms + 1):
        if not bool(active.any()):
            break
        ia = active.nonzero().squeeze(1)
        xa = x[:, ia]
        ra = _apply(matvec, xa) / s - bb[:, ia]  # residual of xa / s
        iterations += 1
        res = _relative(ra, bnorm[ia])
        residual[ia] = res
        going = (res > options.tol) & (res < _DIVERGED)
        if j < options.neumann_terms:
            x[:, ia] = torch.where(going, xa - ra, xa)
        active[ia] = going
    _check_convergence("neumann", residual, options.tol, iterations)
    return SolveResult(_restore(x / s, vector), residual, iterations)


def lissa(
    sampled_matvec: SampledMatvec,
    b: Tensor,
    options: SolverOptions = SolverOptions(),
    matvec: Matvec | None = None,
) -> SolveResult:
    """LiSSA (Agarwal et al., 2017): the stochastic minibatch Neumann series.

    Each estimate runs ``x_0 = b``, ``x_{j+1} = b + (I - A_j / s) x_j`` for
    ``j < lissa_depth`` where ``A_j @ X = sampled_matvec(X, step)`` is an unbiased
    minibatch estimate of ``A @ X``; the result ``x / s`` is averaged over
    ``lissa_repeats`` independent estimates.  ``step = repeat * lissa_depth + j``
    numbers the calls, so the caller draws the minibatch of a step from ``step``
    (and its own seed) and every step sees a fresh minibatch.  The scale ``s``
    must exceed the spectral radius of every ``A_j``.

    Args:
        sampled_matvec: ``(X (dim, k), step) -> A_step @ X (dim, k)``.
        b: Right-hand side(s), shape ``(dim,)`` or ``(dim, m)``.
        options: Uses ``tol``, ``scale``, ``lissa_depth``, ``lissa_repeats`` and,
            to estimate the scale, ``power_iters`` and ``seed``.
        matvec: Optional exact ``X -> A @ X``.  Used to estimate the scale when
            ``options.scale`` is None, and to compute the residual with one extra
            matvec.  Without it the residual is NaN and no convergence warning is
            issued (only a divergence to non-finite values is reported).

    Returns:
        ``SolveResult`` with ``x`` of the shape of ``b``; ``iterations`` is the
        number of ``sampled_matvec`` calls.

    Raises:
        ValueError: If ``options.scale`` is None and ``matvec`` is not given.

    Warns:
        ConvergenceWarning: If ``matvec`` is given and a column misses ``tol``, or
            if the recursion diverged to non-finite values.
    """
    bb, vector = _as_2d(b)
    s = _scale(matvec, options, bb.shape[0], bb.dtype, bb.device, "lissa")
    bnorm = _colnorm(bb)
    nonzero = bnorm > 0
    total = torch.zeros_like(bb)
    iterations = 0
    for repeat in range(options.lissa_repeats):
        x = bb.clone()
        for j in range(options.lissa_depth):
            step = repeat * options.lissa_depth + j
            x = bb + x - _apply(sampled_matvec, x, step) / s
            iterations += 1
        total += x
    x = torch.where(nonzero, total / (options.lissa_repeats * s), 0.0)
    if matvec is not None:
        residual = _relative(_apply(matvec, x) - bb, bnorm)
        _check_convergence("lissa", residual, options.tol, iterations)
    else:
        residual = torch.full_like(bnorm, math.nan)
        if not bool(torch.isfinite(x).all()):
            warnings.warn(
                "lissa diverged to non-finite values: worst relative residual inf" + _hint("lissa"),
                ConvergenceWarning,
                stacklevel=2,
            )
    return SolveResult(_restore(x, vector), residual, iterations)


# --------------------------------------------------------------------------- arnoldi


def arnoldi(
    matvec: Matvec,
    dim: int,
    *,
    dtype: torch.dtype,
    device: torch.device | str,
    options: SolverOptions = SolverOptions(),
) -> tuple[Tensor, Tensor]:
    """Low-rank eigendecomposition of a symmetric ``A`` (Arnoldi/Lanczos).

    Runs ``krylov_dim`` Arnoldi steps (one ``(dim, 1)`` matvec each) from a seeded
    random start with full (twice repeated) reorthogonalisation, then
    diagonalises the symmetrised projected matrix ``Q^T A Q``.  If the Krylov
    space becomes invariant early, the process continues from a fresh random
    vector orthogonal to the basis, so ``krylov_dim`` vectors are always built.

    What is kept: the ``rank`` algebraically LARGEST Ritz values, in descending
    order, like Captum's ``ArnoldiInfluenceFunction`` (which keeps the top
    eigenvalues).  For a positive semi-definite ``A`` these are the eigenvalues of
    largest magnitude; for an indefinite ``A`` large negative eigenvalues are only
    kept if fewer than ``rank`` eigenvalues are larger.

    Args:
        matvec: ``X (dim, k) -> A @ X (dim, k)``; ``A`` must be symmetric.
        dim: Size of ``A``.
        dtype: dtype of the basis and results.
        device: Device of the basis and results.
        options: Uses ``rank``, ``krylov_dim`` (default ``min(dim, 2 rank + 10)``)
            and ``seed``.

    Returns:
        ``(eigenvalues, eigenvectors)`` of shapes ``(r,)`` and ``(dim, r)`` with
        ``r = min(rank, dim)``; eigenvectors are orthonormal columns.
    """
    if not _is_int(dim) or dim < 1:
        raise ValueError(f"dim must be a positive int, got {dim!r}")
    k = min(dim, options.krylov_dim or 2 * options.rank + 10)
    rank = min(options.rank, k)
    eps = torch.finfo(dtype).eps
    basis = torch.zeros(dim, k, dtype=dtype, device=device)
    hess = torch.zeros(k, k, dtype=dtype, device=device)
    basis[:, :1] = _random_start(dim, dtype, device, options.seed)
    restarts = 0
    for j in range(k):
        w = _apply(matvec, basis[:, j : j + 1])
        w_norm = float(_colnorm(w))
        q = basis[:, : j + 1]
        h = q.T @ w
        w = w - q @ h
        h2 = q.T @ w
        w = w - q @ h2
        hess[: j + 1, j] = (h + h2).squeeze(1)
        if j + 1 == k:
            break
        h_next = float(_colnorm(w))
        if h_next > 10 * eps * w_norm:
            hess[j + 1, j] = h_next
            basis[:, j + 1 : j + 2] = w / h_next
            continue
        # invariant subspace: continue from a new random orthogonal direction
        for _ in range(100):
            restarts += 1
            v = _random_start(dim, dtype, device, options.seed + restarts)
            for _ in range(2):
                v = v - q @ (q.T @ v)
            v_norm = float(_colnorm(v))
            if v_norm > 1e-3:
                break
        else:
            raise RuntimeError("arnoldi: could not extend the Krylov basis")
        basis[:, j + 1 : j + 2] = v / v_norm
    # Q^T A Q is symmetric: its upper triangle (all inner products q_i^T A q_j,
    # i <= j, computed with reorthogonalisation) determines it.
    upper = torch.triu(hess)
    small = upper + torch.triu(hess, 1).mT
    values, vectors = torch.linalg.eigh(small)
    order = torch.argsort(values, descending=True)[:rank]
    return values[order], basis @ vectors[:, order]


# --------------------------------------------------------------------------- operator


class InverseOperator:
    """Applies ``A^{-1}`` and ``A^{-T}`` with one chosen method.

    Built once, used many times: the dense matrix and its LU factors, the Arnoldi
    eigendecomposition and the Neumann/LiSSA scale are computed lazily on the
    first solve and reused.

    Args:
        matvec: ``X (dim, m) -> A @ X (dim, m)``.
        dim: Size of ``A``.
        method: One of ``METHODS``.  ``"auto"`` picks ``"dense"`` when
            ``dim <= options.dense_max_dim``, else ``"cg"`` if ``symmetric`` and
            ``"gmres"`` otherwise.
        symmetric: Whether ``A`` is symmetric (required, keyword only).
        rmatvec: ``X -> A^T @ X``; required when ``symmetric`` is False, ignored
            (``matvec`` is used) when it is True.
        sampled_matvec: ``(X, step) -> A_step @ X`` minibatch estimate; required
            for ``"lissa"``.
        sampled_rmatvec: Same for ``A^T``; required for ``"lissa"`` when not
            ``symmetric``.
        options: Solver settings.
        dtype: dtype used to form the dense matrix, the Arnoldi basis and the
            power-iteration vector.
        device: Device used for the same.

    Attributes:
        method: The resolved method (never ``"auto"``).
        last_residual: ``(m,)`` relative residuals ``||A x - b|| / ||b||`` of the
            last solve (NaN for LiSSA without exact residual), or None.
        last_iterations: Matvecs spent in the iterations of the last solve (0 for
            dense and arnoldi, whose one-time setup is not counted), or None.

    Notes:
        * dense: ``A`` is formed with ``ceil(dim / chunk_size)`` matvec calls and
          LU-factorised once; the residual is computed exactly from ``A``.  A
          :class:`ConvergenceWarning` is issued if it exceeds ``tol`` (singular
          or very ill-conditioned ``A``).
        * arnoldi: ``A^{-1} b ~= V diag(1/l) V^T b`` over the kept eigenpairs with
          ``l > 0`` (non-positive Ritz values are dropped, as in Captum).  The
          residual costs one extra matvec, is stored but never warned about: the
          method is a low-rank approximation by design.
        * cg, bicgstab, gmres, neumann, lissa: warn with
          :class:`ConvergenceWarning` when a column misses ``tol``.  LiSSA
          computes its residual with the exact ``matvec`` (one extra pass).

    Raises:
        ValueError: Unknown ``method``; ``"cg"``/``"arnoldi"`` with
            ``symmetric=False``; missing ``rmatvec`` for a non-symmetric ``A``;
            missing sampled matvecs for ``"lissa"``.
    """

    def __init__(
        self,
        matvec: Matvec,
        dim: int,
        *,
        method: str = "auto",
        symmetric: bool,
        rmatvec: Matvec | None = None,
        sampled_matvec: SampledMatvec | None = None,
        sampled_rmatvec: SampledMatvec | None = None,
        options: SolverOptions = SolverOptions(),
        dtype: torch.dtype = torch.float64,
        device: torch.device | str = "cpu",
    ) -> None:
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; valid methods are {', '.join(METHODS)}")
        if not _is_int(dim) or dim < 1:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        if not isinstance(options, SolverOptions):
            raise TypeError("options must be a SolverOptions")
        if method == "auto":
            if dim <= options.dense_max_dim:
                method = "dense"
            else:
                method = "cg" if symmetric else "gmres"
        if not symmetric and method in ("cg", "arnoldi"):
            raise ValueError(
                f"method {method!r} requires a symmetric matrix, but the matrix is "
                "not symmetric (symmetric=False); use 'gmres' or 'bicgstab' "
                "(or 'dense' for small dim)"
            )
        if not symmetric and rmatvec is None:
            raise ValueError(
                "rmatvec (X -> A^T @ X) is required when the matrix is not "
                "symmetric (symmetric=False)"
            )
        if method == "lissa":
            if sampled_matvec is None:
                raise ValueError("method 'lissa' requires sampled_matvec")
            if not symmetric and sampled_rmatvec is None:
                raise ValueError(
                    "method 'lissa' with a non-symmetric matrix requires sampled_rmatvec"
                )
        self.matvec = matvec
        self.rmatvec = matvec if symmetric else rmatvec
        self.sampled_matvec = sampled_matvec
        self.sampled_rmatvec = sampled_matvec if symmetric else sampled_rmatvec
        self.dim = dim
        self.method = method
        self.symmetric = symmetric
        self.options = options
        self.dtype = dtype
        self.device = torch.device(device)
        self.last_residual: Tensor | None = None
        self.last_iterations: int | None = None
        self._dense: Tensor | None = None
        self._lu: tuple[Tensor, Tensor] | None = None
        self._eig: tuple[Tensor, Tensor] | None = None
        self._scale: float | None = options.scale

    def __repr__(self) -> str:
        return (
            f"InverseOperator(dim={self.dim}, method={self.method!r}, "
            f"symmetric={self.symmetric}, options={self.options!r})"
        )

    def matrix(self) -> Tensor:
        """Return the dense ``A`` (dense method only; formed on first use).

        Returns:
            ``A`` of shape ``(dim, dim)``.
        """
        if self.method != "dense":
            raise RuntimeError(
                f"matrix() is only available for method 'dense', not {self.method!r}"
            )
        if self._dense is None:
            self._dense = dense_matrix(
                self.matvec,
                self.dim,
                dtype=self.dtype,
                device=self.device,
                chunk_size=self.options.chunk_size,
            )
        return self._dense

    def solve(self, b: Tensor) -> Tensor:
        """Apply ``A^{-1}``.

        Args:
            b: Shape ``(dim,)`` or ``(dim, m)``.

        Returns:
            ``A^{-1} b`` with the shape, dtype and device of ``b``.
        """
        return self._solve(b, transpose=False)

    def solve_transpose(self, b: Tensor) -> Tensor:
        """Apply ``A^{-T}``.

        Args:
            b: Shape ``(dim,)`` or ``(dim, m)``.

        Returns:
            ``A^{-T} b`` with the shape, dtype and device of ``b``.
        """
        return self._solve(b, transpose=True)

    # ------------------------------------------------------------------ internals

    def _factors(self) -> tuple[Tensor, Tensor]:
        if self._lu is None:
            a = self.matrix()
            lu, pivots, info = torch.linalg.lu_factor_ex(a)
            if int(info) != 0:
                raise RuntimeError(
                    "dense: the matrix is singular (zero pivot in the LU "
                    "factorisation); add damping or use an iterative method"
                )
            self._lu = (lu, pivots)
        return self._lu

    def _eigenpairs(self) -> tuple[Tensor, Tensor]:
        if self._eig is None:
            values, vectors = arnoldi(
                self.matvec,
                self.dim,
                dtype=self.dtype,
                device=self.device,
                options=self.options,
            )
            inverse = torch.where(values > 0, 1 / values, 0.0)
            self._eig = (inverse, vectors)
        return self._eig

    def _series_options(self, matvec: Matvec) -> SolverOptions:
        if self._scale is None:
            self._scale = _scale(
                matvec, self.options, self.dim, self.dtype, self.device, self.method
            )
        return replace(self.options, scale=self._scale)

    def _solve(self, b: Tensor, *, transpose: bool) -> Tensor:
        bb, vector = _as_2d(b)
        if bb.shape[0] != self.dim:
            raise ValueError(f"b must have {self.dim} rows (dim), got shape {tuple(b.shape)}")
        mv = self.rmatvec if transpose else self.matvec
        assert mv is not None
        method = self.method
        if method in ("dense", "arnoldi"):
            work = bb.to(device=self.device, dtype=self.dtype)
            bnorm = _colnorm(work)
            if method == "dense":
                lu, pivots = self._factors()
                x = torch.linalg.lu_solve(lu, pivots, work, adjoint=transpose)
                a = self.matrix()
                ax = (a.mT if transpose else a) @ x
            else:
                inverse, vectors = self._eigenpairs()
                x = vectors @ (inverse.unsqueeze(1) * (vectors.mT @ work))
                ax = _apply(mv, x)
            residual = _relative(ax - work, bnorm)
            if method == "dense":
                _check_convergence("dense", residual, self.options.tol, 0, 4)
            x = x.to(device=bb.device, dtype=bb.dtype)
            result = SolveResult(x, residual.to(bb.device), 0)
        elif method == "cg":
            result = cg(mv, bb, self.options)
        elif method == "bicgstab":
            result = bicgstab(mv, bb, self.options)
        elif method == "gmres":
            result = gmres(mv, bb, self.options)
        elif method == "neumann":
            result = neumann(mv, bb, self._series_options(mv))
        else:  # lissa
            smv = self.sampled_rmatvec if transpose else self.sampled_matvec
            assert smv is not None
            result = lissa(smv, bb, self._series_options(mv), matvec=mv)
        self.last_residual = result.residual
        self.last_iterations = result.iterations
        return _restore(result.x, vector)
