r"""``nn.Linear`` as a layer site, and the names the factored path had before sites.

For a linear layer :math:`y = W a + b` applied to positions :math:`t` of example
:math:`i` (the trailing dimensions of its input, e.g. tokens), the per-example
gradients are :math:`\nabla_W l_i = \sum_t d_{it} a_{it}^\top` and
:math:`\nabla_b l_i = \sum_t d_{it}`: the layer input rows are ``a (B, T, d_in)``
and the output gradient rows ``d (B, T, d_out)``, the contract of
:mod:`captum_sam.core.layers.sites`. The inner product of two such gradients is

.. math:: \langle \nabla_W l_i, \nabla_W l'_i \rangle
          = \sum_{t,s} (d_{it}\cdot d'_{is})\,(a_{it}\cdot a'_{is}),

:math:`O(T^2 (d_{in} + d_{out}))` per example instead of :math:`O(d_{in} d_{out})`
(the "ghost norm" factorisation, :mod:`captum_sam.core.layers.products`).

The names below (``LinearSite``, ``linear_sites``, ``linear_factors``, ``factor_dots``,
...) are those of the ``nn.Linear``-only factored path and keep working: they are the
general site functions, with :func:`linear_sites` restricted to linear layers.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from captum_sam.core.layers.products import (
    concat_factors,
    factor_apply,
    factor_cross,
    factor_dots,
    factor_grad_sum,
)
from captum_sam.core.layers.sites import (
    Factors,
    LayerType,
    Site,
    Unsupported,
    layer_factors,
    layer_factors_stacked,
    layer_sites,
    matches_vmap,
    register,
)
from captum_sam.core.layers.sites import _single_calls as _site_calls

__all__ = [
    "LINEAR",
    "LinearType",
    "LinearSite",
    "Factors",
    "linear_sites",
    "linear_factors",
    "linear_factors_stacked",
    "factor_dots",
    "factor_cross",
    "factor_apply",
    "concat_factors",
    "factor_grad_sum",
    "matches_vmap",
    "Unsupported",
]


class LinearType(LayerType):
    """``nn.Linear`` (not a subclass that overrides ``forward``); ``T`` = trailing positions."""

    kind = "linear"

    def accepts(self, module: nn.Module) -> bool:  # noqa: D102 - see LayerType
        return isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward

    def inputs(self, module: nn.Module, x: Tensor) -> Tensor:  # noqa: D102
        if x.dim() < 2:
            raise Unsupported("a linear layer sees an input without a batch dimension")
        return x.reshape(x.shape[0], -1, x.shape[-1])

    def outputs(self, module: nn.Module, y: Tensor) -> Tensor:  # noqa: D102
        return y.reshape(y.shape[0], -1, y.shape[-1])


LINEAR = register(LinearType())

LinearSite = Site
"""A linear site (:class:`~captum_sam.core.layers.sites.Site` with ``kind="linear"``)."""

linear_factors = layer_factors
linear_factors_stacked = layer_factors_stacked


def linear_sites(model: nn.Module, names: Sequence[str]) -> list[Site] | None:
    """The ``nn.Linear`` layers holding every attributed parameter, or ``None``.

    ``None`` when a parameter lives elsewhere (a convolution, a normalisation, an
    embedding, a subclass that overrides ``forward``); :func:`layer_sites` accepts
    convolutions too.
    """
    return layer_sites(model, names, ("linear",))


def _single_calls(
    calls: list[list[tuple[Tensor, Tensor]]], sites: Sequence[Site], size: int
) -> list[tuple[Tensor, Tensor]]:
    """The one ``(input, output)`` call of each site (zeros for a site never called)."""
    out = []
    for site, call in zip(sites, _site_calls(calls, sites, size)):
        if call is None:
            w = site.module.weight
            call = (w.new_zeros(size, 1, site.d_in), w.new_zeros(size, 1, site.d_out))
        out.append(call)
    return out
