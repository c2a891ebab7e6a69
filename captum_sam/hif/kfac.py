r"""K-FAC and EK-FAC: block-diagonal Kronecker-factored curvature of the summed loss.

Each site :math:`l` (an ``nn.Linear`` or ``nn.Conv2d`` of
:mod:`~captum_sam.hif.kron_sites`, its weight and bias as one ``(d_out, width)``
matrix) is one diagonal block; blocks of different layers, and of attributed and
non-attributed parameters, are zero. Over the curvature data, with layer inputs
:math:`a_{it}` (a constant 1 appended when the bias is attributed) and
pseudo-gradients :math:`d_{cit}` (one per column of a square root of the loss Hessian
in the model output):

.. math::

   A_l = \sum_{i,t} a_{it} a_{it}^\top, \qquad
   S_l = \sum_{i,c,t} d_{cit} d_{cit}^\top, \qquad
   N_l = \sum_i T_i ,

and with the eigendecompositions :math:`A_l = Q_A \operatorname{diag}(\alpha) Q_A^\top`,
:math:`S_l = Q_S \operatorname{diag}(\sigma) Q_S^\top`, the block is
:math:`K_l = (Q_S \otimes Q_A) \operatorname{diag}(\Lambda) (Q_S \otimes Q_A)^\top`, where

* K-FAC: :math:`\Lambda_{jk} = \sigma_j \alpha_k / N_l`, i.e.
  :math:`K_l = S_l \otimes A_l / N_l`;
* EK-FAC: :math:`\Lambda_{jk} = \sum_{i,c} \bigl((Q_S^\top G_{ic} Q_A)_{jk}\bigr)^2`
  with :math:`G_{ic} = \sum_t d_{cit} a_{it}^\top`, the exact diagonal of the
  Gauss-Newton block in the Kronecker eigenbasis.

Both equal the layer's generalised Gauss-Newton block when it sees one example at one
position (:math:`K_l = \sum_c d_c d_c^\top \otimes a a^\top`). Everything is on the
*summed* loss scale (times ``scale``, e.g. :math:`n/m` for a rescaled Hessian set).
Products and inverses then cost two small matrix products per block:
:math:`K_l V = Q_S [\Lambda \odot (Q_S^\top V Q_A)] Q_A^\top`.

A wide input whose curvature data has fewer rows than columns (the linear layer after a
``Flatten`` on a few thousand examples) gets a *thin* :math:`Q_A` ``(width, k)``, the
eigenvectors of :math:`A_l` on the span of its rows, found from the rows themselves
(:func:`_thin_eigenpairs`: a QR of the ``(rows, width)`` inputs and a ``k x k``
eigendecomposition, never the ``width x width`` one). Both K-FAC's and EK-FAC's
:math:`\Lambda` are exactly 0 on the rest of the input space (no input has a component
there), so products ignore it and inverses scale it by :math:`1 / r_l`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from captum_sam import core as F
from captum_sam.core.distributed import all_reduce_sum, rank_and_world
from captum_sam.hif.kron_sites import KroneckerSite, site_factors

__all__ = ["KINDS", "KroneckerFactors", "KroneckerCurvature", "fit_kronecker", "empty_factors"]

KINDS = ("kfac", "ekfac")
"""The Kronecker-factored curvatures."""

_CHUNK_ELEMENTS = 1 << 24  # entries of one chunk of rotated per-example gradients
_APPLY_ELEMENTS = 1 << 25  # entries of the columns a product or solve takes at once
_GRAM_BLOCKS = 4  # a wide A_l sums its lower triangle in this many row blocks
_GRAM_MIN_WIDTH = 1024  # narrower ones take one full product
_THIN_MIN_WIDTH = 2048  # an input at least this wide ...
_THIN_ROWS = 0.75  # ... with at most this fraction of its width in rows gets a thin Q_A

Block = Tensor | tuple[Tensor, Tensor]
"""Columns of one block: a ``(m, d_out, width)`` matrix, or its factors ``(c, d)``."""


@dataclass
class KroneckerFactors:
    """The raw sums of one site: ``A (width, width)``, ``S (d_out, d_out)``, ``N`` rows.

    ``a`` is ``None`` once released (:meth:`KroneckerCurvature.release_input_sums`),
    and never formed for a thin :math:`Q_A` (see the module's notes).
    """

    a: Tensor | None
    s: Tensor
    count: Tensor  # () number of (example, position) rows summed in A


def empty_factors(site: KroneckerSite, like: Tensor, input_sum: bool = True) -> KroneckerFactors:
    """Zero sums for ``site`` with the dtype and device of ``like``.

    ``a`` is ``None`` unless ``input_sum`` (inputs kept as rows for a thin basis).
    """
    return KroneckerFactors(
        like.new_zeros(site.width, site.width) if input_sum else None,
        like.new_zeros(site.d_out, site.d_out),
        like.new_zeros(()),
    )


@dataclass
class KroneckerCurvature:
    r"""Block-diagonal Kronecker-factored curvature of the attributed parameters.

    Attributes:
        kind: ``"kfac"`` or ``"ekfac"``.
        sites: One per block.
        like: Attributed parameters (names, order and shapes of flat ``(P, m)`` columns).
        factors: The sums of each block (:class:`KroneckerFactors`).
        qs: Eigenvectors of each :math:`S_l`, ``(d_out, d_out)``.
        qa: Eigenvectors of each :math:`A_l`, ``(width, k)``: ``k = width``, or fewer
            (a thin basis, the span of the layer's inputs; :math:`\Lambda` is 0 on the
            rest).
        values: Each block's eigenvalues :math:`\Lambda` ``(d_out, k)`` in the basis
            ``qs[:, j] (x) qa[:, k]``, scale included.
    """

    kind: str
    sites: list[KroneckerSite]
    like: F.Params
    factors: list[KroneckerFactors]
    qs: list[Tensor]
    qa: list[Tensor]
    values: list[Tensor]

    # ------------------------------------------------------------------ layout

    def split(self, columns: Tensor) -> list[Tensor]:
        """Flat ``(P, m)`` columns as one ``(m, d_out, width)`` matrix per block."""
        tree = F.unflatten(columns.T, self.like, batch_dims=1)
        return [site.to_matrix(tree) for site in self.sites]

    def join(self, matrices: Sequence[Tensor]) -> Tensor:
        """Inverse of :meth:`split`: ``(P, m)``."""
        tree: F.Params = {}
        for site, matrix in zip(self.sites, matrices):
            tree.update(site.from_matrix(matrix, self.like))
        return F.flatten(tree, list(self.like), batch_dims=1).T

    def _apply(self, columns: Tensor, scale: Callable[[int, Tensor], Tensor]) -> Tensor:
        """``Q_S [scale(l, Lambda_l) * (Q_S^T V Q_A)] Q_A^T`` per block, on ``(P, m)``.

        Wide ``columns`` are taken a few columns at a time (about
        :data:`_APPLY_ELEMENTS` entries each) into one output: the per-block copies and
        rotations of a chunk are the only transient memory.
        """
        step = max(1, _APPLY_ELEMENTS // max(1, columns.shape[0]))
        if columns.shape[1] <= step:
            return self._apply_chunk(columns, scale)
        out = torch.empty_like(columns)
        for start in range(0, columns.shape[1], step):
            part = slice(start, start + step)
            out[:, part] = self._apply_chunk(columns[:, part], scale)
        return out

    def _apply_chunk(self, columns: Tensor, scale: Callable[[int, Tensor], Tensor]) -> Tensor:
        return self._apply_blocks(self.split(columns), scale)

    def _apply_blocks(
        self, blocks: Sequence[Block], scale: Callable[[int, Tensor], Tensor]
    ) -> Tensor:
        r""":meth:`_apply` on per-block ``(m, d_out, width)`` matrices or factor pairs.

        A pair ``(c, d)`` (``(m, T, width)`` columns, ``(m, T, d_out)`` output rows) is the
        matrix :math:`\sum_t d_t c_t^\top`; it is rotated as
        :math:`(d Q_S)^\top (c Q_A)` (:math:`T(d_{out}^2 + w^2)` per row) when that is
        cheaper than forming it and rotating the matrix (:math:`d_{out} w (d_{out} + w)`):
        few positions and wide inputs, e.g. the last convolutions of a ResNet.
        """
        return self.join([self._apply_block(i, v, scale) for i, v in enumerate(blocks)])

    def _apply_block(self, i: int, v: Block, scale: Callable[[int, Tensor], Tensor]) -> Tensor:
        """Block ``i`` of :meth:`_apply_blocks`: ``(m, d_out, width)``."""
        ref = v[0] if isinstance(v, tuple) else v
        qs, qa = self.qs[i].to(ref), self.qa[i].to(ref)
        lam = self.values[i].to(ref)
        if not isinstance(v, tuple):
            rotated = qs.T @ v @ qa
        else:
            c, d = v
            o, (w, k) = qs.shape[0], qa.shape
            if c.shape[-2] * (o * o + w * k) < o * w * (o + k):
                rotated = (d @ qs).mT @ (c @ qa)
            else:
                rotated = qs.T @ (d.mT @ c) @ qa
        out = qs @ (scale(i, lam) * rotated) @ qa.T
        if qa.shape[1] < qa.shape[0]:  # a thin basis: Lambda is 0 on the rest of the inputs
            rest = scale(i, lam.new_zeros(()))
            if bool(rest != 0):
                full = v if not isinstance(v, tuple) else v[1].mT @ v[0]
                out += rest * (full - (full @ qa) @ qa.T)
        return out

    # ------------------------------------------------------------------ products

    @property
    def dim(self) -> int:
        """Number of attributed coordinates ``P``."""
        return sum(v.numel() for v in self.like.values())

    def product(self, columns: Tensor) -> Tensor:
        """:math:`K` times ``(P, m)`` columns."""
        return self._apply(columns, lambda i, lam: lam)

    def solve(self, columns: Tensor, shift: Tensor, tol: float | None = None) -> Tensor:
        r""":math:`(K + r I)^{-1}` times ``(P, m)`` columns, exactly, in the eigenbasis.

        Args:
            columns: ``(P, m)``.
            shift: The regulariser :math:`r_l` of each block, ``(blocks,)``.
            tol: Eigenvalues :math:`\Lambda + r_l` at or below ``tol`` are dropped
                (their inverse taken as 0, Captum's ``hessian_inverse_tol``); ``None``
                drops exact zeros only.
        """
        return self._apply(columns, self._inverse(shift, tol))

    @staticmethod
    def _inverse(shift: Tensor, tol: float | None) -> Callable[[int, Tensor], Tensor]:
        """The scale of :meth:`solve`: ``1 / (Lambda + r_l)``, 0 where dropped."""

        def inverse(i: int, lam: Tensor) -> Tensor:
            total = lam + shift[i].to(lam)
            keep = total != 0 if tol is None else total > tol
            return torch.where(keep, 1 / torch.where(keep, total, 1.0), 0.0)

        return inverse

    def solve_blocks(
        self, blocks: Sequence[Block], shift: Tensor, tol: float | None = None
    ) -> Tensor:
        """:meth:`solve` of columns given per block (see :meth:`_apply_blocks`): ``(P, m)``.

        For per-example gradients that come as layer factors: a block with few positions
        is rotated from its factors, never formed.
        """
        return self._apply_blocks(blocks, self._inverse(shift, tol))

    def solve_some(
        self, which: Sequence[int], blocks: Sequence[Block], shift: Tensor, tol: float | None = None
    ) -> list[Tensor]:
        """:meth:`solve_blocks` of the blocks ``which`` alone: their ``(m, d_out, width)``."""
        scale = self._inverse(shift, tol)
        return [self._apply_block(i, v, scale) for i, v in zip(which, blocks)]

    def matrix(self) -> Tensor:
        """:math:`K` as a dense ``(P, P)`` matrix (for checks on small models)."""
        ref = self.values[0]
        return self.product(torch.eye(self.dim, dtype=ref.dtype, device=ref.device))

    def release_input_sums(self) -> None:
        """Drop every :math:`A_l` (``factors[l].a``) to save memory.

        Products and solves use only the eigenvectors and eigenvalues, and a
        convolution's :math:`A_l` is as large as its eigenvectors (``(width, width)``,
        370 MB over the layers of a ResNet-18).
        """
        for f in self.factors:
            f.a = None

    def mean_eigenvalues(self) -> Tensor:
        """The mean eigenvalue of each block, ``trace(K_l) / (d_out width)``, ``(blocks,)``."""
        return torch.stack(
            [v.mean() * (v.shape[1] / s.width) for v, s in zip(self.values, self.sites)]
        )

    def _grid(self, i: int) -> Tensor:
        """Block ``i``'s eigenvalues as ``(d_out, width)`` (zeros beyond a thin basis)."""
        lam, width = self.values[i], self.sites[i].width
        if lam.shape[1] == width:
            return lam
        grid = lam.new_zeros(lam.shape[0], width)
        grid[:, : lam.shape[1]] = lam
        return grid

    def eigenpairs(self, shift: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Every eigenvalue of :math:`K + r`: ``(values (P,), block (P,), position (P,))``.

        ``position`` indexes the block's ``(d_out, width)`` eigenvalue matrix, flattened
        (beyond a thin basis' ``k`` columns: the eigenvalue 0 of the rest of the inputs).
        """
        values = [self._grid(i).flatten() + shift[i].to(lam) for i, lam in enumerate(self.values)]
        blocks = [torch.full_like(v, i, dtype=torch.long) for i, v in enumerate(values)]
        positions = [torch.arange(len(v), device=v.device) for v in values]
        return torch.cat(values), torch.cat(blocks), torch.cat(positions)

    def eigenvectors(self, blocks: Tensor, positions: Tensor) -> Tensor:
        """The eigenvectors ``(P, k)`` named by :meth:`eigenpairs`' block and position."""
        ref = self.values[0]
        out = ref.new_zeros(self.dim, len(blocks))
        for i, site in enumerate(self.sites):
            chosen = torch.nonzero(blocks == i).flatten()
            if len(chosen) == 0:
                continue
            rows = torch.div(positions[chosen], site.width, rounding_mode="floor")
            cols = positions[chosen] - rows * site.width
            inputs = self._input_vectors(i, cols)
            matrices = self.qs[i][:, rows].T.unsqueeze(2) * inputs.T.unsqueeze(1)
            full = [ref.new_zeros(len(chosen), s.d_out, s.width) for s in self.sites]
            full[i] = matrices
            out[:, chosen] = self.join(full)
        return out

    def _input_vectors(self, i: int, cols: Tensor) -> Tensor:
        """Columns ``cols`` of block ``i``'s complete input basis, ``(width, len(cols))``.

        Beyond a thin basis' ``k`` columns: an orthonormal basis of the rest, from a
        complete QR of ``qa`` (``width x width``: formed only when asked for).
        """
        qa = self.qa[i]
        k = qa.shape[1]
        if k == qa.shape[0] or bool((cols < k).all()):
            return qa[:, cols]
        rest = torch.linalg.qr(qa, mode="complete")[0][:, k:]
        out = qa.new_empty(qa.shape[0], len(cols))
        inside = cols < k
        out[:, inside] = qa[:, cols[inside]]
        out[:, ~inside] = rest[:, cols[~inside] - k]
        return out


def _accumulate_covariances(
    factors: list[KroneckerFactors],
    batch_factors: list[tuple[Tensor, Tensor]],
    sites: Sequence[KroneckerSite],
    rows: list[_KeptRows | None],
) -> None:
    """Add one batch to the sums.

    A site with kept ``rows`` keeps its inputs instead of summing :math:`A_l`, until
    they are more than :func:`_row_limit` allows.
    """
    for i, (f, site, (a, d)) in enumerate(zip(factors, sites, batch_factors)):
        cols = site.columns(a).flatten(0, 1)  # (B T, width)
        kept = rows[i]
        if kept is not None and not kept.add(cols):  # too many: sum A_l after all
            f.a = _input_sum(kept, site, cols)
            rows[i] = kept = None
        if kept is None:
            _add_lower_gram(f.a, cols)  # type: ignore[arg-type]
        flat = d.reshape(-1, d.shape[-1])  # (C B T, d_out)
        f.s += flat.T @ flat
        f.count += cols.shape[0]


def _row_limit(site: KroneckerSite) -> int:
    """Most rows of curvature data (over every rank) for a thin input basis; -1: none."""
    return int(_THIN_ROWS * site.width) if site.width >= _THIN_MIN_WIDTH else -1


class _KeptRows:
    """A site's layer inputs kept during pass 1, at most ``limit`` rows, in one buffer.

    One allocation, made on the first rows: its untouched rows take no resident memory,
    and it is returned at once when released (kept as one small tensor per batch, the
    rows of a 8193-wide layer pinned 200 MB of the allocator's heap after they were
    summed into :math:`A_l`).
    """

    def __init__(self, limit: int) -> None:
        self.limit, self.count = limit, 0
        self.buffer: Tensor | None = None

    def add(self, cols: Tensor) -> bool:
        """Keep ``cols`` ``(rows, width)``; ``False`` (nothing kept) past the limit."""
        if self.count + len(cols) > self.limit:
            return False
        if self.buffer is None:
            self.buffer = cols.new_empty(self.limit, cols.shape[1])
        self.buffer[self.count : self.count + len(cols)] = cols
        self.count += len(cols)
        return True

    def take(self, like: Tensor, width: int) -> Tensor:
        """The kept rows ``(count, width)``, released from here (the caller's now)."""
        out = like.new_zeros(0, width) if self.buffer is None else self.buffer[: self.count]
        self.buffer, self.count = None, 0
        return out


def _input_sum(kept: _KeptRows, site: KroneckerSite, like: Tensor) -> Tensor:
    """The lower triangle of :math:`A_l` summed from the ``kept`` rows (released)."""
    total = like.new_zeros(site.width, site.width)
    _add_lower_gram(total, kept.take(like, site.width))
    return total


def _input_eigenpairs(
    factors: list[KroneckerFactors],
    rows: list[_KeptRows | None],
    sites: Sequence[KroneckerSite],
    like: Tensor,
    reduce: bool,
) -> list[tuple[Tensor, Tensor]]:
    """Eigenvalues and eigenvectors of every :math:`A_l` (summed over ranks with ``reduce``).

    A site whose inputs were kept on every rank, in at most :func:`_row_limit` rows in
    all, gets a thin basis from the rows of every rank (:func:`_thin_eigenpairs`); the
    others sum :math:`A_l` (from the kept rows if need be) and eigendecompose it.
    """
    rank, world = rank_and_world() if reduce else (0, 1)
    # per site and rank: rows kept, or -1 when summed; every rank sees every count
    counts = torch.zeros(len(sites), world, dtype=torch.float64)
    for i, kept in enumerate(rows):
        counts[i, rank] = -1 if kept is None else kept.count
    if reduce:
        all_reduce_sum(counts)
    out = []
    for i, (f, site, kept) in enumerate(zip(factors, sites, rows)):
        thin = bool((counts[i] >= 0).all()) and float(counts[i].sum()) <= _row_limit(site)
        if thin:
            assert kept is not None
            pieces = [kept.take(like, site.width)]
            if reduce:
                pieces = [_gathered_rows(pieces.pop(), counts[i].long(), rank)]
            out.append(_thin_eigenpairs(pieces))
            continue
        if kept is not None:  # kept here, summed on another rank
            f.a = _input_sum(kept, site, like)
        f.a = _symmetrized(f.a)  # type: ignore[arg-type]
        if reduce:
            all_reduce_sum(f.a)
        alpha, q_a = torch.linalg.eigh(f.a)
        out.append((alpha, q_a.contiguous()))  # eigh's are column-major; a reloaded cache is not
    return out


def _gathered_rows(x: Tensor, counts: Tensor, rank: int) -> Tensor:
    """Every rank's rows, in rank order (each rank adds its own into zeros)."""
    start = int(counts[:rank].sum())
    out = x.new_zeros(int(counts.sum()), x.shape[1])
    out[start : start + len(x)] = x
    return all_reduce_sum(out)


def _thin_eigenpairs(pieces: list[Tensor]) -> tuple[Tensor, Tensor]:
    r"""Eigenpairs of :math:`A = x^\top x` on the span of the rows ``x (m, width)``.

    ``x`` is given as row ``pieces`` (the list is emptied: the rows are freed as soon
    as they are no longer needed). With the QR :math:`x^\top = Q R` (``Q (width, k)``
    orthonormal, ``k = min(m, width)``), :math:`A = Q (R R^\top) Q^\top`, so
    :math:`R R^\top = W \operatorname{diag}(\alpha) W^\top` gives :math:`Q_A = Q W`,
    orthonormal to working precision however ill-conditioned ``x`` is:
    ``(alpha (k,), Q_A (width, k))``.
    """
    x = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
    pieces.clear()
    q, r = torch.linalg.qr(x.T)
    del x
    alpha, w = torch.linalg.eigh(r @ r.T)
    return alpha, q @ w


def _add_lower_gram(total: Tensor, x: Tensor) -> None:
    r"""``total += x^T x`` on and below the diagonal (above it, wide ``total`` is stale).

    A wide Gram matrix is summed in :data:`_GRAM_BLOCKS` row blocks, each against the
    columns up to its own end: about :math:`(k + 1) / 2k` of the full product's
    operations (the covariance of a convolution's patches is the largest cost of the
    K-FAC fit). :func:`_symmetrized` fills the upper triangle once at the end.
    """
    width = x.shape[1]
    if width < _GRAM_MIN_WIDTH:
        total.addmm_(x.T, x)
        return
    step = -(-width // _GRAM_BLOCKS)
    for start in range(0, width, step):
        end = min(start + step, width)
        total[start:end, :end].addmm_(x[:, start:end].T, x[:, :end])


def _symmetrized(total: Tensor) -> Tensor:
    """The symmetric matrix whose lower triangle (diagonal included) is ``total``'s."""
    return total.tril() + total.tril(-1).T


def _accumulate_diagonal(
    total: Tensor, qs: Tensor, qa: Tensor, site: KroneckerSite, a: Tensor, d: Tensor
) -> None:
    r"""Add :math:`\sum_{i,c} ((Q_S^T G_{ic} Q_A)_{jk})^2` of one batch to ``total``.

    Two orders, the cheaper one per layer: rotate the ``T`` inputs and pseudo-gradients
    first, then form :math:`G` in the eigenbasis (:math:`T(w^2 + C o^2)` per example
    before the common :math:`C o T w`: pays when few positions meet wide inputs), or
    form :math:`G_{ic}` and rotate it (:math:`C(o^2 w + o w^2)`: pays for the many
    positions and narrow inputs of early convolutions).
    """
    cols = site.columns(a)  # (B, T, width)
    count, size, positions = d.shape[0], d.shape[1], cols.shape[1]
    out, width, basis = site.d_out, site.width, qa.shape[1]
    if positions == 1:  # one position: (d_o a_k)^2 = d_o^2 a_k^2, G is never formed
        rot_a, rot_d = cols[:, 0] @ qa, d[:, :, 0] @ qs
        total += torch.einsum("cbo,bk->ok", rot_d.square(), rot_a.square())
        return
    rotate_first = positions * (width * basis + count * out * out)
    form_first = count * (out * out * width + out * width * basis)
    step = max(1, _CHUNK_ELEMENTS // (count * out * width))
    if form_first < rotate_first:
        for start in range(0, size, step):
            rows = slice(start, start + step)
            g = torch.einsum("cbto,btk->cbok", d[:, rows], cols[rows])
            total += (qs.T @ g @ qa).square().sum((0, 1))
        return
    rot_a, rot_d = cols @ qa, d @ qs  # (B, T, width), (C, B, T, d_out)
    for start in range(0, size, step):
        rows = slice(start, start + step)
        g = torch.einsum("cbto,btk->cbok", rot_d[:, rows], rot_a[rows])
        total += g.square().sum((0, 1))


def _signs(samples: int | None, seed: int, pass_: int, index: int) -> torch.Generator | None:
    """The sign generator of curvature batch ``index`` in pass ``pass_`` (``None``: exact)."""
    if samples is None:
        return None
    digest = hashlib.sha256(f"kfac signs {seed} {pass_} {index}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def fit_kronecker(
    floss: F.FunctionalLoss,
    params: F.Params,
    batches: Callable[[], Iterable[F.Batch]],
    sites: list[KroneckerSite],
    kind: str,
    scale: float = 1.0,
    reduce: bool = False,
    progress: Callable[[Iterable[Any], str], Iterable[Any]] | None = None,
    samples: int | None = None,
    seed: int = 0,
) -> tuple[KroneckerCurvature, float]:
    """Fit K-FAC or EK-FAC at ``params`` over the curvature data.

    One pass for the factors (:math:`A_l`, :math:`S_l`, :math:`N_l`; a wide layer with
    few rows keeps its inputs instead of :math:`A_l`, for a thin :math:`Q_A`), then for
    EK-FAC a second pass for the corrected eigenvalues. The first batch is checked: its factored
    gradients must equal ``autograd``'s (see :func:`~captum_sam.hif.kron_sites.site_factors`).

    Args:
        floss: Model and loss, bound to the non-attributed parameters at this point.
        params: Attributed parameters (the point).
        batches: ``() -> iterable`` of this process's curvature batches, each with its
            index in the whole curvature set (called per pass).
        sites: From :func:`~captum_sam.hif.kron_sites.kronecker_sites`, covering every
            attributed parameter.
        kind: ``"kfac"`` or ``"ekfac"``.
        scale: Factor on the curvature (the Hessian set's rescaling).
        reduce: Sum the factors over the ranks of a process group.
        progress: ``(iterable, description) -> iterable`` (a progress bar), or ``None``.
        samples: Pseudo-gradients per example: ``None`` the exact ``C``, else this many
            random-sign combinations (see :func:`~captum_sam.hif.kron_sites.site_factors`).
        seed: Seeds the signs: batch ``i`` of pass ``p`` draws from a generator seeded
            with ``(seed, p, i)`` (:func:`_signs`), so any split over ranks draws the
            signs of one process.

    Returns:
        The curvature and the most negative relative eigenvalue of the loss Hessians
        in the model output (0 when none is negative; see
        :func:`~captum_sam.hif.kron_sites.output_hessian_roots`).
    """
    if kind not in KINDS:
        raise ValueError(f"`kind` must be one of {KINDS}, got {kind!r}")
    wrap = progress or (lambda it, desc: it)
    ref = next(iter(params.values()))
    limits = [_row_limit(s) for s in sites]
    rows = [_KeptRows(limit) if limit >= 0 else None for limit in limits]
    factors = [empty_factors(s, ref, kept is None) for s, kept in zip(sites, rows)]
    worst, first = 0.0, True
    passes = 2 if kind == "ekfac" else 1
    for i, batch in wrap(batches(), f"{kind.upper()} factors (pass 1 of {passes})"):
        gen = _signs(samples, seed, 1, i)
        found, low = site_factors(floss, params, batch, sites, first, samples, gen)
        first, worst = False, min(worst, low)
        _accumulate_covariances(factors, found, sites, rows)
    if reduce:
        for f in factors:
            all_reduce_sum(f.s), all_reduce_sum(f.count)
    qs, qa, values = [], [], []
    for f, (alpha, q_a) in zip(factors, _input_eigenpairs(factors, rows, sites, ref, reduce)):
        sigma, q_s = torch.linalg.eigh(f.s)
        qs.append(q_s.contiguous())  # eigh's are column-major; a reloaded cache is not
        qa.append(q_a)
        count = f.count.clamp_min(1)
        values.append(scale * sigma.clamp_min(0).unsqueeze(1) * alpha.clamp_min(0) / count)
    if kind == "ekfac":
        values = [torch.zeros_like(v) for v in values]
        for i, batch in wrap(batches(), "EKFAC eigenvalue correction (pass 2 of 2)"):
            gen = _signs(samples, seed, 2, i)
            found, _ = site_factors(floss, params, batch, sites, False, samples, gen)
            for i, (site, (a, d)) in enumerate(zip(sites, found)):
                _accumulate_diagonal(values[i], qs[i], qa[i], site, a, d)
        if reduce:
            for v in values:
                all_reduce_sum(v)
        for v in values:  # in place: no new block at the top of the heap (core.memory)
            v.mul_(scale)
    covered = {n for site in sites for n in (site.weight, site.bias) if n is not None}
    if covered != set(params):
        raise ValueError(f"the sites cover {sorted(covered)}, not the parameters {list(params)}")
    return KroneckerCurvature(kind, list(sites), dict(params), factors, qs, qa, values), worst
