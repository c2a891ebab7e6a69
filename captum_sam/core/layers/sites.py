r"""Layer sites: the one interface every layer type's factored products are written against.

A *site* is a layer holding attributed parameters whose per-example weight gradient
is a sum of outer products over the positions :math:`t` the layer is applied at:

.. math:: \nabla_W l_i = \sum_t d_{it} a_{it}^\top, \qquad \nabla_b l_i = \sum_t d_{it},

with :math:`a_{it}` the layer input at position :math:`t` (a linear layer's input
vector, a convolution's unfolded patch) and :math:`d_{it} = \partial l_i/\partial
y_{it}` the gradient of the loss in the layer output there. :func:`layer_factors`
collects ``(a, d)`` of shapes ``(B, T, d_in)`` and ``(B, T, d_out)`` for every site
from one batched forward pass (hooks record the inputs) and one backward pass to the
layer outputs; :func:`site_grads` forms per-example gradients from them. The
per-example inner products and the per-layer projection are written once against this
contract (:mod:`~captum_sam.core.layers.products`,
:class:`~captum_sam.core.projection.LayerProjection`); the factored Gauss-Newton
matrix of SAM-HIF (:mod:`~captum_sam.core.layers.linear_ggn`) still takes linear
sites only.

Each layer type lives in its own module (:mod:`~captum_sam.core.layers.linear`,
:mod:`~captum_sam.core.layers.conv2d`) as a :class:`LayerType` registered with
:func:`register`: adding a layer type is one new file.

The factorisation is exact only when every site is called once per forward and
example :math:`i`'s loss depends on example :math:`i` alone (no coupling across the
batch, e.g. BatchNorm in train mode). :func:`layer_sites` checks the module types;
callers check the rest numerically against ``vmap`` on a few examples
(:func:`matches_vmap`) before trusting the factors. Hooks run on whatever module the
sites hold: the estimators give them a private copy of the user's model.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from captum_sam import core as F
from captum_sam.core.losses import batch_size, slice_batch

__all__ = [
    "LayerType",
    "Site",
    "Factors",
    "Unsupported",
    "register",
    "layer_types",
    "layer_sites",
    "layer_factors",
    "layer_factors_and_grads",
    "layer_factors_stacked",
    "site_grads",
    "matches_vmap",
]

# (layer inputs (B, T, d_in), output gradients (B, T, d_out)) per site
Factors = list[tuple[Tensor, Tensor]]


class LayerType:
    """How one layer type's inputs and outputs become ``(B, T, d)`` rows (subclass per type).

    Attributes:
        kind: Short name (``"linear"``, ``"conv2d"``), the :attr:`Site.kind` of its sites.
    """

    kind: str = ""
    diagonal: bool = False
    r"""``True`` for an elementwise (per-channel) layer: its weight gradient is
    :math:`\sum_t d_{it} \odot a_{it}` (``d_in = 1``), not an outer product."""

    def at_call(self, module: nn.Module, x: Tensor) -> Tensor:
        """What to record of the input ``x`` during the forward call (default: ``x``).

        Runs inside the forward hook, while ``functional_call``'s weights and buffers
        are in place: a layer whose rows depend on its buffers reads them here.
        """
        return x

    def accepts(self, module: nn.Module) -> bool:
        """Whether ``module`` is a layer of this type the factorisation is exact for."""
        raise NotImplementedError

    def inputs(self, module: nn.Module, x: Tensor) -> Tensor:
        """The module's batched input ``x`` as ``(B, T, d_in)`` rows ``a``."""
        raise NotImplementedError

    def outputs(self, module: nn.Module, y: Tensor) -> Tensor:
        """A batched output-shaped tensor (the output or its gradient) as ``(B, T, d_out)``."""
        raise NotImplementedError


_TYPES: dict[str, LayerType] = {}


def register(layer_type: LayerType) -> LayerType:
    """Make a layer type known to :func:`layer_sites` (each type module calls this once)."""
    _TYPES[layer_type.kind] = layer_type
    return layer_type


def layer_types() -> dict[str, LayerType]:
    """The registered layer types by kind."""
    return dict(_TYPES)


@dataclass(frozen=True)
class Site:
    """A layer whose attributed parameters are ``weight`` and/or ``bias`` (full names).

    ``kind`` names its :class:`LayerType`; ``d_in`` and ``d_out`` are the widths of
    its factors (``C_in * kh * kw`` and ``C_out`` for a convolution).
    """

    module: nn.Module
    weight: str | None
    bias: str | None
    kind: str = "linear"

    @property
    def layer_type(self) -> LayerType:
        """The registered :class:`LayerType` of this site."""
        return _TYPES[self.kind]

    @property
    def d_out(self) -> int:
        """Output features (channels)."""
        return int(self.module.weight.shape[0])

    @property
    def d_in(self) -> int:
        """Input features per position."""
        return math.prod(self.module.weight.shape[1:])

    @property
    def diagonal(self) -> bool:
        """Whether the layer is elementwise (see :attr:`LayerType.diagonal`)."""
        return self.layer_type.diagonal

    @property
    def names(self) -> list[str]:
        """The attributed parameter names of the site (weight first)."""
        return [n for n in (self.weight, self.bias) if n is not None]


class Unsupported(ValueError):
    """The model does not follow the pattern the factorisation needs."""

    def __init__(self, what: str) -> None:
        super().__init__(
            f"{what}, so per-example gradients cannot be factored for this batch; "
            "construct the estimator with factorize=False"
        )


def layer_sites(
    model: nn.Module,
    names: Sequence[str],
    kinds: Sequence[str] | None = None,
    *,
    complete: bool = True,
) -> list[Site] | None:
    """The layers holding the attributed parameters, or ``None``.

    Args:
        model: The model.
        names: Attributed parameter names.
        kinds: Layer types to consider (default: every registered one).
        complete: Return ``None`` unless the sites hold *every* attributed parameter;
            ``False``: the sites found, possibly none (the rest are then handled
            elsewhere, e.g. by a dense projection).

    Returns:
        One site per layer with an attributed parameter, in ``named_modules`` order,
        or ``None`` when a parameter lives elsewhere (normalisation, embedding, a
        convolution with groups, a subclass that overrides ``forward``): then
        per-example gradients must be formed.
    """
    types = [_TYPES[k] for k in (kinds if kinds is not None else _TYPES)]
    wanted = set(names)
    sites, covered = [], set()
    for prefix, module in model.named_modules():
        found = next((t for t in types if t.accepts(module)), None)
        if found is None:
            continue
        full = {kind: f"{prefix}.{kind}" if prefix else kind for kind in ("weight", "bias")}
        chosen = {kind: name for kind, name in full.items() if name in wanted}
        if chosen:
            sites.append(Site(module, chosen.get("weight"), chosen.get("bias"), found.kind))
            covered.update(chosen.values())
    if not complete:
        return sites
    return sites if sites and covered == wanted else None


@contextlib.contextmanager
def _recording(
    sites: Sequence[Site], probes: Sequence[Tensor] | None = None
) -> Iterator[list[list[tuple[Tensor, Tensor]]]]:
    """Record ``(input, output)`` of every call of each site while the block runs.

    ``probes``: zeros added to each site's output. The gradient of the loss in a
    probe is the gradient in the layer output, which ``torch.func`` transforms can
    take (they differentiate inputs, not tensors captured by a hook).
    """
    calls: list[list[tuple[Tensor, Tensor]]] = [[] for _ in sites]

    def hook(i: int) -> Any:
        kind = sites[i].layer_type

        def record(module: nn.Module, args: tuple[Any, ...], out: Tensor) -> Tensor | None:
            calls[i].append((kind.at_call(module, args[0]), out))
            return None if probes is None else out + probes[i]

        return record

    handles = [s.module.register_forward_hook(hook(i)) for i, s in enumerate(sites)]
    try:
        yield calls
    finally:
        for h in handles:
            h.remove()


def _single_calls(
    calls: list[list[tuple[Tensor, Tensor]]], sites: Sequence[Site], size: int
) -> list[tuple[Tensor, Tensor] | None]:
    """The one ``(input, output)`` call of each site (``None`` for a site never called)."""
    out: list[tuple[Tensor, Tensor] | None] = []
    for seen in calls:
        if not seen:
            out.append(None)
            continue
        if len(seen) != 1 or seen[0][1].dim() < 2:
            raise Unsupported("a layer is called more than once per forward")
        if seen[0][1].shape[0] != size or seen[0][0].shape[0] != size:
            raise Unsupported("a layer sees a batch that is not the loss batch")
        out.append(seen[0])
    return out


def _grads_to(roots: Tensor, outs: list[Tensor], **kwargs: Any) -> list[Tensor]:
    """``autograd.grad`` of ``roots`` to each layer output (zeros where unused)."""
    wanted = [o for o in outs if o.requires_grad]
    found = iter(torch.autograd.grad(roots, wanted, allow_unused=True, **kwargs) if wanted else [])
    grads = [next(found) if o.requires_grad else None for o in outs]
    batched = kwargs.get("is_grads_batched", False)
    shape = (kwargs["grad_outputs"].shape[0],) if batched else ()
    return [o.new_zeros(*shape, *o.shape).detach() if g is None else g for o, g in zip(outs, grads)]


def _zero_factors(site: Site, lead: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    """The factors of a site never called: one position of zeros (a zero gradient)."""
    w = site.module.weight
    return w.new_zeros(*lead, 1, site.d_in), w.new_zeros(*lead, 1, site.d_out)


def layer_factors(
    floss: F.FunctionalLoss, params: F.Params, batch: F.Batch, sites: Sequence[Site]
) -> Factors:
    r"""Layer inputs and per-example output gradients at ``params``, one pass.

    Args:
        floss: Model and per-example loss.
        params: Attributed parameters (the weights to evaluate at).
        batch: ``(features..., labels)``.
        sites: From :func:`layer_sites`.

    Returns:
        Per site ``(a, d)`` of shapes ``(B, T, d_in)`` and ``(B, T, d_out)`` (``T = 1``
        for a linear layer on inputs without extra dimensions, ``H' W'`` for a
        convolution), the gradient of the summed loss: example :math:`i`'s gradient
        is :math:`\sum_t d_{it} a_{it}^\top`.

    Raises:
        Unsupported: If a site is not called exactly once with a batch-first input.
    """
    return layer_factors_and_grads(floss, params, batch, sites, ())[0]


def layer_factors_and_grads(
    floss: F.FunctionalLoss,
    params: F.Params,
    batch: F.Batch,
    sites: Sequence[Site],
    wrt: Sequence[str],
) -> tuple[Factors, F.Params]:
    """:func:`layer_factors`, and the summed loss's gradient in frozen tensors ``wrt``.

    One forward and one backward pass: the backward reaches the layer outputs and the
    named tensors of ``floss.frozen`` (parameters that are not attributed but that a
    perturbation moves) together.
    """
    # the outputs must be graph nodes: differentiate through fresh leaves
    leaves = {n: p.detach().requires_grad_(True) for n, p in params.items()}
    held = {n: floss.frozen[n].detach().requires_grad_(True) for n in wrt}
    bound = floss.bind({**floss.frozen, **held}) if held else floss
    size = batch_size(batch)
    with torch.enable_grad(), _recording(sites) as calls:
        total = bound.summed_loss(leaves, batch)
        seen = _single_calls(calls, sites, size)
        called = [s for s in seen if s is not None]
        outs = [out for _, out in called]
        found = _grads_to(total, [*outs, *held.values()])
        grads = iter(found[: len(outs)])
    factors = []
    for site, call in zip(sites, seen):
        if call is None:
            factors.append(_zero_factors(site, (size,)))
            continue
        kind = site.layer_type
        factors.append(
            (kind.inputs(site.module, call[0].detach()), kind.outputs(site.module, next(grads)))
        )
    return factors, dict(zip(held, found[len(outs) :]))


def layer_factors_stacked(
    floss: F.FunctionalLoss,
    params: F.Params,
    batch: F.Batch,
    sites: Sequence[Site],
    steps: int,
) -> Factors:
    """:func:`layer_factors` at ``steps`` weight points at once, each on its own batch.

    One ``vmap`` over the points instead of one pass each: the same numbers with
    less per-call overhead (the recorded steps of a trajectory are small batches).

    Args:
        floss: Model and per-example loss.
        params: Weights with a leading dimension ``steps`` (one point per step).
        batch: ``steps`` batches of equal size concatenated, ``(steps * B, ...)``;
            step ``s`` evaluates rows ``s * B`` to ``(s + 1) * B``.
        sites: From :func:`layer_sites`.
        steps: Number of weight points.

    Returns:
        Per site ``(a, d)`` of shapes ``(steps, B, T, d_in)`` and ``(steps, B, T, d_out)``.

    Raises:
        Unsupported: As :func:`layer_factors`.
    """
    n_rows = len(batch[-1])
    size = n_rows // max(steps, 1)
    if steps < 1 or size < 1 or size * steps != n_rows:
        raise ValueError(f"a batch of {n_rows} rows is not {steps} equal non-empty steps")
    point = lambda s: {n: v[s] for n, v in params.items()}  # noqa: E731
    rows = lambda s: tuple(x[s * size : (s + 1) * size] for x in batch)  # noqa: E731
    if not all(isinstance(x, Tensor) for x in batch):  # not stackable: one pass per step
        parts = [layer_factors(floss, point(s), rows(s), sites) for s in range(steps)]
        return [
            (torch.stack([p[i][0] for p in parts]), torch.stack([p[i][1] for p in parts]))
            for i in range(len(sites))
        ]
    # the output shape of each site, from one example at the first point
    with torch.no_grad(), _recording(sites) as calls:
        floss.summed_loss(point(0), head(rows(0), 1))
    first = _single_calls(calls, sites, 1)
    used = [i for i, call in enumerate(first) if call is not None]
    probes = [first[i][1].new_zeros(steps, size, *first[i][1].shape[1:]) for i in used]  # type: ignore[index]

    def summed(p: F.Params, probe: list[Tensor], b: F.Batch) -> tuple[Tensor, list[Tensor]]:
        with _recording([sites[i] for i in used], probe) as seen:
            total = floss.summed_loss(p, b)
        if any(len(s) != 1 for s in seen):
            raise Unsupported("a layer is called more than once per forward")
        return total, [s[0][0] for s in seen]

    stacked = tuple(x.unflatten(0, (steps, size)) for x in batch)
    grads, inputs = torch.func.vmap(torch.func.grad(summed, argnums=1, has_aux=True))(
        params, probes, stacked
    )
    factors = []
    for i, site in enumerate(sites):
        if i not in used:
            factors.append(_zero_factors(site, (steps, size)))
            continue
        kind, j = site.layer_type, used.index(i)
        a = kind.inputs(site.module, inputs[j].detach().flatten(0, 1))
        d = kind.outputs(site.module, grads[j].flatten(0, 1))
        factors.append((a.unflatten(0, (steps, size)), d.unflatten(0, (steps, size))))
    return factors


def site_grads(a: Tensor, d: Tensor, site: Site) -> dict[str, Tensor]:
    r"""Per-example gradients of a site's attributed parameters from its factors.

    :math:`G_i = \sum_t d_{it} a_{it}^\top` (one batched matmul, :math:`O(T d_{in}
    d_{out})` per example) reshaped to the weight's shape, and
    :math:`\sum_t d_{it}` for the bias; an elementwise site's weight gradient is
    :math:`\sum_t d_{it} \odot a_{it}`.

    Args:
        a: ``(..., B, T, d_in)`` layer inputs.
        d: ``(..., B, T, d_out)`` output gradients.
        site: The site.

    Returns:
        ``{name: (..., B, *param.shape)}`` for the site's attributed parameters.
    """
    out = {}
    lead = d.shape[:-2]
    if site.weight is not None:
        w = (d * a).sum(-2) if site.diagonal else d.mT @ a  # elementwise: sum_t d_t * a_t
        out[site.weight] = w.reshape(*lead, *site.module.weight.shape)
    if site.bias is not None:
        out[site.bias] = d.sum(-2)
    return out


def head(batch: F.Batch, examples: int) -> tuple[Any, ...]:
    """The first ``examples`` examples of a batch (what the checks look at)."""
    return slice_batch(batch, 0, examples)


def agrees(fast: Tensor, exact: Tensor) -> bool:
    """Whether a factored result equals its reference up to the dtype's rounding."""
    tol = 1e-4 if fast.dtype in (torch.float32, torch.float16, torch.bfloat16) else 1e-9
    scale = float(exact.abs().max()) + 1e-30
    return bool(((fast - exact).abs() <= tol * scale).all())


def matches_vmap(
    floss: F.FunctionalLoss,
    params: F.Params,
    batch: F.Batch,
    sites: Sequence[Site],
    examples: int = 8,
) -> bool:
    """Whether gradients formed from factors equal ``vmap`` ones on a few examples.

    Catches what :func:`layer_sites` cannot see: a forward or loss that couples the
    examples of a batch, or a layer used in an unusual way. Lower-precision weights
    are compared in float64 (weights, buffers and inputs widened): in float32 a deep
    network's rounding alone separates the two ways by up to 1e-2 (both equally far
    from float64 on a ResNet-18), far above any fixed tolerance that would still
    catch a structural difference. When widening fails (a tensor the model does not
    receive through ``functional_call``), the check runs in the weights' own dtype.
    """
    part = head(batch, examples)
    # two examples suffice for coupling; float64 per-example gradients of a large model
    # cost twice float32's (8 of a ResNet-18: a 1.3 GB peak above the run's own)
    wide = _widened(floss, params, head(part, 2))
    if wide is not None:
        try:
            return _same_grads(*wide, sites)
        except RuntimeError:  # e.g. a float32 tensor the model holds itself
            pass
    return _same_grads(floss, params, part, sites)


def _widened(
    floss: F.FunctionalLoss, params: F.Params, part: tuple[Any, ...]
) -> tuple[F.FunctionalLoss, F.Params, tuple[Any, ...]] | None:
    """Float64 copies of the weights, frozen tensors and inputs, or ``None`` if already."""
    narrow = (torch.float32, torch.float16, torch.bfloat16)
    if not any(v.dtype in narrow for v in params.values()):
        return None

    def wide(x: Any) -> Any:
        return x.double() if isinstance(x, Tensor) and x.dtype in narrow else x

    frozen = {n: wide(v) for n, v in floss.frozen.items()}
    return floss.bind(frozen), {n: wide(v) for n, v in params.items()}, tuple(map(wide, part))


def _same_grads(
    floss: F.FunctionalLoss, params: F.Params, part: tuple[Any, ...], sites: Sequence[Site]
) -> bool:
    try:
        f = layer_factors(floss, params, part, sites)
    except Unsupported:
        return False
    exact = F.per_example_grads(floss, params, part)
    fast: dict[str, Tensor] = {}
    for site, (a, d) in zip(sites, f):
        fast.update(site_grads(a, d, site))
    if set(fast) != set(exact):
        return False
    return all(agrees(fast[n].flatten(1), exact[n].flatten(1)) for n in exact)
