r"""Per-example gradient inner products of ``nn.Linear`` layers without forming them.

For a linear layer :math:`y = W a + b` applied to positions :math:`t` of example
:math:`i`, the per-example gradients are
:math:`\nabla_W l_i = \sum_t d_{it} a_{it}^\top` and :math:`\nabla_b l_i = \sum_t d_{it}`
with :math:`d_{it} = \partial l_i / \partial y_{it}`. The inner product of two such
gradients (of the same example at two weight points, say :math:`w` and
:math:`w + \epsilon`) is then

.. math:: \langle \nabla_W l_i, \nabla_W l'_i \rangle
          = \sum_{t,s} (d_{it}\cdot d'_{is})\,(a_{it}\cdot a'_{is}),

which costs :math:`O(T^2 (d_{in} + d_{out}))` per example instead of
:math:`O(d_{in} d_{out})`, and needs only one batched forward and one backward to the
layer outputs (the "ghost norm" factorisation). :func:`linear_factors` collects
:math:`(a, d)` with forward hooks during a ``functional_call`` at a given parameter
dict; the model's own parameters are never touched (the estimators run it on a
private copy of the model, so not even hooks touch the user's modules).

The factorisation is exact only when every attributed parameter belongs to an
``nn.Linear`` called once per forward and example :math:`i`'s loss depends on
example :math:`i` alone (no coupling across the batch). :func:`linear_sites` checks
the first statically; callers check the second numerically against ``vmap`` on a
few examples (:func:`matches_vmap`) before trusting it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from captum_sam import core as F
from captum_sam.core.losses import batch_size

__all__ = [
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


@dataclass(frozen=True)
class LinearSite:
    """An ``nn.Linear`` whose attributed parameters are ``weight`` and/or ``bias``."""

    module: nn.Linear
    weight: str | None
    bias: str | None


# (layer inputs (B, T, d_in), output gradients (B, T, d_out)) per site
Factors = list[tuple[Tensor, Tensor]]


class Unsupported(ValueError):
    """The model does not follow the pattern the factorisation needs."""

    def __init__(self, what: str) -> None:
        super().__init__(
            f"{what}, so per-example gradients cannot be factored for this batch; "
            "construct the estimator with factorize=False"
        )


def linear_sites(model: nn.Module, names: Sequence[str]) -> list[LinearSite] | None:
    """The linear layers holding the attributed parameters, or ``None``.

    Args:
        model: The model.
        names: Attributed parameter names.

    Returns:
        One site per ``nn.Linear`` with an attributed parameter, or ``None`` when a
        parameter lives elsewhere (convolution, normalisation, embedding, a
        subclass that overrides ``forward``): then per-example gradients must be
        formed.
    """
    wanted = set(names)
    sites, covered = [], set()
    for prefix, module in model.named_modules():
        if not isinstance(module, nn.Linear) or type(module).forward is not nn.Linear.forward:
            continue
        full = {kind: f"{prefix}.{kind}" if prefix else kind for kind in ("weight", "bias")}
        chosen = {kind: name for kind, name in full.items() if name in wanted}
        if chosen:
            sites.append(LinearSite(module, chosen.get("weight"), chosen.get("bias")))
            covered.update(chosen.values())
    return sites if sites and covered == wanted else None


@contextlib.contextmanager
def _recording(
    sites: Sequence[LinearSite], probes: Sequence[Tensor] | None = None
) -> Iterator[list[list[tuple[Tensor, Tensor]]]]:
    """Record ``(input, output)`` of every call of each site while the block runs.

    ``probes``: zeros added to each site's output. The gradient of the loss in a
    probe is the gradient in the layer output, which ``torch.func`` transforms can
    take (they differentiate inputs, not tensors captured by a hook).
    """
    calls: list[list[tuple[Tensor, Tensor]]] = [[] for _ in sites]

    def hook(i: int) -> Any:
        def record(module: nn.Module, args: tuple[Any, ...], out: Tensor) -> Tensor | None:
            calls[i].append((args[0], out))
            return None if probes is None else out + probes[i]

        return record

    handles = [s.module.register_forward_hook(hook(i)) for i, s in enumerate(sites)]
    try:
        yield calls
    finally:
        for h in handles:
            h.remove()


def _single_calls(
    calls: list[list[tuple[Tensor, Tensor]]], sites: Sequence[LinearSite], size: int
) -> list[tuple[Tensor, Tensor]]:
    """The one ``(input, output)`` call of each site (zeros for a site never called)."""
    out = []
    for site, seen in zip(sites, calls):
        if not seen:  # never called: a zero gradient
            w = site.module.weight
            seen = [(w.new_zeros(size, 1, w.shape[1]), w.new_zeros(size, 1, w.shape[0]))]
        if len(seen) != 1 or seen[0][1].dim() < 2:
            raise Unsupported("a linear layer is called more than once per forward")
        if seen[0][1].shape[0] != size:
            raise Unsupported("a linear layer sees a batch that is not the loss batch")
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


def linear_factors(
    floss: F.FunctionalLoss, params: F.Params, batch: F.Batch, sites: Sequence[LinearSite]
) -> Factors:
    """Layer inputs and per-example output gradients at ``params``, one pass.

    Args:
        floss: Model and per-example loss.
        params: Attributed parameters (the weights to evaluate at).
        batch: ``(features..., labels)``.
        sites: From :func:`linear_sites`.

    Returns:
        Per site ``(a, d)`` of shapes ``(B, T, d_in)`` and ``(B, T, d_out)``
        (``T = 1`` for inputs without extra dimensions).

    Raises:
        Unsupported: If a site is not called exactly once with a batch-first input.
    """
    # the outputs must be graph nodes: differentiate through fresh leaves
    leaves = {n: p.detach().requires_grad_(True) for n, p in params.items()}
    with torch.enable_grad(), _recording(sites) as calls:
        total = floss.summed_loss(leaves, batch)
        size = batch_size(batch)
        seen = _single_calls(calls, sites, size)
        grads = _grads_to(total, [out for _, out in seen])
    factors = []
    for (a, _), d in zip(seen, grads):
        a = a.detach()
        factors.append((a.reshape(size, -1, a.shape[-1]), d.reshape(size, -1, d.shape[-1])))
    return factors


def linear_factors_stacked(
    floss: F.FunctionalLoss,
    params: F.Params,
    batch: F.Batch,
    sites: Sequence[LinearSite],
    steps: int,
) -> Factors:
    """:func:`linear_factors` at ``steps`` weight points at once, each on its own batch.

    One ``vmap`` over the points instead of one pass each: the same numbers with
    less per-call overhead (the recorded steps of a trajectory are small batches).

    Args:
        floss: Model and per-example loss.
        params: Weights with a leading dimension ``steps`` (one point per step).
        batch: ``steps`` batches of equal size concatenated, ``(steps * B, ...)``;
            step ``s`` evaluates rows ``s * B`` to ``(s + 1) * B``.
        sites: From :func:`linear_sites`.
        steps: Number of weight points.

    Returns:
        Per site ``(a, d)`` of shapes ``(steps, B, T, d_in)`` and ``(steps, B, T, d_out)``.

    Raises:
        Unsupported: As :func:`linear_factors`.
    """
    n_rows = len(batch[-1])
    size = n_rows // max(steps, 1)
    if steps < 1 or size < 1 or size * steps != n_rows:
        raise ValueError(f"a batch of {n_rows} rows is not {steps} equal non-empty steps")
    point = lambda s: {n: v[s] for n, v in params.items()}  # noqa: E731
    rows = lambda s: tuple(x[s * size : (s + 1) * size] for x in batch)  # noqa: E731
    if not all(isinstance(x, Tensor) for x in batch):  # not stackable: one pass per step
        parts = [linear_factors(floss, point(s), rows(s), sites) for s in range(steps)]
        return [
            (torch.stack([p[i][0] for p in parts]), torch.stack([p[i][1] for p in parts]))
            for i in range(len(sites))
        ]
    # the output shape of each site, from one example at the first point
    with torch.no_grad(), _recording(sites) as calls:
        floss.summed_loss(point(0), _head(rows(0), 1))
    _single_calls(calls, sites, 1)
    used = [i for i, seen in enumerate(calls) if seen]
    probes = [calls[i][0][1].new_zeros(steps, size, *calls[i][0][1].shape[1:]) for i in used]

    def summed(p: F.Params, probe: list[Tensor], b: F.Batch) -> tuple[Tensor, list[Tensor]]:
        with _recording([sites[i] for i in used], probe) as seen:
            total = floss.summed_loss(p, b)
        if any(len(s) != 1 for s in seen):
            raise Unsupported("a linear layer is called more than once per forward")
        return total, [s[0][0] for s in seen]

    stacked = tuple(x.unflatten(0, (steps, size)) for x in batch)
    grads, inputs = torch.func.vmap(torch.func.grad(summed, argnums=1, has_aux=True))(
        params, probes, stacked
    )
    factors = []
    for i, site in enumerate(sites):
        if i in used:
            a, d = inputs[used.index(i)].detach(), grads[used.index(i)]
            factors.append(
                (a.reshape(steps, size, -1, a.shape[-1]), d.reshape(steps, size, -1, d.shape[-1]))
            )
        else:  # never called: a zero gradient
            w = site.module.weight
            factors.append(
                (w.new_zeros(steps, size, 1, w.shape[1]), w.new_zeros(steps, size, 1, w.shape[0]))
            )
    return factors


def _pairs(x: Tensor, y: Tensor) -> Tensor:
    """``(B, T, n) x (B, T', n) -> (B, T, T')`` inner products (``(B,)`` when T = T' = 1)."""
    if x.shape[1] == 1 and y.shape[1] == 1:
        if x is y:
            return torch.linalg.vector_norm(x[:, 0], dim=1).square()
        return (x[:, 0] * y[:, 0]).sum(1)
    return torch.bmm(x, y.transpose(1, 2))


def factor_dots(f: Factors, g: Factors, sites: Sequence[LinearSite]) -> Tensor:
    """Per-example inner products of the gradients ``f`` and ``g`` stand for, ``(B,)``."""
    total = None
    for site, (a, d), (a2, d2) in zip(sites, f, g):
        term = 0
        if site.weight is not None:
            prod = _pairs(d, d2) * _pairs(a, a2)
            term = prod if prod.dim() == 1 else prod.sum((1, 2))
        if site.bias is not None:
            term = term + (d.sum(1) * d2.sum(1)).sum(1)
        total = term if total is None else total + term
    return total  # type: ignore[return-value]


def factor_cross(f: Factors, g: Factors, sites: Sequence[LinearSite]) -> Tensor:
    """Inner products of every gradient of ``f`` with every one of ``g``, ``(m, B)``."""
    total = None
    for site, (a, d), (a2, d2) in zip(sites, f, g):
        if site.weight is not None and a.shape[1] == 1 and a2.shape[1] == 1:
            # (d . d2)(a . a2); a bias is a weight on a constant input 1. In place: an
            # (m, B) buffer fewer per operation is 3x faster for large m and B
            term = a[:, 0] @ a2[:, 0].T
            if site.bias is not None:
                term += 1
            term.mul_(d[:, 0] @ d2[:, 0].T)
        else:
            term = 0
            if site.weight is not None:  # positions: sum over t, s of (d_t . d2_s)(a_t . a2_s)
                dd = torch.einsum("mto,bso->mbts", d, d2)
                term = (dd * torch.einsum("mti,bsi->mbts", a, a2)).sum((2, 3))
            if site.bias is not None:
                term = term + d.sum(1) @ d2.sum(1).T
        total = term if total is None else total.add_(term)
    return total  # type: ignore[return-value]


def factor_apply(f: Factors, rows: F.Params, sites: Sequence[LinearSite]) -> Tensor:
    """Inner products of a few full gradients with the factored ones, ``(m, B)``.

    Args:
        f: Factors of ``B`` examples.
        rows: Gradients ``name -> (m, numel)`` (e.g. a summed test gradient).
        sites: From :func:`linear_sites`.
    """
    total = None
    for site, (a, d) in zip(sites, f):
        term = 0
        if site.weight is not None:
            w = rows[site.weight].reshape(-1, d.shape[-1], a.shape[-1])  # (m, out, in)
            moved = torch.matmul(a.unsqueeze(0), w.transpose(1, 2).unsqueeze(1))  # (m,B,T,out)
            term = (moved * d.unsqueeze(0)).sum((2, 3))
        if site.bias is not None:
            term = term + rows[site.bias] @ d.sum(1).T
        total = term if total is None else total + term
    return total  # type: ignore[return-value]


def concat_factors(parts: Sequence[Factors]) -> Factors:
    """Factors of several batches as the factors of one batch (rows in order)."""
    return [
        (torch.cat([p[i][0] for p in parts]), torch.cat([p[i][1] for p in parts]))
        for i in range(len(parts[0]))
    ]


def factor_grad_sum(f: Factors, sites: Sequence[LinearSite]) -> F.Params:
    """The gradient of the summed loss of the batch, from its factors.

    Factors with leading dimensions (e.g. ``(steps, B, T, d)``) give one gradient per
    leading index.
    """
    out = {}
    for site, (a, d) in zip(sites, f):
        if site.weight is not None:
            out[site.weight] = d.flatten(-3, -2).mT @ a.flatten(-3, -2)
        if site.bias is not None:
            out[site.bias] = d.sum((-3, -2))
    return out


def _head(batch: F.Batch, examples: int) -> tuple[Any, ...]:
    """The first ``examples`` examples of a batch (what the checks look at)."""
    return tuple(x[:examples] if isinstance(x, Tensor) and x.dim() > 0 else x for x in batch)


def _agrees(fast: Tensor, exact: Tensor) -> bool:
    """Whether a factored result equals its reference up to the dtype's rounding."""
    tol = 1e-4 if fast.dtype in (torch.float32, torch.float16, torch.bfloat16) else 1e-9
    scale = float(exact.abs().max()) + 1e-30
    return bool(((fast - exact).abs() <= tol * scale).all())


def matches_vmap(
    floss: F.FunctionalLoss,
    params: F.Params,
    batch: F.Batch,
    sites: Sequence[LinearSite],
    examples: int = 8,
) -> bool:
    """Whether factored squared gradient norms equal ``vmap`` ones on a few examples.

    Catches what :func:`linear_sites` cannot see: a forward or loss that couples
    the examples of a batch, or a linear layer used in an unusual way.
    """
    head = _head(batch, examples)
    try:
        f = linear_factors(floss, params, head, sites)
    except Unsupported:
        return False
    fast = factor_dots(f, f, sites)
    exact = sum(
        g.flatten(1).square().sum(1) for g in F.per_example_grads(floss, params, head).values()
    )
    return _agrees(fast, exact)
