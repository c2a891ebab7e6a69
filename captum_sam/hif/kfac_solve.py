r"""SAM-HIF with K-FAC/EK-FAC curvature: fitting the operator's factors, damping, inverses.

:func:`attach` fits the Kronecker-factored curvature at each point the variant needs
(:math:`w^* + \epsilon^*` for ``fast``/``full``/``exact``, with the perturbed but not
attributed parameters at their perturbed values; :math:`w^*` for ``plain`` and for the
:math:`H_0` inside :math:`J`), sets the per-layer damping and hands the curvatures to the
:class:`~captum_sam.hif.operator.SAMOperator`. Then:

* ``fast``/``plain``: :math:`A = K + r I` is inverted exactly in each layer's Kronecker
  eigenbasis (:class:`KroneckerInverse`, no pass over the data per solve), or, with
  ``projection_dim``, Captum's top-``k`` eigen-directions of :math:`A` are taken from
  that eigenbasis (:func:`kronecker_low_rank`, no ``P x P`` matrix);
* ``full``/``exact``: :math:`A = K_e (I + J_K) + r I` is applied as an operator (every
  curvature product a Kronecker one) and solved by GMRES (or BiCGSTAB) right-preconditioned
  by :math:`(K_e + r I)^{-1}` (:class:`PreconditionedSolver`), so the residual is that of
  :math:`A` itself.

**Damping.** ``damping=d`` keeps its meaning, :math:`n d` added to the diagonal. With
``damping=None`` each layer :math:`l` gets kronfluence's heuristic,
:math:`n d_l = 0.1 \times` the mean eigenvalue of its curvature block at :math:`A`'s
point (:math:`K_e`, or :math:`K_0` for ``plain``); ``est.damping_used`` holds the
:math:`d_l` by layer name (on the mean-loss scale of ``damping``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from captum_sam.core.data import progress
from captum_sam.core.errors import ArgumentError
from captum_sam.core.memory import release_freed_memory
from captum_sam.hif.inverse import LowRankInverse, orient
from captum_sam.hif.kfac import Block, KroneckerCurvature, fit_kronecker
from captum_sam.hif.kron_sites import kronecker_sites, warn_if_not_convex
from captum_sam.hif.operator import SAMOperator
from captum_sam.solvers import InverseOperator, SolverOptions

__all__ = [
    "attach",
    "points_needed",
    "KroneckerInverse",
    "PreconditionedSolver",
    "kronecker_low_rank",
    "HEURISTIC",
]

HEURISTIC = 0.1
"""Damping of each layer with ``damping=None``: this fraction of its mean eigenvalue."""


def points_needed(variant: str) -> list[str]:
    r"""Where the curvature is fitted: ``"perturbed"`` (:math:`w^*+\epsilon^*`), ``"params"``."""
    return {"plain": ["params"], "fast": ["perturbed"]}.get(variant, ["perturbed", "params"])


def attach(est: Any, damping: float | None, factors_dir: Any = None) -> None:
    """Fit the curvatures of ``est.operator`` and set its per-layer regulariser.

    Sets ``op.kronecker``, ``op.regulariser`` (a ``(P, 1)`` tensor with the heuristic),
    ``est.kronecker_shift`` (the regulariser of each layer, ``(layers,)``) and
    ``est.damping_used``.

    Args:
        est: The estimator (its operator built with damping 0 when ``damping`` is None).
        damping: The user's damping, or ``None`` for the heuristic.
        factors_dir: Cache directory for the factors (see :mod:`captum_sam.hif.kfac_store`).
    """
    op: SAMOperator = est.operator
    sites = kronecker_sites(op.loss.model, op.names)
    fitted: dict[str, KroneckerCurvature] = {}
    for key in points_needed(op.variant):
        point = op.perturbed if key == "perturbed" else op.params
        where = "w*+eps*" if key == "perturbed" else "w*"

        def fit(point: Any = point, where: str = where) -> KroneckerCurvature:
            bar = None
            if est.show_progress:
                name = est.get_name()
                bar = lambda it, desc: progress(it, True, f"Using {name} to fit {desc} at {where}")  # noqa: E731
            curvature, worst = fit_kronecker(
                op.loss_at(point), point, op.indexed_hessian_batches, sites, est.curvature,
                op.hessian_scale, op.reduce(), bar, est.kfac_samples, est.seed,
            )  # fmt: skip
            warn_if_not_convex(worst, est.loss_fn)
            return curvature

        if factors_dir is None:
            fitted[key] = fit()
        else:
            from captum_sam.hif import kfac_store

            fitted[key] = kfac_store.cached_fit(factors_dir, est, key, sites, fit)
        fitted[key].release_input_sums()  # (stored above when cached)
        release_freed_memory()  # the fit's transients (unfolded patches of every layer)
    op.kronecker = fitted
    main = fitted["params" if op.variant == "plain" else "perturbed"]
    n = est.n_train
    base = float(op.regulariser)  # n (weight_decay + damping) + hessian_reg
    if damping is None:
        per_layer = HEURISTIC * main.mean_eigenvalues() / n
        est.damping_used = {site.name: float(d) for site, d in zip(sites, per_layer)}
        shift = base + n * per_layer
        coordinate = main.join(
            [s.new_full((1, site.d_out, site.width), float(s)) for site, s in zip(sites, shift)]
        )
        op.regulariser = coordinate  # (P, 1)
    else:
        est.damping_used = float(damping)
        shift = main.values[0].new_full((len(sites),), base)
    est.kronecker_shift = shift


class KroneckerInverse:
    r""":math:`(K + r I)^{-1}` applied exactly in the Kronecker eigenbasis of every layer.

    The interface of :class:`~captum_sam.solvers.InverseOperator` that
    :class:`~captum_sam.hif.inverse.SolvedInverse` uses; the matrix is symmetric, so
    ``solve_transpose`` is ``solve``.

    Args:
        curvature: The fitted :math:`K`.
        shift: :math:`r` of each layer, ``(layers,)``.
        tol: Eigenvalues of :math:`K + r I` at or below this are dropped (Captum's
            ``hessian_inverse_tol``); ``None``: the exact inverse.
    """

    method = "kronecker"
    symmetric = True
    shared_passes = False  # every column costs the same, however many are solved at once

    def __init__(self, curvature: KroneckerCurvature, shift: Tensor, tol: float | None) -> None:
        self.curvature, self.shift, self.tol = curvature, shift, tol
        self.last_residual: Tensor | None = None  # exact: no residual to report
        self.last_iterations = 0

    def solve(self, b: Tensor) -> Tensor:
        """:math:`(K + rI)^{-1} b` for ``b`` of shape ``(P,)`` or ``(P, m)``."""
        cols = b.unsqueeze(1) if b.dim() == 1 else b
        out = self.curvature.solve(cols, self.shift, self.tol)
        return out.squeeze(1) if b.dim() == 1 else out

    solve_transpose = solve

    def solve_blocks(self, blocks: Sequence[Block]) -> Tensor:
        """:meth:`solve` of columns given per block, as matrices or layer factors ``(P, m)``.

        See :meth:`KroneckerCurvature.solve_blocks
        <captum_sam.hif.kfac.KroneckerCurvature.solve_blocks>`.
        """
        return self.curvature.solve_blocks(blocks, self.shift, self.tol)

    def solve_some(self, which: Sequence[int], blocks: Sequence[Block]) -> list[Tensor]:
        """:meth:`solve_blocks` of the blocks ``which`` alone, as ``(m, d_out, width)``."""
        return self.curvature.solve_some(which, blocks, self.shift, self.tol)


class PreconditionedSolver:
    r""":math:`A^{-1}` and :math:`A^{-\top}` by a Krylov method, right-preconditioned.

    Solves :math:`(A M^{-1}) y = b` and returns :math:`x = M^{-1} y` (likewise
    :math:`(A^\top M^{-1}) y = b` for the transpose, :math:`M` being symmetric), so the
    residual the solver reports and warns about
    (:class:`~captum_sam.solvers.ConvergenceWarning`) is :math:`\lVert A x - b\rVert /
    \lVert b\rVert`.

    Args:
        matvec: ``X (P, m) -> A X``.
        rmatvec: ``X -> A^T X``.
        precondition: ``X -> M^{-1} X``; ``None``: no preconditioning.
        dim: ``P``.
        method: ``"gmres"`` or ``"bicgstab"``.
        options: Solver settings (``tol``, ``max_iter``, ``restart``).
        dtype: Of the Krylov bases.
        device: Where they live.
    """

    def __init__(
        self,
        matvec: Callable[[Tensor], Tensor],
        rmatvec: Callable[[Tensor], Tensor],
        precondition: Callable[[Tensor], Tensor] | None,
        dim: int,
        method: str,
        options: SolverOptions,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.precondition = precondition or (lambda x: x)
        pre = self.precondition
        self.inner = InverseOperator(
            lambda x: matvec(pre(x)), dim, method=method, symmetric=False,
            rmatvec=lambda x: rmatvec(pre(x)), options=options, dtype=dtype, device=device,
        )  # fmt: skip
        self.method = method
        self.symmetric = False
        self.shared_passes = False  # Kronecker products: no pass over the data to share

    @property
    def last_residual(self) -> Tensor | None:
        """Relative residuals of :math:`A` of the last solve, per column."""
        return self.inner.last_residual

    @property
    def last_iterations(self) -> int | None:
        """Matvecs spent in the last solve's iterations."""
        return self.inner.last_iterations

    def _run(self, b: Tensor, transpose: bool) -> Tensor:
        cols = b.unsqueeze(1) if b.dim() == 1 else b
        y = (self.inner.solve_transpose if transpose else self.inner.solve)(cols)
        out = self.precondition(y)
        return out.squeeze(1) if b.dim() == 1 else out

    def solve(self, b: Tensor) -> Tensor:
        """:math:`A^{-1} b`, ``b`` of shape ``(P,)`` or ``(P, m)``."""
        return self._run(b, False)

    def solve_transpose(self, b: Tensor) -> Tensor:
        r""":math:`A^{-\top} b`."""
        return self._run(b, True)


def kronecker_low_rank(
    curvature: KroneckerCurvature, shift: Tensor, k: int | None, tol: float | None
) -> LowRankInverse:
    r"""Captum's low-rank inverse of :math:`A = K + r I` from its exact eigenpairs.

    Keeps the eigenvalues above ``tol`` (every non-zero one with ``None``), the top
    ``k`` of them over all layers, as :meth:`LowRankInverse.from_matrix
    <captum_sam.hif.inverse.LowRankInverse.from_matrix>` does for a formed symmetric
    matrix, without forming it: ``L = R = V \Lambda^{-1/2}`` ``(P, k)``.

    Raises:
        ValueError: No eigenvalue above ``tol``.
    """
    values, blocks, positions = curvature.eigenpairs(shift)
    keep = values != 0 if tol is None else values > tol
    values, blocks, positions = values[keep], blocks[keep], positions[keep]
    order = torch.argsort(values.abs() if tol is None else values)
    if k is not None:
        order = order[-k:]
    values, blocks, positions = values[order], blocks[order], positions[order]
    if len(values) == 0:
        raise ArgumentError(
            "the K-FAC matrix has no eigenvalue above `hessian_inverse_tol`: add damping or "
            "lower `hessian_inverse_tol`"
        )
    vectors = orient(curvature.eigenvectors(blocks, positions))
    scaled = vectors * values.abs().rsqrt().unsqueeze(0)
    return LowRankInverse(scaled * values.sign().unsqueeze(0), scaled, values)
