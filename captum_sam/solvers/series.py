"""Series solvers: the truncated Neumann series and LiSSA, and their scale.

Both approximate ``A^{-1} b`` by a power series in ``I - A/s``, which needs a scale
``s`` above the spectral radius of ``A``; :func:`spectral_radius` estimates it by a
Krylov-accelerated power iteration when ``SolverOptions.scale`` is not given.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor

from captum_sam.core.errors import user_stacklevel
from captum_sam.solvers._common import (
    ConvergenceWarning,
    Matvec,
    SampledMatvec,
    SolveResult,
    SolverOptions,
    _apply,
    _as_2d,
    _check_convergence,
    _colnorm,
    _hint,
    _is_int,
    _random_start,
    _relative,
    _restore,
)

# Relative Ritz residual below which the spectral-radius estimate stops early.
_POWER_RTOL = 1e-6
# Arnoldi steps per restart cycle of the spectral-radius estimate.
_POWER_WINDOW = 10
# A Neumann/LiSSA column whose relative residual exceeds this has diverged.
_DIVERGED = 1e10


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
        going = (res > options.tolerance(bb.dtype)) & (res < _DIVERGED)
        if j < options.neumann_terms:
            x[:, ia] = torch.where(going, xa - ra, xa)
        active[ia] = going
    _check_convergence("neumann", residual, options.tolerance(bb.dtype), iterations)
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
        _check_convergence("lissa", residual, options.tolerance(bb.dtype), iterations)
    else:
        residual = torch.full_like(bnorm, math.nan)
        if not bool(torch.isfinite(x).all()):
            warnings.warn(
                "lissa diverged to non-finite values: worst relative residual inf" + _hint("lissa"),
                ConvergenceWarning,
                stacklevel=user_stacklevel(),
            )
    return SolveResult(_restore(x, vector), residual, iterations)
