r"""Seeded random projections that preserve inner products (Johnson-Lindenstrauss).

:class:`RandomProjection` maps a parameter-space vector :math:`x \in \mathbb{R}^P`
to :math:`R x \in \mathbb{R}^d` with :math:`R_{ij}` drawn i.i.d. from
:math:`\mathcal{N}(0, 1/d)` (``"gaussian"``) or :math:`\pm 1/\sqrt{d}`
(``"rademacher"``), so :math:`\mathbb{E}[\langle Rx, Ry\rangle] = \langle x, y\rangle`
with relative error of order :math:`1/\sqrt{d}`. As in TRAK, :math:`R` is generated
block by block of parameter coordinates from a seed, so it is never held whole
unless it is small: memory is ``O(d * block)`` plus the vectors being projected.
Every block is generated on the CPU, so the same seed gives the same :math:`R` on
every device and every rank.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

__all__ = ["RandomProjection", "PROJECTIONS"]

PROJECTIONS = ("gaussian", "rademacher")
_CACHE_LIMIT = 1 << 24  # cache R when it has at most this many entries


class RandomProjection:
    """A seeded ``d x P`` projection applied chunk by chunk.

    Args:
        sizes: Number of coordinates of each named parameter, in order (the order
            of the flat vectors); ``P = sum(sizes.values())``.
        dim: Projected dimension ``d``.
        kind: ``"gaussian"`` or ``"rademacher"``.
        seed: Seed of :math:`R`.
        block: Parameter coordinates per generated block.
    """

    def __init__(
        self,
        sizes: Mapping[str, int],
        dim: int,
        kind: str = "gaussian",
        seed: int = 0,
        block: int = 4096,
    ) -> None:
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"`projection_dim` must be a positive int, got {dim!r}")
        if kind not in PROJECTIONS:
            raise ValueError(f"`projection` must be one of {PROJECTIONS}, got {kind!r}")
        if block < 1:
            raise ValueError("`block` must be positive")
        self.sizes = dict(sizes)
        self.total = sum(self.sizes.values())
        self.dim, self.kind, self.seed, self.block = dim, kind, int(seed), block
        self._cache: dict[tuple[int, int, torch.dtype, torch.device], Tensor] = {}
        self._keep = dim * self.total <= _CACHE_LIMIT

    def __repr__(self) -> str:
        return (
            f"RandomProjection(P={self.total}, dim={self.dim}, kind={self.kind!r}, "
            f"seed={self.seed})"
        )

    def _matrix(self, start: int, stop: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        """Columns ``start:stop`` of :math:`R` (``(d, stop - start)``), generated per block."""
        parts = []
        for b in range(start // self.block, (stop - 1) // self.block + 1):
            lo, hi = b * self.block, min((b + 1) * self.block, self.total)
            key = (b, 0, dtype, device)
            block = self._cache.get(key)
            if block is None:
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + b)
                if self.kind == "gaussian":
                    block = torch.randn(self.dim, hi - lo, generator=g, dtype=torch.float64)
                else:
                    block = torch.randint(0, 2, (self.dim, hi - lo), generator=g).double() * 2 - 1
                block = (block / self.dim**0.5).to(dtype=dtype, device=device)
                if self._keep:
                    self._cache[key] = block
            parts.append(block[:, max(start, lo) - lo : min(stop, hi) - lo])
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]

    def __call__(self, x: Tensor | Mapping[str, Tensor]) -> Tensor:
        """Project ``(..., P)`` rows, or a dict of ``(..., numel)`` blocks, to ``(..., d)``."""
        if isinstance(x, Mapping):
            if list(x) != list(self.sizes):
                raise ValueError("the dict keys must be the projection's parameter names, in order")
            out, start = None, 0
            for name, value in x.items():
                stop = start + self.sizes[name]
                part = value @ self._matrix(start, stop, value.dtype, value.device).T
                out = part if out is None else out + part
                start = stop
            return out  # type: ignore[return-value]
        if x.shape[-1] != self.total:
            raise ValueError(f"expected vectors of size {self.total}, got {x.shape[-1]}")
        out = None
        for start in range(0, self.total, self.block):
            stop = min(start + self.block, self.total)
            part = x[..., start:stop] @ self._matrix(start, stop, x.dtype, x.device).T
            out = part if out is None else out + part
        return out  # type: ignore[return-value]

    def matrix(self, dtype: torch.dtype = torch.float64) -> Tensor:
        """The whole :math:`R` ``(d, P)`` (for checks on small problems)."""
        return self._matrix(0, self.total, dtype, torch.device("cpu"))
