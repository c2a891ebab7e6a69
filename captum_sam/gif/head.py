r"""Factors at :math:`w + \epsilon` with no forward pass when only the output layer moves.

With ``perturbation_scope="attributed"`` and one ``nn.Linear`` attributed (Captum's
``TracInCPFast`` set-up: the final layer of a large network), the perturbation moves
that layer's parameters alone. Everything before the layer is then the same at
:math:`w` and :math:`w + \epsilon`, so its input :math:`a` is too, and when the layer's
output is the model's output the factors at the perturbed point follow from
:math:`a` alone: :math:`y' = W' a + b'` and :math:`d' = \partial S / \partial y'`
(:math:`S` the summed loss of the batch). SAM-GIF then needs one forward pass through
the network per example and checkpoint where it needed two.

Whether the layer's output is the model's output (and not, say, scaled or passed
through a ``log_softmax`` first) is checked numerically, once per loss, against a
real forward pass at the perturbed point on the first examples of a batch, as the
factored path itself is checked against ``vmap``
(:func:`~captum_sam.core.layers.sites.matches_vmap`).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from captum_sam import core as F
from captum_sam.core.layers import products, sites
from captum_sam.core.losses import batch_size, split_batch

__all__ = ["CHECK_ROWS", "applies", "head_factors", "head_matches"]

CHECK_ROWS = 4
"""Examples the check compares (the first of the batch it is made on)."""


def head_factors(
    floss: F.FunctionalLoss, params: F.Params, batch: Any, site: sites.Site, at_w: Any
) -> sites.Factors | None:
    """The site's raw factors at ``params`` from its input in ``at_w``, or ``None``.

    Args:
        floss: Model and loss, bound to the non-attributed parameters (not moved:
            the perturbation moves the attributed ones only).
        params: The attributed parameters at the perturbed point.
        batch: ``(features..., labels)``.
        site: The one attributed ``nn.Linear``.
        at_w: The batch's entries at ``w`` (one site).

    Returns:
        ``[(a, d')]`` with ``a`` the input of ``at_w``, or ``None`` where the input is
        not there (formed gradients, projected rows, inputs with positions) or the
        loss is the model output.
    """
    if floss.loss_fn is None or not isinstance(at_w, list) or len(at_w) != 1:
        return None
    entry = at_w[0]
    if isinstance(entry, products.Formed) or entry[0].dim() != 3 or entry[0].shape[1] != 1:
        return None
    a = entry[0]
    weight, bias = _layer(floss, params, site)
    out = torch.nn.functional.linear(a[:, 0], weight, bias).detach().requires_grad_(True)
    with torch.enable_grad():
        total = floss.summed_output_loss(out, split_batch(batch)[1], batch_size(batch))
        (grad,) = torch.autograd.grad(total, out)
    return [(a, site.layer_type.outputs(site.module, grad))]


def head_matches(
    floss: F.FunctionalLoss, params: F.Params, batch: Any, site: sites.Site, at_w: Any
) -> bool | None:
    """Whether :func:`head_factors` equals a real pass at ``params`` on the first rows.

    ``None`` when :func:`head_factors` does not apply to ``at_w``. Warnings of the
    trial (e.g. a loss warning about an output of another shape) are not shown: a
    refused shortcut is never used.
    """
    rows = min(CHECK_ROWS, batch_size(batch))
    part = sites.head(batch, rows)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            trial = products.map_rows(at_w, lambda x: x[:rows]) if isinstance(at_w, list) else at_w
            fast = head_factors(floss, params, part, site, trial)
            if fast is None:
                return None
            ((a, d),) = fast
            ((a0, d0),) = sites.layer_factors(floss, params, part, [site])
        except (RuntimeError, ValueError, TypeError):  # e.g. an output of another shape
            return False
    if a.shape != a0.shape or d.shape != d0.shape:
        return False
    return sites.agrees(a, a0) and sites.agrees(d, d0)


def applies(extra: Sequence[str], site_list: Sequence[sites.Site] | None) -> bool:
    """Whether the perturbation can move only one linear site (no other parameter)."""
    return (
        not extra
        and site_list is not None
        and len(site_list) == 1
        and site_list[0].kind == "linear"
    )


def _layer(
    floss: F.FunctionalLoss, params: F.Params, site: sites.Site
) -> tuple[Tensor, Tensor | None]:
    """The site's weight and bias at ``params`` (the frozen value where not attributed)."""
    name = site.weight or site.bias
    prefix = name.rsplit(".", 1)[0] + "." if "." in name else ""  # type: ignore[union-attr]

    def value(kind: str, attributed: str | None) -> Tensor | None:
        if attributed is not None:
            return params[attributed]
        if getattr(site.module, kind) is None:
            return None
        return floss.frozen[prefix + kind]

    weight = value("weight", site.weight)
    assert weight is not None  # an nn.Linear always has a weight
    return weight, value("bias", site.bias)
