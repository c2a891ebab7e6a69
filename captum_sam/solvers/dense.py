"""The dense solver's building block: forming ``A`` from its matvec.

:func:`dense_matrix` applies the matvec to blocks of identity columns; the
:class:`~captum_sam.solvers.InverseOperator` LU-factorises the result once and
reuses it for every solve.
"""

from __future__ import annotations

import torch
from torch import Tensor

from captum_sam.solvers._common import Matvec, _apply, _is_int


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
