r"""The two sides of SAM-HIF's scores: test-side and training-side rows of an estimator.

Training side: the right-hand sides :math:`r_k` (for ``exact``, ``[b_k, d_k]`` with
:math:`d_k = \partial\epsilon/\partial\delta_k`, so that :math:`r_k = b_k + H_e d_k`),
turned into embeddings by the estimator's inverse. Test side: gradients at
:math:`w^*` through :math:`A^{-1}`. Functions of a
:class:`~captum_sam.hif.influence.SAMInfluenceFunction` (or its Arnoldi twin).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor

from captum_sam import core as F
from captum_sam.core.data import (
    as_loader,
    batch_context,
    dataset_size,
    local_batches,
    on_device,
    progress,
    validate_batch,
)
from captum_sam.core.distributed import gather_ordered, is_distributed
from captum_sam.core.errors import ArgumentError
from captum_sam.core.layers import products as layer_products
from captum_sam.core.layers import sites as layer_sites
from captum_sam.core.losses import batch_size, slice_batch
from captum_sam.hif.inverse import LowRankInverse

__all__ = [
    "gradients",
    "right_hand_sides",
    "train_rows",
    "test_rows",
    "quantities",
    "self_influence",
    "inverse_setting",
    "test_row_groups",
    "score_blocks",
    "TEST_BUDGET_BYTES",
    "DIRECT_PIECES",
    "TRAIN_HELD_BYTES",
]

TEST_BUDGET_BYTES = 1 << 30
"""Test-side rows held at once by ``influence``; more are taken in groups, one pass over
the training data each (scores unchanged)."""


DIRECT_PIECES = 64
"""With a solver that makes no pass over the training data (K-FAC/EK-FAC), the test rows
are solved in pieces of at most ``budget / DIRECT_PIECES`` bytes (at least one row): a
piece's gradients, solves and their copies are the transient memory beside the group
(with a solver that passes over the data, ``budget / 8``: each pass serves the piece)."""


TRAIN_HELD_BYTES = 1 << 26
"""Training-side layer factors (or formed gradients) held by :func:`score_blocks` before
their products with the test rows are taken (the test rows are read once per holding)."""


FORMED_ROWS = 16
"""Fewest training examples whose formed gradients are multiplied with the test rows at
once: fewer make the product memory-bound (the test rows are read once per product)."""


def gradients(est: Any, batch: tuple[Any, ...], loss: F.FunctionalLoss, point: F.Params) -> Tensor:
    r"""Per-example gradients ``(B, P)`` of ``loss`` at ``point``.

    Formed from layer factors (one batched forward/backward pass, then
    :math:`G_i = \sum_t d_{it} a_{it}^\top` per layer) when every attributed parameter
    sits in a layer site and the factors reproduced ``vmap`` on the first batch of this
    loss (:func:`factored_sites`); otherwise ``vmap(grad(...))``.
    """
    return _gradients_from(est, _site_factors(est, loss, point, batch), batch, loss, point)


def _gradients_from(
    est: Any,
    factors: list[tuple[Tensor, Tensor]] | None,
    batch: tuple[Any, ...],
    loss: F.FunctionalLoss,
    point: F.Params,
) -> Tensor:
    """:func:`gradients` given the batch's layer factors (``None``: by ``vmap``)."""
    if factors is not None:  # each site's gradients written into one (B, P) block
        site_list = est._grad_sites
        offsets = column_offsets(est.names, point)
        ref = point[est.names[0]]
        out = ref.new_empty(batch_size(batch), est.operator.dim)
        while factors:
            site, (a, d) = site_list[len(site_list) - len(factors)], factors.pop(0)
            for name, g in layer_sites.site_grads(a, d, site).items():
                lo, hi = offsets[name]
                out[:, lo:hi] = g.reshape(len(out), -1)
            del a, d
        return out
    g = F.per_example_grads(loss, point, batch)
    return F.flatten(g, est.names, batch_dims=1)


def _site_factors(
    est: Any, loss: F.FunctionalLoss, point: F.Params, batch: tuple[Any, ...]
) -> list[tuple[Tensor, Tensor]] | None:
    """Per site of ``est._grad_sites`` its factors ``(a, d)`` of ``batch``, or ``None``.

    ``None`` when per-example gradients are not to be formed from factors (see
    :func:`factored_sites`) or this batch cannot give them.
    """
    site_list = factored_sites(est, loss, point, batch)
    if site_list is None:
        return None
    try:
        return layer_sites.layer_factors(loss, point, batch, site_list)
    except layer_sites.Unsupported:  # e.g. a layer called twice in this batch only
        return None


def column_offsets(names: list[str], point: F.Params) -> dict[str, tuple[int, int]]:
    """Each parameter's columns ``(start, end)`` in a flat ``P``-wide row."""
    out, start = {}, 0
    for name in names:
        out[name] = (start, start + point[name].numel())
        start = out[name][1]
    return out


def factored_sites(
    est: Any, loss: F.FunctionalLoss, point: F.Params, batch: tuple[Any, ...]
) -> list[layer_sites.Site] | None:
    """The layer sites when per-example gradients may be formed from factors, else ``None``.

    ``est._grad_sites`` (set up by :func:`~captum_sam.hif.setup.prepare`) holds them when
    ``factorize=True`` and every attributed parameter is in a site
    (:func:`~captum_sam.core.layers.sites.layer_sites`: ``nn.Linear``, ``nn.Conv2d``,
    eval-mode BatchNorm); each loss function is checked once numerically against
    ``vmap`` on a few examples of the first batch it sees.
    """
    if est._grad_sites is None:
        return None
    key = (loss.loss_fn, loss.reduction)
    if key not in est._grad_checked:
        est._grad_checked[key] = layer_sites.matches_vmap(loss, point, batch, est._grad_sites)
    return est._grad_sites if est._grad_checked[key] else None


def right_hand_sides(est: Any, batch: tuple[Any, ...]) -> Tensor:
    """:math:`r_k` rows ``(B, P)``; for ``exact`` ``[b_k, d_k]`` ``(B, 2P)``."""
    op = est.operator
    b = gradients(est, batch, op.loss_at(op.point), op.point)
    if est.variant != "exact":
        return b
    own = gradients(est, batch, est._loss, op.params)  # d eps along g -> g + g_k / n
    d = op.jvp_eps_given(None, own.T / est.n_train, op.rhs_extra_dot(batch, own)).T
    return torch.cat([b, d], dim=1)


def _sketch(est: Any, rows: Tensor) -> Tensor:
    """Sketch ``(m, P)`` rows (``(m, 2P)``: each half) if a sketch is set."""
    if est.sketch is None:
        return rows
    halves = rows.split(est.operator.dim, dim=1)
    return torch.cat([est.sketch(h) for h in halves], dim=1)


def train_rows(est: Any, batch: tuple[Any, ...]) -> Tensor:
    """Training-side quantities of a batch."""
    rhs = right_hand_sides(est, batch)
    inverse = est.inverse
    if isinstance(inverse, LowRankInverse):
        rhs = rhs.to(inverse.right)
        if est.variant == "exact":
            b, d = rhs.split(est.operator.dim, dim=1)
            return inverse.train_rows(b, d, est._he_right)
        return inverse.train_rows(rhs)
    return _sketch(est, rhs)


@contextlib.contextmanager
def solve_bar(est: Any, what: str) -> Iterator[None]:
    """With the estimator's ``show_progress``, a bar counting the solve's matvec columns."""
    bar = None
    if est.show_progress:
        from tqdm.auto import tqdm

        bar = tqdm(desc=f"Using {est.get_name()} to solve for {what} (matvec columns)")
    est.operator.columns_bar = bar
    try:
        yield
    finally:
        est.operator.columns_bar = None
        if bar is not None:
            bar.close()


def _transform(est: Any, grads: Tensor, what: str) -> Tensor:
    """Test-side rows of gradient rows ``(m, P)``."""
    F.check_finite(grads, "gradients of the examples at the checkpoint")
    inverse = est.inverse
    if isinstance(inverse, LowRankInverse):
        return inverse.test_rows(grads.to(inverse.left))
    with solve_bar(est, what):
        v = inverse.test_rows(grads)
    if est.variant == "exact":
        v = torch.cat([v, est.operator.he_product(v.T).T], dim=1)
    return _sketch(est, v)


def score_blocks(
    est: Any, q: Tensor, batches: Iterable[tuple[int, tuple[Any, ...]]], group: Any = None
) -> Iterator[tuple[int, Tensor]]:
    r"""``(i, q @ train_rows(batch_i).T)`` for every ``(i, batch_i)``, in order.

    When the training-side rows are plain gradients (not ``exact``, no sketch, no
    low-rank inverse) and they may be formed from layer factors (:func:`gradients`),
    the factors of several batches (up to :data:`TRAIN_HELD_BYTES`, each site kept as
    factors or formed, whichever is smaller) are taken together: per site the
    gradients are formed and multiplied with the site's columns of ``q``. No ``(B, P)``
    block is written, and ``q`` is read once per holding instead of once per batch
    (the product is memory-bound when ``q`` is large). The same numbers otherwise.

    ``group``: a :class:`~captum_sam.hif.site_groups.SiteGroup`; ``q`` then holds its
    columns only, and only its layers' factors are taken (the other parameters held
    constant).
    """
    op = est.operator
    loss, point = op.loss_at(op.point), op.point
    if group is None:
        low_rank = isinstance(est.inverse, LowRankInverse)
        rows_only = est.variant != "exact" and est.sketch is None and not low_rank
        site_list, offsets = est._grad_sites, column_offsets(est.names, point)

        def take(batch: tuple[Any, ...]) -> list[tuple[Tensor, Tensor]] | None:
            return _site_factors(est, loss, point, batch) if rows_only else None

        def rows_of(batch: tuple[Any, ...]) -> Tensor:
            return train_rows(est, batch)
    else:
        site_list, offsets = group.sites, column_offsets(group.names, point)
        held_loss, held_point = group.restrict(loss, point)

        def take(batch: tuple[Any, ...]) -> list[tuple[Tensor, Tensor]] | None:
            return group.factors(held_loss, held_point, batch)

        def rows_of(batch: tuple[Any, ...]) -> Tensor:
            return group.columns(gradients(est, batch, loss, point), est.names, point)

    pending: list[tuple[int, int, list[layer_products.Entry]]] = []
    held = 0
    for i, batch in batches:
        with batch_context("train_dataset", i):
            factors = take(batch)
            if factors is None:
                rows = rows_of(batch)
        if factors is None:
            yield from _flush(site_list, offsets, q, pending)
            pending, held = [], 0
            yield i, q @ rows.T.to(q)
            continue
        entries = [_smaller(e, site) for e, site in zip(factors, site_list)]
        del factors
        pending.append((i, batch_size(batch), entries))
        held += layer_products.entry_floats(entries) * q.element_size()
        if held >= TRAIN_HELD_BYTES:
            yield from _flush(site_list, offsets, q, pending)
            pending, held = [], 0
    yield from _flush(site_list, offsets, q, pending)


def _smaller(entry: tuple[Tensor, Tensor], site: layer_sites.Site) -> layer_products.Entry:
    """A site's factors, or its formed gradients when those take fewer numbers."""
    a, d = entry
    formed = site.d_out * (1 if site.diagonal else site.d_in)
    if site.weight is None or formed < a.shape[-2] * (a.shape[-1] + d.shape[-1]):
        return layer_products.form(entry, site)
    return entry


def _flush(
    site_list: list[layer_sites.Site],
    offsets: dict[str, tuple[int, int]],
    q: Tensor,
    pending: list[tuple[int, int, list[layer_products.Entry]]],
) -> Iterator[tuple[int, Tensor]]:
    """The score blocks of the held batches: per site, form and multiply.

    A site's gradients are formed for at most :data:`TRAIN_HELD_BYTES` of them (but at
    least :data:`FORMED_ROWS` examples) at a time: the factors of a wide layer with few
    positions, a ResNet's last convolutions, are far smaller than its formed gradients.
    """
    if not pending:
        return
    count = sum(c for _, c, _ in pending)
    total = q.new_zeros(len(q), count)
    for s, site in enumerate(site_list):
        column = [entries[s] for _, _, entries in pending]
        for _, _, entries in pending:
            entries[s] = None  # type: ignore[call-overload]
        joined = _joined(column, site)
        del column
        formed_floats = site.d_out * (1 if site.diagonal else site.d_in) + site.d_out
        step = max(FORMED_ROWS, TRAIN_HELD_BYTES // (formed_floats * q.element_size()))
        for lo in range(0, count, step):
            hi = min(count, lo + step)
            formed = layer_products.form(_rows_of(joined, lo, hi), site)
            for name, grads in zip((site.weight, site.bias), formed):
                if name is not None:
                    a, b = offsets[name]
                    total[:, lo:hi].addmm_(q[:, a:b], grads.reshape(hi - lo, -1).T.to(q))
            del formed
        del joined
    lo = 0
    for i, c, _ in pending:
        yield i, total[:, lo : lo + c]
        lo += c


def _rows_of(entry: layer_products.Entry, lo: int, hi: int) -> layer_products.Entry:
    """Examples ``lo:hi`` of an entry (factors or formed)."""
    if lo == 0 and hi == layer_products.row_count([entry]):
        return entry
    if isinstance(entry, layer_products.Formed):
        return layer_products.Formed(*(None if t is None else t[lo:hi] for t in entry))
    return entry[0][lo:hi], entry[1][lo:hi]


def _joined(column: list[layer_products.Entry], site: layer_sites.Site) -> layer_products.Entry:
    """One site's entries of several batches as one entry (factors joined when they fit)."""
    if len(column) == 1:
        return column[0]
    if all(not isinstance(e, layer_products.Formed) for e in column):
        if len({e[0].shape[1:] for e in column}) == 1:  # same positions: join the factors
            return torch.cat([e[0] for e in column]), torch.cat([e[1] for e in column])
    return layer_products.concat_factors([[layer_products.form(e, site)] for e in column])[0]


def test_rows(est: Any, batch: tuple[Any, ...], loss: F.FunctionalLoss, what: str) -> Tensor:
    """Test-side quantities of a batch for ``loss`` (gradients at :math:`w^*`).

    With a direct Kronecker inverse (K-FAC/EK-FAC, ``fast`` or ``plain``) and gradients
    from layer factors, each block is solved from its factors (:func:`_solve_factored`).
    """
    params = est.operator.params
    factors = _site_factors(est, loss, params, batch)  # once: solved or formed from them
    index = None if factors is None else kronecker_index(est)
    if index is not None:
        return _sketch(est, _solve_factored(est, index, factors))  # type: ignore[arg-type]
    return _transform(est, _gradients_from(est, factors, batch, loss, params), what)


def kronecker_index(est: Any) -> list[int] | None:
    """For each block of a direct Kronecker inverse, its site in ``est._grad_sites``.

    ``None`` unless the inverse is a :class:`~captum_sam.hif.kfac_solve.KroneckerInverse`
    and the blocks and the (non-elementwise) gradient sites hold the same parameters.
    """
    inverse = getattr(est.inverse, "inverse", None)
    sites = est._grad_sites
    if not hasattr(inverse, "solve_blocks") or sites is None or any(s.diagonal for s in sites):
        return None
    where = {(id(s.module), s.weight, s.bias): j for j, s in enumerate(sites)}
    blocks = inverse.curvature.sites
    index = [where.get((id(b.module), b.weight, b.bias)) for b in blocks]
    if None in index or len(blocks) != len(sites):
        return None
    return index  # type: ignore[return-value]


def _solve_factored(est: Any, index: list[int], factors: list[tuple[Tensor, Tensor]]) -> Tensor:
    r""":math:`A^{-\top} g` rows ``(B, P)`` of a batch whose gradients come as layer factors.

    The factors are not formed into ``(B, P)`` gradients first: a block with few positions
    (a ResNet's last convolutions) is rotated into the eigenbasis from them.
    """
    inverse = est.inverse.inverse
    blocks = []
    for site, j in zip(inverse.curvature.sites, index):
        a, d = factors[j]
        F.check_finite(a, "layer inputs of the examples at the checkpoint")
        F.check_finite(d, "gradients of the examples at the checkpoint")
        blocks.append((site.columns(a), d))
    out = inverse.solve_blocks(blocks)
    est.inverse.check(out, "inverse-HVP solutions")
    return out.T


def quantities(est: Any, inputs: Any, aggregate: bool, show_progress: bool, test: bool) -> Tensor:
    """``compute_intermediate_quantities`` of an estimator (see there)."""
    data = as_loader(inputs, est.batch_size, "inputs_dataset", ordered=not aggregate)
    loss = est._test_loss if test else est._loss
    params = est.operator.params
    desc = f"Using {est.get_name()} to compute intermediate quantities. Processing batch"
    if test:  # every rank computes every test vector (the solves are collective)
        rows = []
        for i, batch in enumerate(on_device(progress(data, show_progress, desc), est.device)):
            validate_batch(loss, params, batch, "inputs_dataset", run_loss=i == 0)
            if aggregate:  # sum the gradients, then one transform
                rows.append(gradients(est, batch, loss, params).sum(0, keepdim=True))
            else:
                rows.append(test_rows(est, batch, loss, "test vectors"))
        if not rows:
            raise ValueError("`inputs_dataset` is empty")
        out = torch.cat(rows)
        if aggregate:
            out = _transform(est, out.sum(dim=0, keepdim=True), "the aggregated test vector")
        return out
    parts = []
    bar = progress(local_batches(data, est.device), show_progress, desc, total=_length(data))
    for i, batch in bar:
        validate_batch(loss, params, batch, "inputs_dataset", run_loss=i == 0)
        with batch_context("inputs_dataset", i):
            rows_ = train_rows(est, batch)
        parts.append((i, rows_.sum(dim=0, keepdim=True) if aggregate else rows_))
    gathered = gather_ordered(parts)
    if not gathered:
        raise ValueError("`inputs_dataset` is empty")
    out = torch.cat(gathered)
    F.check_finite(out, "gradients")
    return out.sum(dim=0, keepdim=True) if aggregate else out


def test_row_groups(est: Any, inputs: Any, aggregate: bool, budget: int) -> Iterator[Tensor]:
    """Test-side rows of ``inputs`` in groups of at most about ``budget`` bytes.

    Each group is an ``(m, width)`` view of one buffer that is filled again for the next
    group (so use a group before asking for the next). A batch is cut into pieces of at most
    ``budget / 8`` bytes of rows (``budget /`` :data:`DIRECT_PIECES` with a direct
    solver; a tuple of inputs is one batch, however large: its per-example gradients
    and their solves are formed a piece at a time; per-example rows do not depend on
    the cut), the last piece of a full group no larger than the
    room left in it (so that every group but the last is full: one pass over the
    training data fewer when pieces do not divide the group). Aggregated, one group
    with the one summed row.
    """
    if aggregate:
        yield quantities(est, inputs, True, False, True)
        return
    data = as_loader(inputs, est.batch_size, "inputs")
    loss, params = est._test_loss, est.operator.params
    like = est.operator.mean_grad[est.names[0]]
    row_bytes = est.operator.dim * (2 if est.variant == "exact" else 1) * like.element_size()
    # a solver passing over the data serves a whole piece with each pass: large pieces;
    # a direct one (K-FAC/EK-FAC) costs the same per row: small pieces, small transients
    shared = getattr(getattr(est.inverse, "inverse", None), "shared_passes", True)
    piece = max(1, budget // (8 if shared else DIRECT_PIECES) // row_bytes)
    buffer: Tensor | None = None
    filled, cap = 0, 0
    for i, batch in enumerate(on_device(data, est.device)):
        validate_batch(loss, params, batch, "inputs_dataset", run_loss=i == 0)
        count, start = batch_size(batch), 0
        while start < count:
            room = piece
            if buffer is not None and len(buffer) >= cap and 0 < len(buffer) - filled < piece:
                room = len(buffer) - filled  # a full-sized group: fill it exactly
            end = min(count, start + room)
            part = batch if (start, end) == (0, count) else slice_batch(batch, start, end)
            start = end
            rows = test_rows(est, part, loss, "test vectors")
            width = rows.shape[1]
            if buffer is None:  # no larger than the budget, nor than the test set needs
                cap = max(len(rows), budget // max(1, width * rows.element_size()))
                try:
                    total: int | None = dataset_size(data)
                except TypeError:  # a DataLoader over an unsized dataset
                    total = None
                size = len(rows) if total is None else max(len(rows), min(cap, total))
                buffer = rows.new_empty(size, width)
            if filled + len(rows) > len(buffer) and len(buffer) < cap:  # grow (size unknown)
                grown = rows.new_empty(min(cap, max(2 * len(buffer), filled + len(rows))), width)
                grown[:filled] = buffer[:filled]
                buffer = grown
            if filled + len(rows) > len(buffer):
                yield buffer[:filled]
                filled = 0
            if len(rows) > len(buffer):  # a piece larger than the budget: its own group
                yield rows
                continue
            buffer[filled : filled + len(rows)] = rows
            filled += len(rows)
            del rows
    if buffer is None:
        raise ValueError("`inputs_dataset` is empty")
    if filled:
        yield buffer[:filled]


def self_influence(est: Any, inputs: Any, show_progress: bool) -> Tensor:
    r""":math:`\nabla l_k(w^*)^\top A^{-1} r_k` per example of ``inputs`` (default: training)."""
    data = (
        est.train_dataloader
        if inputs is None
        else as_loader(inputs, est.batch_size, "inputs_dataset")
    )
    parts = []
    bar = progress(
        local_batches(data, est.device),
        show_progress,
        f"Using {est.get_name()} to compute self influence scores. Processing batch",
        total=_length(data),
    )
    inverse = est.inverse
    if not isinstance(inverse, LowRankInverse) and is_distributed():
        if inverse.inverse.method == "arnoldi":  # the eigenbasis is built by every rank
            inverse.solve(est.operator.mean_grad[est.names[0]].new_ones(est.operator.dim, 1))
    with est.operator.local_mode():  # each rank solves for its own batches
        for i, batch in bar:
            with batch_context("train_dataset" if inputs is None else "inputs_dataset", i):
                q = test_rows(est, batch, est._loss, "self influence")
                parts.append((i, (q * train_rows(est, batch).to(q)).sum(dim=1)))
    out = gather_ordered(parts)
    if not out:
        raise ValueError("`inputs_dataset` is empty")
    return torch.cat(out)


def inverse_setting(est: Any) -> list[Any]:
    """What a low-rank inverse depends on beyond the right-hand sides (for cache keys)."""
    return [
        est.variant, est.curvature, est.weight_decay, est.damping_used, est.hessian_reg,
        est.hessian_inverse_tol, est.projection_dim, est.hessian_scale,
    ]  # fmt: skip


def check_sketch(est: Any) -> None:
    """Refuse a sketch with the low-rank inverse (its quantities are already small)."""
    if est.sketch is not None and isinstance(est.inverse, LowRankInverse):
        raise ArgumentError(
            "`sketch_dim` projects the P-wide quantities of the iterative solvers; with "
            "solver='dense' the quantities are already projection_dim wide"
        )


def _length(data: Any) -> int | None:
    """Number of batches of a loader or list, ``None`` when unknown."""
    try:
        return len(data)
    except TypeError:
        return None
