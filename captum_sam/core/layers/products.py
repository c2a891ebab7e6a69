r"""Per-example gradient products from layer factors, by the cheaper of two routes.

A site's per-example gradient :math:`G_i = \sum_t d_{it} a_{it}^\top` (see
:mod:`~captum_sam.core.layers.sites`) enters an inner product either

* *ghost*: :math:`\langle G_i, G'_j \rangle = \sum_{t,s} (d_{it}\cdot d'_{js})
  (a_{it}\cdot a'_{js})`, :math:`O(T^2 (d_{in} + d_{out}))` per pair and nothing
  formed (best for a linear layer, ``T = 1``), or
* *formed*: :math:`G_i` itself from one batched matmul, :math:`O(T d_{in} d_{out})`
  per example, then :math:`O(d_{in} d_{out})` per pair (best for a convolution,
  ``T = H' W'`` large and small channel counts).

:func:`prefers_formed` compares the two costs; :func:`compact` turns factors into the
cheaper representation per site, and every product here accepts either per site:
a factor pair ``(a, d)`` or a :class:`Formed` ``(weight (B, d_out, d_in), bias
(B, d_out))``. Mixed pairs are formed. A bias is the gradient of a weight on a
constant input 1: :math:`\nabla_b l_i = \sum_t d_{it}`. An elementwise site
(BatchNorm, :attr:`~captum_sam.core.layers.sites.LayerType.diagonal`) is always formed,
its weight gradient :math:`\sum_t d_{it} \odot a_{it}` kept as a ``(B, C, 1)`` matrix.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from captum_sam import core as F
from captum_sam.core.layers.sites import Site

__all__ = [
    "Formed",
    "Entry",
    "prefers_formed",
    "form",
    "compact",
    "factor_dots",
    "factor_cross",
    "factor_apply",
    "factor_grad_sum",
    "concat_factors",
    "map_rows",
    "row_count",
    "entry_floats",
]


class Formed(NamedTuple):
    """A site's per-example gradients, formed.

    ``weight (..., B, d_out, d_in)`` and ``bias (..., B, d_out)``; a parameter the
    site does not attribute is ``None``.
    """

    weight: Tensor | None
    bias: Tensor | None


Entry = tuple[Tensor, Tensor] | Formed
"""One site's per-example gradients: factors ``(a, d)`` or :class:`Formed`."""


def prefers_formed(site: Site, positions: int, pairs_per_row: float = 1.0) -> bool:
    r"""Whether forming the site's gradients beats ghost products, by operation count.

    Ghost: :math:`T^2 (d_{in} + d_{out})` per pair. Formed: :math:`T d_{in} d_{out}`
    per row to form, amortised over the ``pairs_per_row`` pairs each row enters
    (1 for per-example products of two weight points, the number of test rows for
    test-train products), plus :math:`d_{in} d_{out}` per pair.
    """
    if site.weight is None or site.diagonal:  # sum_t d_t (* a_t): nothing to save
        return True
    ghost = positions * positions * (site.d_in + site.d_out)
    formed = site.d_in * site.d_out * (1.0 + positions / max(pairs_per_row, 1e-12))
    return formed < ghost


def form(entry: Entry, site: Site) -> Formed:
    """The per-example gradients of an entry, formed (one batched matmul for the weight)."""
    if isinstance(entry, Formed):
        return entry
    a, d = entry
    weight = None
    if site.weight is not None:  # an elementwise site's (B, C, 1): a (C, 1) "matrix"
        weight = (d * a).sum(-2).unsqueeze(-1) if site.diagonal else d.mT @ a
    return Formed(weight, d.sum(-2) if site.bias is not None else None)


def compact(f: Sequence[Entry], sites: Sequence[Site], pairs_per_row: float = 1.0) -> list[Entry]:
    """Factors kept where ghost products are cheaper, formed gradients elsewhere."""
    return [
        e
        if isinstance(e, Formed) or not prefers_formed(site, e[0].shape[-2], pairs_per_row)
        else form(e, site)
        for e, site in zip(f, sites)
    ]


def _pairs(x: Tensor, y: Tensor) -> Tensor:
    """``(B, T, n) x (B, T', n) -> (B, T, T')`` inner products (``(B,)`` when T = T' = 1)."""
    if x.shape[1] == 1 and y.shape[1] == 1:
        if x is y:
            return torch.linalg.vector_norm(x[:, 0], dim=1).square()
        return (x[:, 0] * y[:, 0]).sum(1)
    return torch.bmm(x, y.transpose(1, 2))


def _rowdot(x: Tensor, y: Tensor) -> Tensor:
    """``(B, ...) x (B, ...) -> (B,)`` inner products of matching rows."""
    x, y = x.flatten(1), y.flatten(1)
    if x is y:
        return torch.linalg.vector_norm(x, dim=1).square()
    return torch.einsum("bi,bi->b", x, y)


def _formed_dots(f: Formed, g: Formed) -> Tensor:
    total = 0
    if f.weight is not None:
        total = _rowdot(f.weight, g.weight)  # type: ignore[arg-type]
    if f.bias is not None:
        total = total + _rowdot(f.bias, g.bias)  # type: ignore[arg-type]
    return total  # type: ignore[return-value]


def factor_dots(f: Sequence[Entry], g: Sequence[Entry], sites: Sequence[Site]) -> Tensor:
    """Per-example inner products of the gradients ``f`` and ``g`` stand for, ``(B,)``."""
    total = None
    for site, x, y in zip(sites, f, g):
        if isinstance(x, Formed) or isinstance(y, Formed):
            term = _formed_dots(form(x, site), form(y, site))
        elif prefers_formed(site, max(x[0].shape[1], y[0].shape[1])):
            fx = form(x, site)
            term = _formed_dots(fx, fx if y is x else form(y, site))
        else:
            (a, d), (a2, d2) = x, y
            term = 0
            if site.weight is not None:
                prod = _pairs(d, d2) * _pairs(a, a2)
                term = prod if prod.dim() == 1 else prod.sum((1, 2))
            if site.bias is not None:
                term = term + (d.sum(1) * d2.sum(1)).sum(1)
        total = term if total is None else total + term
    return total  # type: ignore[return-value]


def _formed_cross(f: Formed, g: Formed) -> Tensor:
    total = None
    if f.weight is not None:
        total = f.weight.flatten(1) @ g.weight.flatten(1).T  # type: ignore[union-attr]
    if f.bias is not None:
        term = f.bias @ g.bias.T  # type: ignore[union-attr]
        total = term if total is None else total.add_(term)
    return total  # type: ignore[return-value]


def factor_cross(f: Sequence[Entry], g: Sequence[Entry], sites: Sequence[Site]) -> Tensor:
    """Inner products of every gradient of ``f`` with every one of ``g``, ``(m, B)``.

    The route per site follows ``f`` (the side built once, e.g. the test rows):
    formed when ``f`` is formed (or ``g`` is), ghost when both are factors.
    """
    total = None
    for site, x, y in zip(sites, f, g):
        if isinstance(x, Formed) or isinstance(y, Formed) or site.diagonal:
            term = _formed_cross(form(x, site), form(y, site))
        elif site.weight is not None and x[0].shape[1] == 1 and y[0].shape[1] == 1:
            (a, d), (a2, d2) = x, y
            # (d . d2)(a . a2); a bias is a weight on a constant input 1. In place: an
            # (m, B) buffer fewer per operation is 3x faster for large m and B
            term = a[:, 0] @ a2[:, 0].T
            if site.bias is not None:
                term += 1
            term.mul_(d[:, 0] @ d2[:, 0].T)
        else:
            (a, d), (a2, d2) = x, y
            term = 0
            if site.weight is not None:  # positions: sum over t, s of (d_t . d2_s)(a_t . a2_s)
                dd = torch.einsum("mto,bso->mbts", d, d2)
                term = (dd * torch.einsum("mti,bsi->mbts", a, a2)).sum((2, 3))
            if site.bias is not None:
                term = term + d.sum(1) @ d2.sum(1).T
        total = term if total is None else total.add_(term)
    return total  # type: ignore[return-value]


def factor_apply(f: Sequence[Entry], rows: F.Params, sites: Sequence[Site]) -> Tensor:
    """Inner products of a few full gradients with the factored ones, ``(m, B)``.

    Args:
        f: Per-site gradients of ``B`` examples (factors or formed).
        rows: Gradients ``name -> (m, numel)`` (e.g. a summed test gradient).
        sites: From :func:`~captum_sam.core.layers.sites.layer_sites`.
    """
    total = None
    for site, entry in zip(sites, f):
        if site.diagonal:
            entry = form(entry, site)
        if isinstance(entry, Formed):
            w = (
                None
                if site.weight is None
                else rows[site.weight].reshape(-1, site.d_out, site.d_in)
            )
            term = _formed_cross(Formed(w, rows[site.bias] if site.bias else None), entry)
        else:
            a, d = entry
            term = 0
            if site.weight is not None:
                w = rows[site.weight].reshape(-1, site.d_out, site.d_in)  # (m, out, in)
                moved = torch.matmul(a.unsqueeze(0), w.transpose(1, 2).unsqueeze(1))  # (m,B,T,out)
                term = (moved * d.unsqueeze(0)).sum((2, 3))
            if site.bias is not None:
                term = term + rows[site.bias] @ d.sum(1).T
        total = term if total is None else total + term
    return total  # type: ignore[return-value]


def factor_grad_sum(f: Sequence[Entry], sites: Sequence[Site]) -> F.Params:
    """The gradient of the summed loss of the rows, in the parameters' shapes.

    Entries with leading dimensions (e.g. ``(steps, B, T, d)``) give one gradient per
    leading index.
    """
    out = {}
    for site, entry in zip(sites, f):
        if site.diagonal:
            entry = form(entry, site)
        if isinstance(entry, Formed):
            w = None if entry.weight is None else entry.weight.sum(-3)
            b = None if entry.bias is None else entry.bias.sum(-2)
        else:
            a, d = entry
            w = d.flatten(-3, -2).mT @ a.flatten(-3, -2) if site.weight is not None else None
            b = d.sum((-3, -2)) if site.bias is not None else None
        if site.weight is not None:
            out[site.weight] = w.reshape(*w.shape[:-2], *site.module.weight.shape)  # type: ignore[union-attr]
        if site.bias is not None:
            out[site.bias] = b
    return out  # type: ignore[return-value]


def map_rows(f: Sequence[Entry], fn: Callable[[Tensor], Tensor]) -> list[Entry]:
    """``fn`` applied to every tensor of every entry (e.g. a row selection)."""
    return [
        Formed(*(None if x is None else fn(x) for x in e))
        if isinstance(e, Formed)
        else (fn(e[0]), fn(e[1]))
        for e in f
    ]


def concat_factors(
    parts: Sequence[Sequence[Entry]], sites: Sequence[Site] | None = None
) -> list[Entry]:
    """Entries of several batches as the entries of one batch (rows in order).

    A site that is formed in one part and factored in another is formed (``sites``
    is then needed).
    """
    out: list[Entry] = []
    for i in range(len(parts[0])):
        column = [p[i] for p in parts]
        if all(not isinstance(e, Formed) for e in column):
            out.append((torch.cat([e[0] for e in column]), torch.cat([e[1] for e in column])))
            continue
        if sites is None and not all(isinstance(e, Formed) for e in column):
            raise ValueError("`sites` is needed to concatenate formed and factored entries")
        formed = [e if isinstance(e, Formed) else form(e, sites[i]) for e in column]  # type: ignore[index]
        out.append(
            Formed(
                *(
                    None if formed[0][j] is None else torch.cat([e[j] for e in formed])
                    for j in range(2)
                )
            )
        )
    return out


def row_count(f: Sequence[Entry]) -> int:
    """Number of rows (examples) of the entries."""
    e = f[0]
    first = next(x for x in e if x is not None)
    return int(first.shape[0])


def entry_floats(f: Sequence[Entry]) -> int:
    """Number of stored numbers of the entries (all rows)."""
    return sum(x.numel() for e in f for x in e if x is not None)
