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

from captum_sam.solvers import _common, operator
from captum_sam.solvers._common import ConvergenceWarning, SolveResult, SolverOptions
from captum_sam.solvers.dense import dense_matrix
from captum_sam.solvers.krylov import bicgstab, cg, gmres
from captum_sam.solvers.lowrank import arnoldi
from captum_sam.solvers.operator import InverseOperator
from captum_sam.solvers.series import lissa, neumann, spectral_radius

# Bound here again with their docstrings: Sphinx reads the docstring of a variable from
# the module that documents it, this package, not from the submodule that defines it.
Matvec = _common.Matvec
"""``X (dim, m) -> A @ X (dim, m)``."""

SampledMatvec = _common.SampledMatvec
"""``(X (dim, m), step) -> A_step @ X (dim, m)``, an unbiased estimate of ``A @ X``."""

METHODS = operator.METHODS
"""Valid values of ``InverseOperator(method=...)``."""

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
    "METHODS",
]
