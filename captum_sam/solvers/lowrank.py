"""Low-rank solver: the Arnoldi (Lanczos) eigendecomposition of a symmetric ``A``.

:func:`arnoldi` keeps the largest Ritz pairs of a Krylov basis; the
:class:`~captum_sam.solvers.InverseOperator` inverts ``A`` on their span, an
approximation by design that is cheap when many vectors are solved.
"""

from __future__ import annotations

import torch
from torch import Tensor

from captum_sam.solvers._common import (
    Matvec,
    SolverOptions,
    _apply,
    _colnorm,
    _is_int,
    _random_start,
)


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
