r"""``damping="auto"``: the damping chosen from the curvature the variant inverts.

With :math:`C` the curvature of the summed training loss at :math:`A`'s point (the
Hessian or GGN at :math:`w^*` for ``plain``, at :math:`w^* + \epsilon^*` otherwise),
:math:`P` its size and :math:`n` the number of training examples, the rule is

.. math::

    n\, d = 0.1\, \max\!\big(0, \operatorname{tr}(C) / P\big)
            + \max\!\big(0, -\lambda_{\min}(C)\big).

The first term is a tenth of the mean eigenvalue (the scale-free rule kronfluence uses
per layer for K-FAC); the second shifts an indefinite Hessian to positive
semi-definite, so that :math:`C + n d I` has its smallest eigenvalue at a tenth of the
mean. The GGN is positive semi-definite by construction: its shift is 0. :math:`d` is on the
mean-loss scale of a float ``damping`` (added as :math:`n d I`, on top of weight
decay's :math:`n \lambda`), so ``damping=est.damping_used`` reproduces the estimator.
The rule never looks at test data or retraining.

**Training horizon.** A network trained for a finite run is not at a minimum of its
loss: gradient descent with total step :math:`T = \sum_t \eta_t` moves a direction of
mean-loss curvature :math:`\lambda` by about :math:`\min(T, 1/\lambda)` times the
gradient, as ridge regression with penalty :math:`1/T` would (early stopping as
implicit ridge, Ali, Kolter & Tibshirani 2019). So retraining on a subset for the same
schedule responds as an influence function damped by :math:`d = 1/T`. When the caller
knows :math:`T` (``training_horizon``; :func:`training_horizon` reads it from a
record), the first term becomes :math:`\max(0.1\,\bar\lambda, n/T)`. Leave it out for
a model at a minimum (a fixed point, or retraining to convergence).

For ``P <= SolverOptions.dense_max_dim`` the curvature is formed (from layer factors
when possible) and the rule is exact (``eigvalsh``); the formed matrix is kept for the
dense solver, so forming :math:`A` costs nothing more. For larger ``P``,
:data:`LANCZOS_STEPS` Lanczos steps (full reorthogonalisation, seeded start) give a
lower estimate of :math:`\lambda_{\min}` (smallest Ritz value minus its residual) and
the trace on their Krylov basis :math:`Q`; Hutchinson's estimate (:data:`PROBES`
seeded Rademacher probes projected off :math:`Q`) adds the rest of the trace. All
from curvature-vector products.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from captum_sam.hif import dense
from captum_sam.hif.operator import SAMOperator

__all__ = [
    "AUTO",
    "MEAN_FRACTION",
    "PROBES",
    "LANCZOS_STEPS",
    "AutoDamping",
    "check_damping",
    "auto_damping",
    "damping_rule",
    "check_horizon",
    "training_horizon",
    "hutchinson_trace",
    "lanczos",
    "lanczos_min",
]

AUTO = "auto"
MEAN_FRACTION = 0.1
""":math:`n d` is this fraction of :math:`C`'s mean eigenvalue (plus the shift)."""
PROBES = 64
LANCZOS_STEPS = 64


@dataclass(frozen=True)
class AutoDamping:
    r"""What ``damping="auto"`` chose and why.

    Attributes:
        damping: :math:`d` (mean-loss scale, added as :math:`n d I`).
        mean_eigenvalue: :math:`\operatorname{tr}(C)/P` (summed-loss scale).
        min_eigenvalue: :math:`\lambda_{\min}(C)`, ``None`` for the GGN (PSD).
        method: ``"dense"`` (exact) or ``"hutchinson-lanczos"`` (estimated).
        horizon: The training horizon :math:`\sum_t \eta_t` used, or ``None``.
    """

    damping: float
    mean_eigenvalue: float
    min_eigenvalue: float | None
    method: str
    horizon: float | None = None


def check_damping(damping: Any) -> float | str | None:
    """``None``, ``"auto"`` or a finite float ``>= 0``; else ``ValueError`` naming ``damping``."""
    if damping is None or damping == AUTO and isinstance(damping, str):
        return damping
    bad = isinstance(damping, bool) or not isinstance(damping, (int, float))
    if bad or not 0 <= damping < float("inf"):
        raise ValueError(f"`damping` must be None, 'auto' or a finite number >= 0, got {damping!r}")
    return float(damping)


def damping_rule(
    mean_eigenvalue: float, min_eigenvalue: float | None, n: int, horizon: float | None = None
) -> float:
    r""":math:`d = (0.1 \max(0, \bar\lambda) + \max(0, -\lambda_{\min})) / n`.

    With a training ``horizon`` :math:`T = \sum_t \eta_t`, the first term is at least
    :math:`n / T` (:math:`d \ge 1/T`).
    """
    shift = 0.0 if min_eigenvalue is None else max(0.0, -min_eigenvalue)
    floor = MEAN_FRACTION * max(0.0, mean_eigenvalue)
    if horizon is not None:
        floor = max(floor, n / horizon)
    return (floor + shift) / n


def check_horizon(horizon: Any) -> float | None:
    """``None`` or a finite number ``> 0``; else ``ValueError`` naming ``training_horizon``."""
    if horizon is None:
        return None
    bad = isinstance(horizon, bool) or not isinstance(horizon, (int, float))
    if bad or not 0 < horizon < float("inf"):
        raise ValueError(f"`training_horizon` must be None or a finite number > 0, got {horizon!r}")
    return float(horizon)


def training_horizon(trajectory: Any) -> float:
    r""":math:`T = \sum_t \eta_t` over a recorded run's steps.

    ``trajectory``: a record directory or a loaded
    :class:`~captum_sam.trajectory.Trajectory`.
    """
    from captum_sam.trajectory import Trajectory, load_trajectory

    traj = trajectory if isinstance(trajectory, Trajectory) else load_trajectory(trajectory)
    return float(sum(step.lr for step in traj.steps))


def hutchinson_trace(
    matvec: Callable[[Tensor], Tensor],
    dim: int,
    probes: int,
    seed: int,
    like: Tensor,
    basis: Tensor | None = None,
    chunk: int = 64,
) -> float:
    r"""Hutchinson's :math:`\operatorname{tr}(C) \approx \frac1m \sum_j z_j^\top C z_j`.

    ``z_j`` are seeded Rademacher vectors; ``matvec`` maps ``(P, m)`` columns to
    ``(P, m)``, ``like`` gives dtype and device. With an orthonormal ``basis``
    :math:`Q` ``(P, k)`` the probes are projected off it, :math:`z \to (I - QQ^\top) z`,
    which estimates :math:`\operatorname{tr}(C) - \operatorname{tr}(Q^\top C Q)` (the
    caller adds the second term, known exactly; Hutch++'s deflation with a Krylov
    basis): the largest eigenvalues leave the estimate's variance.
    """
    gen = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (dim, probes), generator=gen).to(like) * 2 - 1
    total = 0.0
    for start in range(0, probes, chunk):
        z = signs[:, start : start + chunk]
        if basis is not None:
            z = z - basis @ (basis.T @ z)
        total += float((z * matvec(z)).sum())
    return total / probes


def lanczos(
    matvec: Callable[[Tensor], Tensor], dim: int, steps: int, seed: int, like: Tensor
) -> tuple[Tensor, Tensor, float]:
    r"""``steps`` Lanczos steps on a symmetric matrix (full reorthogonalisation).

    Returns the orthonormal Krylov basis :math:`Q` ``(P, k)``, the tridiagonal
    :math:`T = Q^\top C Q` ``(k, k)`` and the last :math:`\beta` (0 when the Krylov
    space became invariant). The start vector is seeded.
    """
    gen = torch.Generator().manual_seed(seed + 1)
    q = torch.randn(dim, generator=gen, dtype=torch.float64).to(like)
    q = q / q.norm()
    basis, alphas, betas = [q], [], []
    last = 0.0
    for _ in range(min(steps, dim)):
        w = matvec(q.unsqueeze(1)).squeeze(1)
        alpha = q @ w
        alphas.append(alpha)
        stacked = torch.stack(basis, dim=1)
        for _ in range(2):  # twice is enough (Giraud et al. 2005)
            w = w - stacked @ (stacked.T @ w)
        beta = w.norm()
        if beta <= 1e-10 * max(1.0, float(alpha.abs())) or len(basis) == dim:
            break
        if len(alphas) == steps:
            last = float(beta)
            break
        betas.append(beta)
        q = w / beta
        basis.append(q)
    tri = torch.diag(torch.stack(alphas))
    if betas:
        off = torch.stack(betas)
        tri = tri + torch.diag(off, 1) + torch.diag(off, -1)
    return torch.stack(basis, dim=1), tri, last


def lanczos_min(
    matvec: Callable[[Tensor], Tensor], dim: int, steps: int, seed: int, like: Tensor
) -> float:
    r"""A lower estimate of :math:`\lambda_{\min}` from ``steps`` Lanczos steps.

    The smallest Ritz value :math:`\theta` is at least :math:`\lambda_{\min}` and
    converges to it from above (extreme eigenvalues first); some eigenvalue lies within
    the residual :math:`r = \beta_k |s_k|` of it (:math:`s` its Ritz vector in the
    Krylov basis), so :math:`\theta - r` is returned: a shift by it errs towards more
    damping.
    """
    _, tri, last = lanczos(matvec, dim, steps, seed, like)
    return _ritz_min(tri, last)


def _ritz_min(tri: Tensor, last: float) -> float:
    values, vectors = torch.linalg.eigh(tri)
    return float(values[0]) - last * float(vectors[-1, 0].abs())


def auto_damping(
    op: SAMOperator,
    dense_max_dim: int,
    chunk_size: int,
    seed: int = 0,
    horizon: float | None = None,
) -> AutoDamping:
    r"""The rule of this module for ``op``'s curvature at its point.

    Exact from the formed :math:`C` when ``op.dim <= dense_max_dim`` (kept as
    ``op.dense_curvature`` for the dense solver), else estimated (``seed`` seeds the
    probes and the Lanczos start). ``horizon``: the training horizon, if known.
    """
    psd = op.curvature == "ggn"
    if op.dim <= dense_max_dim:
        c = dense.curvature_matrix(op, chunk_size)
        c = (c + c.T) / 2
        op.dense_curvature = c
        mean = float(c.diagonal().mean())
        low = None if psd else float(torch.linalg.eigvalsh(c)[0])
        d = damping_rule(mean, low, op.n_train, horizon)
        return AutoDamping(d, mean, low, "dense", horizon)
    like = op.mean_grad[op.names[0]]

    def matvec(columns: Tensor) -> Tensor:
        return op.curvature_product(op.point, columns, op.hessian_batches(), op.hessian_scale)

    basis, tri, last = lanczos(matvec, op.dim, LANCZOS_STEPS, seed, like)
    rest = hutchinson_trace(matvec, op.dim, PROBES, seed, like, basis)
    mean = (float(tri.trace()) + rest) / op.dim
    low = None if psd else _ritz_min(tri, last)
    d = damping_rule(mean, low, op.n_train, horizon)
    return AutoDamping(d, mean, low, "hutchinson-lanczos", horizon)
