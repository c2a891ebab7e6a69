r"""SAM-HIF's matrix :math:`A` formed densely (``P x P``), for the dense solver and checks.

From factored Gauss-Newton matrices when every attributed parameter is an
``nn.Linear`` weight or bias and ``curvature="ggn"`` (one matrix product over the data
per pair of layers, :func:`captum_sam.core.layers.linear_ggn.linear_ggn`, after a
check against ``ggn_vp``), else from ``P`` products with :math:`A`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from captum_sam import core as F
from captum_sam.core.distributed import all_reduce_sum
from captum_sam.core.layers import linear_ggn
from captum_sam.hif.operator import SAMOperator

__all__ = [
    "factored_curvature",
    "factored_ok",
    "factored_matrix",
    "curvature_matrix",
    "known_matrix",
    "dense_matrix",
]


def factored_curvature(op: SAMOperator, point: F.Params) -> Tensor:
    """The GGN of the (scaled) summed loss at ``point``, ``(P, P)``, from factors."""
    total = linear_ggn.linear_ggn(
        op.loss_at(point), point, op.hessian_batches(), op.ggn_sites, op.names
    )
    total.mul_(op.hessian_scale)
    return all_reduce_sum(total) if op.reduce() else total


def factored_ok(op: SAMOperator, point: F.Params) -> bool:
    """Whether the factored GGN applies: checked once, and all ranks agree."""
    if op.ggn_sites is None:
        return False
    if op._ggn_checked is None:
        first = next(iter(op.hessian_batches()), None)
        ok = first is None or linear_ggn.ggn_matches(
            op.loss_at(point), point, first, op.ggn_sites, op.names
        )
        if op.reduce():
            ok = bool(all_reduce_sum(torch.tensor([0.0 if ok else 1.0]))[0] == 0)
        op._ggn_checked = ok
    return op._ggn_checked


def factored_matrix(op: SAMOperator, keep_he: bool = False) -> Tensor | None:
    """:math:`A` formed from factored GGNs, or ``None`` when they do not apply.

    ``keep_he``: remember :math:`H_e` (the exact right-hand sides use it). With
    parameters outside the attributed ones in the perturbation's scope, the columns
    of :math:`J` come from curvature products over the scope instead.
    """
    if not factored_ok(op, op.point):
        return None
    g = _take_curvature(op)
    if g is None:
        g = factored_curvature(op, op.point)
    if op.variant in ("full", "exact"):  # H_e (I + J)
        he = g.clone()
        if keep_he:
            op.dense_he = he
        jac = torch.empty_like(g)
        step = 256
        g0_over_n = None if op.extra else factored_curvature(op, op.params).div_(op.n_train)
        for start in range(0, op.dim, step):
            cols = slice(start, min(start + step, op.dim))
            eye = g.new_zeros(op.dim, cols.stop - start)  # columns of the identity
            eye[cols].fill_diagonal_(1.0)
            if g0_over_n is None:
                jac[:, cols] = op.jvp_eps(eye, op.hessian_batches(), op.hessian_scale)
            else:
                jac[:, cols] = op.jvp_eps_given(eye, g0_over_n[:, cols])
        g = g.addmm_(he, jac)
    g.diagonal().add_(op.regulariser)
    return g


def _take_curvature(op: SAMOperator) -> Tensor | None:
    """The curvature at ``op.point`` formed by ``damping="auto"`` (then released), or ``None``."""
    c, op.dense_curvature = op.dense_curvature, None
    return c


def curvature_matrix(op: SAMOperator, chunk_size: int) -> Tensor:
    """The curvature :math:`C` (no regulariser) at ``op.point``, ``(P, P)``.

    From layer factors when they apply, else from ``chunk_size`` curvature products
    with identity columns at a time.
    """
    if factored_ok(op, op.point):
        return factored_curvature(op, op.point)
    eye = torch.eye(op.dim, dtype=op.mean_grad[op.names[0]].dtype, device=op.device)
    batches, scale = op.hessian_batches, op.hessian_scale
    cols = [
        op.curvature_product(op.point, eye[:, s : s + chunk_size], batches(), scale)
        for s in range(0, op.dim, chunk_size)
    ]
    return torch.cat(cols, dim=1)


def known_matrix(op: SAMOperator, keep_he: bool = False) -> Tensor | None:
    """:math:`A` without curvature products, or ``None``.

    From layer factors (:func:`factored_matrix`), or, for a symmetric variant, from
    the curvature ``damping="auto"`` formed (then released).
    """
    formed = factored_matrix(op, keep_he)
    if formed is None and op.symmetric and op.dense_curvature is not None:
        formed = _take_curvature(op)
        formed.diagonal().add_(op.regulariser)  # type: ignore[union-attr]
    return formed


def dense_matrix(op: SAMOperator, chunk_size: int, keep_he: bool = False) -> Tensor:
    """:math:`A` ``(P, P)``: from factors when possible, else from matvec columns.

    ``keep_he``: also form and remember :math:`H_e` for ``full``/``exact`` (the
    curvature ``damping="auto"`` formed, when there is one).
    """
    formed = known_matrix(op, keep_he)
    if formed is not None:
        return formed
    eye = torch.eye(op.dim, dtype=op.mean_grad[op.names[0]].dtype, device=op.device)
    cols = [op.matvec(eye[:, s : s + chunk_size]) for s in range(0, op.dim, chunk_size)]
    if keep_he and op.variant in ("full", "exact"):
        op.dense_he = _take_curvature(op)  # H_e: the curvature at the perturbed point
    if op.dense_he is None and keep_he and op.variant in ("full", "exact"):
        op.dense_he = torch.cat(
            [op.he_product(eye[:, s : s + chunk_size]) for s in range(0, op.dim, chunk_size)],
            dim=1,
        )
    return torch.cat(cols, dim=1)
