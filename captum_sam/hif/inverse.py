r"""The two ways SAM-HIF applies :math:`A^{-1}`: a low-rank decomposition, or a solver.

:class:`LowRankInverse` is Captum's: :math:`A^{-1} \approx L R^\top` from the top
eigenpairs of a symmetric :math:`A` (``L = R = V \Lambda^{-1/2}``, eigenvalues above
``hessian_inverse_tol``, the top ``projection_dim`` of them), as
``NaiveInfluenceFunction`` (dense) and ``ArnoldiInfluenceFunction`` (Krylov) compute
it; for a non-symmetric :math:`A` (``full``, ``exact``) the same from its singular
value decomposition, :math:`A = U S V^\top`, ``L = V S^{-1/2}``, ``R = U S^{-1/2}``.
Intermediate quantities are then ``g @ L`` (test) and ``r @ R`` (train): influence is
their inner product. :class:`SolvedInverse` solves with an
:class:`~captum_sam.solvers.InverseOperator` instead (exact up to the solver's
tolerance, no truncation): the test side is :math:`A^{-\top} g`, the train side the
right-hand side itself.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from captum_sam.core.errors import ArgumentError
from captum_sam.solvers import InverseOperator

__all__ = ["LowRankInverse", "SolvedInverse", "top_eigen", "orient"]


def orient(vectors: Tensor) -> Tensor:
    """Flip each column so that its entries sum to a positive number (Captum's sign rule)."""
    sign = (vectors.sum(dim=0) > 0).to(vectors.dtype) * 2 - 1
    return vectors * sign.unsqueeze(0)


def top_eigen(matrix: Tensor, k: int | None, tol: float | None) -> tuple[Tensor, Tensor]:
    """Eigenpairs of a symmetric matrix with eigenvalue above ``tol``, the top ``k`` of them.

    ``tol=None`` keeps every non-zero eigenvalue, negative ones too (then "top" means
    largest in magnitude).

    Returns:
        ``(values (r,), vectors (n, r))`` in ascending order of value (of magnitude
        with ``tol=None``), each vector oriented by :func:`orient`.
    """
    values, vectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    if tol is None:
        order = torch.argsort(values.abs())
        values, vectors = values[order], vectors[:, order]
        keep = values != 0
    else:
        keep = values > tol
    values, vectors = values[keep], vectors[:, keep]
    if k is not None:
        values, vectors = values[-k:], vectors[:, -k:]
    return values, orient(vectors)


@dataclass
class LowRankInverse:
    r""":math:`A^{-1} \approx L R^\top` with ``L``, ``R`` of shape ``(P, k)``."""

    left: Tensor
    right: Tensor
    values: Tensor  # eigenvalues or singular values kept, ascending

    @classmethod
    def from_matrix(
        cls, matrix: Tensor, symmetric: bool, k: int | None, tol: float | None
    ) -> LowRankInverse:
        r"""Decompose a formed :math:`A` (regularisers already added).

        ``tol=None`` drops nothing but exact zeros: for a symmetric :math:`A` with
        negative eigenvalues ``L = V |\Lambda|^{-1/2} \mathrm{sign}(\Lambda)``
        and ``R = V |\Lambda|^{-1/2}``, the exact inverse.

        Raises:
            ValueError: No eigenvalue (singular value) above ``tol``.
        """
        if symmetric:
            values, vectors = top_eigen(matrix, k, tol)
            if len(values) == 0:
                raise ArgumentError(
                    "the matrix has no eigenvalue above `hessian_inverse_tol` (no positive "
                    "curvature to invert): add damping, use curvature='ggn', or lower "
                    "`hessian_inverse_tol`"
                )
            scaled = vectors * values.abs().rsqrt().unsqueeze(0)
            return cls(scaled * values.sign().unsqueeze(0), scaled, values)
        u, s, vh = torch.linalg.svd(matrix)
        order = torch.argsort(s)
        s, u, v = s[order], u[:, order], vh.T[:, order]
        keep = s > (0.0 if tol is None else tol)
        s, u, v = s[keep], u[:, keep], v[:, keep]
        if k is not None:
            s, u, v = s[-k:], u[:, -k:], v[:, -k:]
        if len(s) == 0:
            raise ArgumentError(
                "the matrix has no singular value above `hessian_inverse_tol`: add damping "
                "or lower `hessian_inverse_tol`"
            )
        sign = (v.sum(dim=0) > 0).to(v.dtype) * 2 - 1
        root = s.rsqrt().unsqueeze(0)
        return cls(v * sign * root, u * sign * root, s)

    @property
    def rank(self) -> int:
        """Number of directions kept."""
        return self.left.shape[1]

    def test_rows(self, grads: Tensor) -> Tensor:
        """Test-side embeddings ``(m, k)`` of gradient rows ``(m, P)``."""
        return grads @ self.left

    def train_rows(
        self, rhs: Tensor, extra: Tensor | None = None, he_right: Tensor | None = None
    ) -> Tensor:
        """Train-side embeddings ``(m, k)`` of right-hand sides ``(m, P)``.

        ``extra``: rows ``d_k`` whose :math:`H_e d_k` is added to the right-hand side
        (the exact variant), with ``he_right`` :math:`= H_e R`.
        """
        out = rhs @ self.right
        if extra is not None:
            out = out + extra @ he_right
        return out

    def solve(self, rhs: Tensor) -> Tensor:
        r""":math:`L R^\top` times ``(P, m)`` columns."""
        return self.left @ (self.right.T @ rhs)


@dataclass
class SolvedInverse:
    r""":math:`A^{-1}` and :math:`A^{-\top}` by an iterative (or dense) solver."""

    inverse: InverseOperator
    check: Callable[[Tensor, str], None]

    def solve(self, rhs: Tensor) -> Tensor:
        """:math:`A^{-1}` times ``(P, m)`` columns."""
        self.check(rhs, "right-hand sides of the inverse-HVP solve")  # (a solver may
        out = self.inverse.solve(rhs)  # return 0 after 0 steps for an overflowed norm)
        self.check(out, "inverse-HVP solutions")
        return out

    def solve_transpose(self, rhs: Tensor) -> Tensor:
        r""":math:`A^{-\top}` times ``(P, m)`` columns."""
        self.check(rhs, "right-hand sides of the inverse-HVP solve")
        out = self.inverse.solve_transpose(rhs)
        self.check(out, "inverse-HVP solutions")
        return out

    def test_rows(self, grads: Tensor) -> Tensor:
        r""":math:`A^{-\top} g` rows ``(m, P)`` of gradient rows ``(m, P)``."""
        return self.solve_transpose(grads.T).T
