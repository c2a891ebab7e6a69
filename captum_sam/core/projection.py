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

:class:`LayerProjection` projects the weight gradient of a layer site (``nn.Linear``,
``nn.Conv2d``), :math:`G = \sum_t d_t a_t^\top = D^\top A`, with a Kronecker-structured
matrix :math:`P_{out} \otimes P_{in}` as TRAK and LoGra do:
:math:`P_{out}^\top G P_{in} = (D P_{out})^\top (A P_{in})`, computed from the layer
factors without forming :math:`G` (:meth:`LayerProjection.project_factors`) or from a
formed gradient (:meth:`LayerProjection.__call__`), the same numbers either way. With
independent :math:`P_{out}` (``d_out x k_out``) and :math:`P_{in}` (``d_in x k_in``)
whose entries have variance :math:`1/k`, :math:`\mathbb{E}[P P^\top] = I` on each side
and so :math:`\mathbb{E}\langle P_{out}^\top G P_{in}, P_{out}^\top G' P_{in}\rangle =
\langle G, G'\rangle`. A bias is a weight on a constant input 1 (one more row of
:math:`P_{in}`); parameters outside the sites get a :class:`RandomProjection`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

__all__ = ["RandomProjection", "LayerProjection", "PROJECTIONS", "split_budget"]

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
        names: The caller's names of ``dim`` and ``kind``, for messages.
    """

    def __init__(
        self,
        sizes: Mapping[str, int],
        dim: int,
        kind: str = "gaussian",
        seed: int = 0,
        block: int = 4096,
        names: tuple[str, str] = ("projection_dim", "projection"),
    ) -> None:
        _check(dim, kind, names)
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


def _check(dim: object, kind: object, names: tuple[str, str]) -> None:
    """Refuse a bad width or kind, naming the caller's arguments ``names``."""
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise ValueError(f"`{names[0]}` must be a positive int, got {dim!r}")
    if kind not in PROJECTIONS:
        raise ValueError(f"`{names[1]}` must be one of {PROJECTIONS}, got {kind!r}")


def _draw(rows: int, cols: int, kind: str, seed: int) -> Tensor:
    """A seeded ``(rows, cols)`` matrix with entries of variance ``1 / cols`` (float64, CPU)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "gaussian":
        m = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    else:
        m = torch.randint(0, 2, (rows, cols), generator=g).double() * 2 - 1
    return m / cols**0.5


def split_budget(sizes: Sequence[int], dim: int) -> list[int]:
    """Coordinates per group: ``dim`` shared equally, a group needing fewer keeps its size.

    Water-filling from the smallest group up: a group of ``P`` coordinates gets
    ``min(P, left / groups left)`` (at least 1), so small layers are not projected at
    all and the rest share what they leave.
    """
    out = [0] * len(sizes)
    left = dim
    order = sorted(range(len(sizes)), key=lambda i: sizes[i])
    for rank, i in enumerate(order):
        share = max(1, left // (len(sizes) - rank))
        out[i] = min(sizes[i], share)
        left = max(0, left - out[i])
    return out


def _kron_shape(d_out: int, width: int, budget: int) -> tuple[int, int]:
    """``(k_out, k_in)`` with ``k_out k_in <= budget`` (all of it when the layer fits)."""
    if d_out * width <= budget:
        return d_out, width
    k_out = min(d_out, max(1, math.isqrt(budget)))
    k_in = min(width, max(1, budget // k_out))
    return min(d_out, max(1, budget // k_in)), k_in


class LayerProjection:
    r"""Per-layer Kronecker projections of layer sites, a dense one for other parameters.

    Layer :math:`l` with weight :math:`(d_{out}, d_{in})` (a convolution's flattened
    to :math:`(C_{out}, C_{in} k_h k_w)`) and optional bias is projected as the matrix
    :math:`[W, b]` of width :math:`d_{in} + 1`: :math:`P_{out}^\top [W, b] P_{in}`,
    ``(k_out, k_in)`` coordinates. ``dim`` is shared over the layers (and the
    remaining parameters, as one group) by :func:`split_budget`; a layer whose
    parameters fit its share is not projected (:math:`P = I`, exact), and a side with
    ``k`` equal to its size keeps the identity. The entries of :math:`P_{out}` and
    :math:`P_{in}` are i.i.d. :math:`\mathcal{N}(0, 1/k)` (``"gaussian"``) or
    :math:`\pm 1/\sqrt{k}` (``"rademacher"``), drawn on the CPU in float64 from
    ``seed`` and the layer's position, so a seed gives the same matrices everywhere.

    Args:
        sizes: Number of coordinates of each attributed parameter, in order.
        layers: One ``(weight name, bias name, d_out, d_in)`` per layer site (a name
            ``None`` when not attributed); every other name of ``sizes`` is dense.
        dim: At most this many coordinates in all (:attr:`dim` is the number used).
        kind: ``"gaussian"`` or ``"rademacher"``.
        seed: Seed of every matrix.
    """

    def __init__(
        self,
        sizes: Mapping[str, int],
        layers: Sequence[tuple[str | None, str | None, int, int]],
        dim: int,
        kind: str = "gaussian",
        seed: int = 0,
    ) -> None:
        _check(dim, kind, ("projection_dim", "projection"))
        self.sizes = dict(sizes)
        self.total = sum(self.sizes.values())
        self.kind, self.seed, self.requested = kind, int(seed), dim
        self.layers = [tuple(layer) for layer in layers]
        self._index = {(w, b): i for i, (w, b, _, _) in enumerate(self.layers)}
        inside = {n for w, b, _, _ in self.layers for n in (w, b) if n is not None}
        if not inside <= set(self.sizes):
            raise ValueError("every layer parameter must be one of `sizes`")
        self.rest = [n for n in self.sizes if n not in inside]
        widths = [
            (d_out, (d_in if w else 0) + (1 if b else 0)) for w, b, d_out, d_in in self.layers
        ]
        groups = [o * i for o, i in widths]
        rest_size = sum(self.sizes[n] for n in self.rest)
        budgets = split_budget(groups + ([rest_size] if self.rest else []), dim)
        self.shapes = [_kron_shape(o, i, b) for (o, i), b in zip(widths, budgets)]
        self._widths = widths
        self._dense = None
        rest_dim = 0
        if self.rest:
            rest_dim = budgets[-1]
            if rest_dim < rest_size:
                rest_sizes = {n: self.sizes[n] for n in self.rest}
                self._dense = RandomProjection(rest_sizes, rest_dim, kind, self.seed)
        self.dim = sum(o * i for o, i in self.shapes) + rest_dim
        self._cache: dict[tuple[int, int, torch.dtype, torch.device], Tensor | None] = {}

    def __repr__(self) -> str:
        return (
            f"LayerProjection(P={self.total}, dim={self.dim}, layers={self.shapes}, "
            f"kind={self.kind!r}, seed={self.seed})"
        )

    def side(
        self, layer: int, which: int, dtype: torch.dtype, device: torch.device
    ) -> Tensor | None:
        """:math:`P_{out}` (``which=0``, ``(d_out, k_out)``) or :math:`P_{in}` (``which=1``).

        ``None`` for a side kept whole (the identity).
        """
        key = (layer, which, dtype, device)
        if key not in self._cache:
            size, k = self._widths[layer][which], self.shapes[layer][which]
            self._cache[key] = (
                None
                if k == size
                else _draw(
                    size, k, self.kind, self.seed * 1_000_003 + (1 << 40) + 2 * layer + which
                ).to(dtype=dtype, device=device)
            )
        return self._cache[key]

    def _layer_matrix(self, x: Mapping[str, Tensor], layer: int) -> Tensor:
        """A layer's gradient rows ``(..., d_out, width)`` from the flat blocks of ``x``."""
        w, b, d_out, d_in = self.layers[layer]
        parts = []
        if w is not None:
            parts.append(x[w].reshape(*x[w].shape[:-1], d_out, d_in))
        if b is not None:
            parts.append(x[b].unsqueeze(-1))
        return torch.cat(parts, -1) if len(parts) > 1 else parts[0]

    def __call__(self, x: Tensor | Mapping[str, Tensor]) -> Tensor:
        """Project ``(..., P)`` rows, or a dict of ``(..., numel)`` blocks, to ``(..., dim)``."""
        if not isinstance(x, Mapping):
            if x.shape[-1] != self.total:
                raise ValueError(f"expected vectors of size {self.total}, got {x.shape[-1]}")
            x = dict(zip(self.sizes, x.split(list(self.sizes.values()), dim=-1)))
        elif set(x) != set(self.sizes):
            raise ValueError("the dict keys must be the projection's parameter names")
        ref = next(iter(x.values()))
        out = []
        for i in range(len(self.layers)):
            g = self._layer_matrix(x, i)
            p_out, p_in = (self.side(i, j, ref.dtype, ref.device) for j in (0, 1))
            if p_out is not None:
                g = p_out.T @ g
            if p_in is not None:
                g = g @ p_in
            out.append(g.flatten(-2))
        if self.rest:
            out.append(self._project_rest(x))
        return torch.cat(out, -1)

    def project_factors(
        self,
        factors: Sequence[tuple[Tensor, Tensor]],
        keys: Sequence[tuple[str | None, str | None]],
    ) -> Tensor:
        r"""Project per-example layer gradients given by their factors, ``(B, dim)``.

        Args:
            factors: Per layer ``(a (B, T, d_in), d (B, T, d_out))``; example :math:`i`'s
                gradient is :math:`\sum_t d_{it} [a_{it}, 1]^\top`, or for an
                elementwise layer (BatchNorm, its parameters among :attr:`rest`)
                :math:`\sum_t d_{it} \odot a_{it}` (weight) and :math:`\sum_t d_{it}`
                (bias), formed and projected densely like :meth:`__call__` does.
            keys: Per layer its ``(weight name, bias name)``; together the layers must
                hold every projected parameter.

        Returns:
            The same rows as projecting the formed gradients with :meth:`__call__`.
        """
        kron = [k for k in keys if k in self._index]
        rest: dict[str, Tensor] = {}
        for (a, d), key in zip(factors, keys):
            if key not in self._index:  # elementwise: (B, C) gradients, projected densely
                w, b = key
                if w is not None:
                    rest[w] = (d * a).sum(-2)
                if b is not None:
                    rest[b] = d.sum(-2)
        covered = sorted(self._index[k] for k in kron) == list(range(len(self.layers)))
        if not covered or sorted(rest) != sorted(self.rest):
            raise ValueError("the factors must cover every layer of the projection")
        blocks: list[Tensor | None] = [None] * len(self.layers)
        for (a, d), key in zip(factors, keys):
            if key not in self._index:
                continue
            i = self._index[key]
            w, b, _, _ = self.layers[i]
            p_out, p_in = (self.side(i, j, d.dtype, d.device) for j in (0, 1))
            left = d if p_out is None else d @ p_out  # (B, T, k_out)
            if w is None:  # a bias alone: sum_t d_t
                right = torch.ones_like(a[..., :1])
            elif p_in is None:
                right = torch.cat([a, torch.ones_like(a[..., :1])], -1) if b is not None else a
            else:
                right = a @ p_in[: a.shape[-1]]
                if b is not None:
                    right = right + p_in[-1]
            blocks[i] = (left.mT @ right).flatten(-2)
        if self.rest:
            blocks.append(self._project_rest(rest))
        return torch.cat(blocks, -1)  # type: ignore[arg-type]

    def _project_rest(self, x: Mapping[str, Tensor]) -> Tensor:
        """The parameters outside the layers, ``(..., numel)`` each: dense (or as they are)."""
        rest = {n: x[n] for n in self.rest}
        return torch.cat(list(rest.values()), -1) if self._dense is None else self._dense(rest)
