r"""Curvature-vector products of the summed loss: Hessian and generalised Gauss-Newton.

Both use the *summed* loss :math:`S(w) = \sum_i l_i(w)` over the batches they are
given, and never form a ``P x P`` matrix.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.func import grad, jvp, vjp, vmap

from captum_sam.core.losses import FunctionalLoss, batch_size, split_batch
from captum_sam.core.params import Batch, Params, tree_add

__all__ = ["hvp", "ggn_vp"]


def hvp(
    floss: FunctionalLoss,
    params: Params,
    batches: Iterable[Batch],
    vectors: Params,
    *,
    batched: bool = False,
    mode: str = "forward-over-reverse",
    allow_empty: bool = False,
) -> Params:
    """Hessian-vector products of the summed loss over all batches.

    Args:
        floss: Model and loss.
        params: The point :math:`w` where the Hessian is taken.
        batches: The data; the loss is summed over every example.
        vectors: Tangent :math:`v` (keys of ``params``); with ``batched`` each
            tensor has a leading dimension of ``m`` vectors.
        batched: Compute ``m`` products at once with ``vmap``.
        mode: ``"forward-over-reverse"`` (``jvp`` of ``grad``) or
            ``"reverse-over-reverse"`` (``vjp`` of ``grad``).
        allow_empty: Return zeros instead of raising when there is no batch.

    Returns:
        :math:`H v` with the shape of ``vectors``.
    """
    if mode not in ("forward-over-reverse", "reverse-over-reverse"):
        raise ValueError(
            f"`mode` must be 'forward-over-reverse' or 'reverse-over-reverse', got {mode!r}"
        )

    def one_batch(batch: Batch) -> Callable[[Params], Params]:
        gradient = grad(lambda p: floss.summed_loss(p, batch))
        if mode == "forward-over-reverse":
            return second_order(gradient, params)
        _, pullback = vjp(gradient, params)
        return lambda v: pullback(v)[0]

    return _sum_over_batches(one_batch, batches, vectors, batched, allow_empty)


def second_order(gradient: Callable[[Any], Any], point: Any) -> Callable[[Any], Any]:
    """``v -> d gradient(point) [v]``: forward-over-reverse, else reverse-over-reverse.

    Forward mode is faster, but some losses' backward formulas have no forward-mode
    derivative in every torch version (``mse_loss(reduction="mean")`` raises "ZeroTensors
    are immutable" in torch 2.14); those fall back to ``vjp`` of the gradient, the
    same product.
    """
    state = {"forward": True}

    def product(v: Any) -> Any:
        if state["forward"]:
            try:
                return jvp(gradient, (point,), (v,))[1]
            except RuntimeError:
                state["forward"] = False
        return vjp(gradient, point)[1](v)[0]

    return product


def ggn_vp(
    floss: FunctionalLoss,
    params: Params,
    batches: Iterable[Batch],
    vectors: Params,
    *,
    batched: bool = False,
    allow_empty: bool = False,
) -> Params:
    r"""Generalised Gauss-Newton products :math:`G v = \sum_i J_i^T H_{out,i} J_i v`.

    :math:`J_i` is the Jacobian of example i's model output and :math:`H_{out,i}`
    the Hessian of its loss in the output; computed as ``jvp`` through the model,
    an output-space HVP of the loss, then ``vjp`` back. Positive semi-definite
    for convex losses (cross-entropy, squared error).

    Args:
        floss: Model and loss.
        params: The point :math:`w`.
        batches: The data (summed over every example).
        vectors: Tangent(s), as in :func:`hvp`.
        batched: ``m`` products at once.
        allow_empty: Return zeros instead of raising when there is no batch.

    Returns:
        :math:`G v` with the shape of ``vectors``.
    """

    def one_batch(batch: Batch) -> Callable[[Params], Params]:
        features, labels = split_batch(batch)

        def forward(p: Params) -> Any:
            return floss.outputs(p, features)

        outputs, pullback = vjp(forward, params)

        def output_loss(o: Any) -> Tensor:
            return floss.summed_output_loss(o, labels, batch_size(batch))

        output_hvp = second_order(grad(output_loss), outputs)

        def product(v: Params) -> Params:
            jv = jvp(forward, (params,), (v,))[1]
            hjv = output_hvp(jv)
            return pullback(hjv)[0]

        return product

    return _sum_over_batches(one_batch, batches, vectors, batched, allow_empty)


def _sum_over_batches(
    make_product: Callable[[Batch], Callable[[Params], Params]],
    batches: Iterable[Batch],
    vectors: Params,
    batched: bool,
    allow_empty: bool,
) -> Params:
    total = None
    for batch in batches:
        product = make_product(batch)
        out = vmap(product)(vectors) if batched else product(vectors)
        total = out if total is None else tree_add(total, out)
    if total is None:
        if allow_empty:  # e.g. a rank whose shard of the data is empty
            return {k: torch.zeros_like(v) for k, v in vectors.items()}
        raise ValueError("the dataset is empty: no batch for the Hessian")
    return total
