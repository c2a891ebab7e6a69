"""Shared pieces of the solvers: settings, results, warnings and column helpers.

Holds what every solver needs: the :class:`SolverOptions` settings, the
:class:`SolveResult` it returns, the :class:`ConvergenceWarning` it issues, the
``Matvec`` type aliases, and the private column-wise helpers (shape checks,
per-column norms and dot products, safe division, relative residuals,
convergence warnings and the seeded random start vector).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from captum_sam.core.errors import user_stacklevel

Matvec = Callable[[Tensor], Tensor]
"""``X (dim, m) -> A @ X (dim, m)``."""

SampledMatvec = Callable[[Tensor, int], Tensor]
"""``(X (dim, m), step) -> A_step @ X (dim, m)``, an unbiased estimate of ``A @ X``."""


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
            ``None`` (default) picks it from the dtype of ``b``: ``1e-6`` in
            float64, ``1e-4`` in float32 and ``1e-2`` in 16-bit floats, so that
            rounding alone (a float32 dense solve of a well-conditioned matrix
            leaves residuals of a few ``1e-6``) does not count as failure.
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

    tol: float | None = None
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
        if self.tol is not None and (not _is_real(self.tol) or not (0 < self.tol < math.inf)):
            raise ValueError(f"tol must be None or a finite float > 0, got {self.tol!r}")
        if self.scale is not None and (not _is_real(self.scale) or not (0 < self.scale < math.inf)):
            raise ValueError(f"scale must be None or a finite float > 0, got {self.scale!r}")
        if self.krylov_dim is not None and (
            not _is_int(self.krylov_dim) or self.krylov_dim < self.rank
        ):
            raise ValueError(
                f"krylov_dim must be None or an int >= rank ({self.rank}), got {self.krylov_dim!r}"
            )

    def tolerance(self, dtype: torch.dtype) -> float:
        """``tol``, or the default for ``dtype`` when ``tol`` is ``None``."""
        if self.tol is not None:
            return float(self.tol)
        if dtype == torch.float64 or dtype == torch.complex128:
            return 1e-6
        if dtype == torch.float32 or dtype == torch.complex64:
            return 1e-4
        return 1e-2


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


def _check_convergence(name: str, residual: Tensor, tol: float, iterations: int) -> None:
    """Warn with :class:`ConvergenceWarning` when a column misses ``tol``.

    Raises:
        ValueError: A residual is NaN: a norm overflowed (the right-hand side or the
            iterates), so the returned solution means nothing.
    """
    if residual.numel() == 0 or bool((residual <= tol).all()):
        return
    bad = residual[~(residual <= tol)]
    if bool(bad.isnan().any()):
        raise ValueError(
            f"{name}: the relative residual is NaN after {iterations} iterations: a norm "
            "of the right-hand side or of the iterates overflowed (check the scale of "
            "the inputs, or use float64), so no solution is returned"
        )
    worst = float(bad.max())
    warnings.warn(
        f"{name} did not converge: worst relative residual {worst:.3e} > "
        f"tol {tol:.1e} after {iterations} iterations{_hint(name, worst)}",
        ConvergenceWarning,
        stacklevel=user_stacklevel(),
    )


def _random_start(dim: int, dtype: torch.dtype, device, seed: int) -> Tensor:
    """Seeded unit vector ``(dim, 1)``, identical on every device."""
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(dim, 1, generator=gen, dtype=torch.float64)
    v = v.to(device=device, dtype=dtype)
    return v / _colnorm(v)
