r"""The SAM / ASAM perturbation and its derivatives, exactly as the optimizer computes it.

:math:`\epsilon(w; g) = \rho\, a^2 g / (\lVert a g \rVert + 10^{-12})` with :math:`a = |w|`
for ASAM and :math:`a = 1` for SAM (``+ 1e-12`` and all), so attribution sees the same
:math:`w + \epsilon` as training did.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.func import jvp, vjp, vmap

from captum_sam.core.params import Params

__all__ = [
    "sam_perturbation",
    "sam_perturbation_list",
    "per_example_perturbations",
    "perturbation_jvp",
    "perturbation_vjp",
]


def sam_perturbation_list(
    weights: Sequence[Tensor],
    grads: Sequence[Tensor],
    rho: float | Sequence[float],
    adaptive: bool | Sequence[bool],
    grad_norm: Tensor | None = None,
) -> list[Tensor]:
    r"""SAM / ASAM perturbation of a list of tensors (the optimizer's formula).

    :math:`\epsilon = \rho\, a^2 g / (\lVert a g \rVert + 10^{-12})` with
    :math:`a = |w|` for ASAM and :math:`a = 1` for SAM; the norm runs over all
    tensors together. ``rho`` and ``adaptive`` may be given per tensor (the
    optimizer's per-group values); ``grad_norm``, :func:`sam_grad_norm` of the
    same arguments, when already computed.

    Returns:
        One perturbation tensor per weight tensor.
    """
    k = len(weights)
    rhos = [rho] * k if isinstance(rho, (int, float)) else list(rho)
    adaptives = [adaptive] * k if isinstance(adaptive, bool) else list(adaptive)
    if grad_norm is None:
        grad_norm = sam_grad_norm(weights, grads, adaptives)
    return [
        (torch.pow(w, 2) if a else 1.0) * g * (r / (grad_norm + 1e-12))
        for w, g, r, a in zip(weights, grads, rhos, adaptives)
    ]


def sam_grad_norm(
    weights: Sequence[Tensor], grads: Sequence[Tensor], adaptive: bool | Sequence[bool]
) -> Tensor:
    r""":math:`\lVert a g \rVert` over all tensors together (:func:`sam_perturbation_list`)."""
    adaptives = [adaptive] * len(weights) if isinstance(adaptive, bool) else list(adaptive)
    norms = [
        ((torch.abs(w) if a else 1.0) * g).norm(p=2) for w, g, a in zip(weights, grads, adaptives)
    ]
    return torch.norm(torch.stack(norms), p=2)


def sam_perturbation(params: Params, grads: Params, rho: float, adaptive: bool) -> Params:
    r"""SAM / ASAM perturbation :math:`\epsilon(w; g)` of a parameter dict.

    Args:
        params: Weights :math:`w`.
        grads: A gradient :math:`g` with the same keys.
        rho: Radius.
        adaptive: ASAM.

    Returns:
        :math:`\epsilon` with the keys of ``params``.
    """
    names = list(params)
    eps = sam_perturbation_list(
        [params[n] for n in names], [grads[n] for n in names], rho, adaptive
    )
    return dict(zip(names, eps))


def per_example_perturbations(
    params: Params, example_grads: Params, rho: float, adaptive: bool
) -> Params:
    """One perturbation per example (``perturbation="example"``, m = 1 sharpness).

    Args:
        params: Weights.
        example_grads: Per-example gradients with a leading batch dimension.
        rho: Radius.
        adaptive: ASAM.

    Returns:
        Perturbations with a leading batch dimension.
    """
    return vmap(lambda g: sam_perturbation(params, g, rho, adaptive))(example_grads)


def perturbation_jvp(
    params: Params,
    grads: Params,
    d_params: Params,
    d_grads: Params,
    rho: float,
    adaptive: bool,
) -> Params:
    r"""Directional derivative of :math:`\epsilon(w; g)` along ``(d_params, d_grads)``.

    With ``d_grads = hess L(w) @ v`` and ``d_params = v`` this is
    :math:`(d\epsilon/dw)\, v` for :math:`g = \nabla L(w)`; with ``d_params = 0`` it
    is the change of :math:`\epsilon` when the gradient moves by ``d_grads``.
    """

    def eps(p: Params, g: Params) -> Params:
        return sam_perturbation(p, g, rho, adaptive)

    return jvp(eps, (params, grads), (d_params, d_grads))[1]


def perturbation_vjp(
    params: Params, grads: Params, cotangent: Params, rho: float, adaptive: bool
) -> tuple[Params, Params]:
    r"""Transpose products of :math:`\epsilon(w; g)`: ``(J_w^T u, J_g^T u)``."""
    _, pullback = vjp(lambda p, g: sam_perturbation(p, g, rho, adaptive), params, grads)
    return pullback(cotangent)
