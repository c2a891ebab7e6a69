r"""Per-example gradients and dataset gradient sums with ``torch.func``.

Scales: :func:`summed_grad` and :func:`grad_sum` use the *summed* loss
:math:`S(w) = \sum_i l_i(w)` over the batches they are given; :func:`mean_grad`
divides by the number of examples. Per-example gradients come from one
``vmap(grad(...))`` call per batch, never a Python loop over examples.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch.func import grad, jvp, vmap

from captum_sam.core.data import batch_context
from captum_sam.core.losses import FunctionalLoss, batch_size, in_dims, split_batch
from captum_sam.core.params import Batch, Params, tree_add, tree_scale

__all__ = [
    "per_example_grads",
    "stacked_per_example_grads",
    "stacked_grad_sum",
    "stacked_mean_grad",
    "grad_sum",
    "summed_grad",
    "mean_grad",
    "per_example_directional",
]


def per_example_grads(
    floss: FunctionalLoss,
    params: Params,
    batch: Batch,
    *,
    params_per_example: bool = False,
) -> Params:
    """Per-example gradients with ``vmap(grad(...))``.

    Args:
        floss: Model and loss.
        params: Weights; each tensor has a leading batch dimension when
            ``params_per_example`` (one weight vector per example).
        batch: ``(features..., labels)``.
        params_per_example: Evaluate example ``i`` at ``params[name][i]``.

    Returns:
        Dict of tensors of shape ``(batch, *param.shape)``.
    """
    features, labels = split_batch(batch)
    dims = in_dims(batch)

    def one(p: Params, feats: tuple[Any, ...], label: Any) -> Params:
        return grad(floss.example_loss)(p, feats, label)

    return vmap(one, in_dims=(0 if params_per_example else None, dims[:-1], dims[-1]))(
        params, features, labels
    )


def stacked_per_example_grads(
    floss: FunctionalLoss,
    params: Params,
    frozen: Params,
    batch: Batch,
    *,
    params_per_example: bool = False,
) -> Params:
    """Per-example gradients for ``K`` weight sets in one ``vmap`` call.

    Batching the weight sets (checkpoints, perturbed and unperturbed weights) into
    one call amortises the per-call cost of ``vmap``/``functional_call``.

    Args:
        floss: Model and loss (its ``frozen`` is replaced by ``frozen``).
        params: Weights with a leading ``K`` dimension (then a batch dimension too
            when ``params_per_example``).
        frozen: Non-attributed parameters and buffers with a leading ``K`` dimension.
        batch: ``(features..., labels)``.
        params_per_example: As in :func:`per_example_grads`.

    Returns:
        Dict of tensors ``(K, batch, *param.shape)``.
    """

    def one(p: Params, fr: Params) -> Params:
        bound = floss.bind(fr)
        return per_example_grads(bound, p, batch, params_per_example=params_per_example)

    if next(iter(params.values())).shape[0] == 1:  # one set: skip the outer vmap
        first = one({k: v[0] for k, v in params.items()}, {k: v[0] for k, v in frozen.items()})
        return {k: v.unsqueeze(0) for k, v in first.items()}
    return vmap(one)(params, frozen)


def stacked_grad_sum(
    floss: FunctionalLoss,
    params: Params,
    frozen: Params,
    batches: Iterable[Batch],
    name: str = "dataset",
) -> tuple[Params, int]:
    """Summed gradient for ``K`` stacked weight sets in one pass over the data.

    Each batch is read once and differentiated at one weight set at a time (a ``vmap``
    over the sets would hold the activations of all of them, ``K`` times a batch's: on
    a ResNet-18 with 3 checkpoints and batches of 64, 4 GB).

    ``name``: the argument the batches come from, named when one fails.

    Returns:
        ``(grad, n)``: the gradient of the summed loss with a leading ``K``
        dimension (zeros when there is no batch), and the number of examples.
    """
    sets = next(iter(params.values())).shape[0]
    total: Params | None = None
    count = 0
    for i, batch in enumerate(batches):
        with batch_context(name, i):
            for j in range(sets):
                at = {k: v[j] for k, v in params.items()}
                g = grad(floss.bind({k: v[j] for k, v in frozen.items()}).summed_loss)(at, batch)
                if total is None:
                    total = {k: v.new_zeros(sets, *v.shape) for k, v in g.items()}
                for k, v in g.items():
                    total[k][j] += v
        count += batch_size(batch)
    if total is None:
        total = {k: torch.zeros_like(v) for k, v in params.items()}
    return total, count


def stacked_mean_grad(
    floss: FunctionalLoss, params: Params, frozen: Params, batches: Iterable[Batch]
) -> tuple[Params, int]:
    """Mean gradient for ``K`` stacked weight sets in one pass over the data.

    Returns:
        ``(grad, n)``: gradients with a leading ``K`` dimension, and the number of
        examples.
    """
    total, count = stacked_grad_sum(floss, params, frozen, batches)
    if count == 0:
        raise ValueError("the dataset is empty: no batch to take a gradient over")
    return tree_scale(total, 1.0 / count), count


def grad_sum(
    floss: FunctionalLoss, params: Params, batches: Iterable[Batch], name: str = "dataset"
) -> tuple[Params, int]:
    """Gradient of the summed loss over the batches (zeros if none) and the count.

    ``name``: the argument the batches come from, named when one fails.
    """
    total, count = None, 0
    for i, batch in enumerate(batches):
        with batch_context(name, i):
            g = grad(floss.summed_loss)(params, batch)
        total = g if total is None else tree_add(total, g)
        count += batch_size(batch)
    if total is None:
        total = {k: torch.zeros_like(v) for k, v in params.items()}
    return total, count


def summed_grad(floss: FunctionalLoss, params: Params, batches: Iterable[Batch]) -> Params:
    r"""Gradient of the summed loss :math:`\sum_i l_i(w)` over all batches."""
    total, count = grad_sum(floss, params, batches)
    if count == 0:
        raise ValueError("the dataset is empty: no batch to take a gradient over")
    return total


def mean_grad(
    floss: FunctionalLoss, params: Params, batches: Iterable[Batch]
) -> tuple[Params, int]:
    """Mean gradient over all batches, and the number of examples.

    Returns:
        ``(grad, n)`` with ``grad = (1/n) sum_i grad l_i(w)``.
    """
    total, count = grad_sum(floss, params, batches)
    if count == 0:
        raise ValueError("the dataset is empty: no batch to take a gradient over")
    return tree_scale(total, 1.0 / count), count


def per_example_directional(
    floss: FunctionalLoss, params: Params, batch: Batch, direction: Params
) -> torch.Tensor:
    r"""Per-example directional derivatives ``(B,)`` of the loss along ``direction``.

    :math:`\nabla l_i(w) \cdot u` for every example, one ``jvp`` each under ``vmap``:
    the inner product of every per-example gradient with a fixed vector, without
    forming the gradients.
    """
    features, labels = split_batch(batch)
    dims = in_dims(batch)

    def one(feats: tuple[Any, ...], label: Any) -> torch.Tensor:
        return jvp(lambda p: floss.example_loss(p, feats, label), (params,), (direction,))[1]

    return vmap(one, in_dims=(dims[:-1], dims[-1]))(features, labels)
