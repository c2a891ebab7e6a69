"""The :class:`InverseOperator`: ``A^{-1}`` and ``A^{-T}`` with one chosen method.

Resolves ``method="auto"``, checks that the method fits the matrix (symmetric or
not, sampled matvecs for LiSSA), computes the expensive one-time pieces (dense LU
factors, Arnoldi eigenpairs, series scale) lazily and dispatches every solve to the
solver functions of the other submodules.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch
from torch import Tensor

from captum_sam.solvers._common import (
    Matvec,
    SampledMatvec,
    SolveResult,
    SolverOptions,
    _apply,
    _as_2d,
    _check_convergence,
    _colnorm,
    _is_int,
    _relative,
    _restore,
)
from captum_sam.solvers.dense import dense_matrix
from captum_sam.solvers.krylov import bicgstab, cg, gmres
from captum_sam.solvers.lowrank import arnoldi
from captum_sam.solvers.series import _scale, lissa, neumann

METHODS = ("auto", "dense", "cg", "bicgstab", "gmres", "neumann", "lissa", "arnoldi")
"""Valid values of ``InverseOperator(method=...)``."""


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
        dense_builder: ``() -> A`` formed some cheaper way, or ``None`` to fall
            back to ``matvec`` columns; used by the dense method only.

    Attributes:
        method: The resolved method (never ``"auto"``).
        last_residual: ``(m,)`` relative residuals ``||A x - b|| / ||b||`` of the
            last solve (NaN for LiSSA without exact residual), or None.
        last_iterations: Matvecs spent in the iterations of the last solve (0 for
            dense and arnoldi, whose one-time setup is not counted), or None.

    Notes:
        * dense: ``A`` is formed with ``ceil(dim / chunk_size)`` matvec calls (or
          by ``dense_builder``) and factorised once (Cholesky when ``symmetric``
          and positive definite, else LU); the residual is computed exactly from ``A``.  A
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
        dense_builder: Callable[[], Tensor | None] | None = None,
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
        self.dense_builder = dense_builder
        self.last_residual: Tensor | None = None
        self.last_iterations: int | None = None
        self._dense: Tensor | None = None
        self._lu: tuple[Tensor, Tensor] | None = None
        self._cholesky: Tensor | None = None
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
        if self._dense is None and self.dense_builder is not None:
            built = self.dense_builder()
            if built is not None:
                if built.shape != (self.dim, self.dim):
                    raise ValueError(
                        f"dense_builder returned shape {tuple(built.shape)}, expected "
                        f"({self.dim}, {self.dim})"
                    )
                self._dense = built.to(device=self.device, dtype=self.dtype)
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

    def _dense_solve(self, work: Tensor, transpose: bool) -> Tensor:
        """``A^{-1}`` or ``A^{-T}`` from the factors of the formed matrix."""
        if self.symmetric and self._lu is None:  # no LU yet: Cholesky not tried or worked
            if self._cholesky is None:
                factor, info = torch.linalg.cholesky_ex(self.matrix())
                if int(info) == 0:  # positive definite: half the cost of LU
                    self._cholesky = factor
            if self._cholesky is not None:
                return torch.cholesky_solve(work, self._cholesky)
        lu, pivots = self._factors()
        return torch.linalg.lu_solve(lu, pivots, work, adjoint=transpose)

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
                x = self._dense_solve(work, transpose)
                a = self.matrix()
                ax = (a.mT if transpose else a) @ x
            else:
                inverse, vectors = self._eigenpairs()
                x = vectors @ (inverse.unsqueeze(1) * (vectors.mT @ work))
                ax = _apply(mv, x)
            residual = _relative(ax - work, bnorm)
            if method == "dense":
                _check_convergence("dense", residual, self.options.tolerance(self.dtype), 0)
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
