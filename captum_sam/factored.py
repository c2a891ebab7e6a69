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

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from captum_sam import functional as F

__all__ = [
    "LinearSite",
    "Factors",
    "linear_sites",
    "linear_factors",
    "factor_dots",
    "factor_cross",
    "factor_apply",
    "concat_factors",
    "factor_grad_sum",
    "matches_vmap",
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
    inputs: dict[int, list[Tensor]] = {i: [] for i in range(len(sites))}
    outputs: dict[int, list[Tensor]] = {i: [] for i in range(len(sites))}

    def hook(i: int) -> Any:
        def record(module: nn.Module, args: tuple[Any, ...], out: Tensor) -> None:
            inputs[i].append(args[0])
            outputs[i].append(out)

        return record

    # the outputs must be graph nodes: differentiate through fresh leaves
    leaves = {n: p.detach().requires_grad_(True) for n, p in params.items()}
    handles = [s.module.register_forward_hook(hook(i)) for i, s in enumerate(sites)]
    try:
        with torch.enable_grad():
            losses = floss.batch_losses(leaves, batch)
            size = losses.shape[0]
            for i, site in enumerate(sites):
                if not outputs[i]:  # never called: a zero gradient
                    w = site.module.weight
                    inputs[i].append(w.new_zeros(size, 1, w.shape[1]))
                    outputs[i].append(w.new_zeros(size, 1, w.shape[0]))
                if len(outputs[i]) != 1 or outputs[i][0].dim() < 2:
                    raise Unsupported("a linear layer is called more than once per forward")
                if outputs[i][0].shape[0] != size:
                    raise Unsupported("a linear layer sees a batch that is not the loss batch")
            outs = [outputs[i][0] for i in range(len(sites))]
            wanted = [o for o in outs if o.requires_grad]
            found = iter(torch.autograd.grad(losses.sum(), wanted, allow_unused=True))
            grads = [next(found) if o.requires_grad else None for o in outs]
    finally:
        for h in handles:
            h.remove()
    factors = []
    for i, (out, d) in enumerate(zip(outs, grads)):
        a = inputs[i][0].detach()
        d = torch.zeros_like(out) if d is None else d
        factors.append((a.reshape(size, -1, a.shape[-1]), d.reshape(size, -1, d.shape[-1])))
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
        term = 0
        if site.weight is not None:
            if a.shape[1] == 1 and a2.shape[1] == 1:
                term = (d[:, 0] @ d2[:, 0].T) * (a[:, 0] @ a2[:, 0].T)
            else:  # positions: sum over t, s of (d_t . d2_s)(a_t . a2_s)
                dd = torch.einsum("mto,bso->mbts", d, d2)
                term = (dd * torch.einsum("mti,bsi->mbts", a, a2)).sum((2, 3))
        if site.bias is not None:
            term = term + d.sum(1) @ d2.sum(1).T
        total = term if total is None else total + term
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
    """The gradient of the summed loss of the batch, from its factors."""
    out = {}
    for site, (a, d) in zip(sites, f):
        if site.weight is not None:
            out[site.weight] = d.flatten(0, 1).T @ a.flatten(0, 1)
        if site.bias is not None:
            out[site.bias] = d.sum((0, 1))
    return out


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
    head = tuple(x[:examples] if isinstance(x, Tensor) and x.dim() > 0 else x for x in batch)
    try:
        f = linear_factors(floss, params, head, sites)
    except Unsupported:
        return False
    fast = factor_dots(f, f, sites)
    exact = sum(
        g.flatten(1).square().sum(1) for g in F.per_example_grads(floss, params, head).values()
    )
    tol = 1e-4 if fast.dtype in (torch.float32, torch.float16, torch.bfloat16) else 1e-9
    scale = float(exact.abs().max()) + 1e-30
    return bool(((fast - exact).abs() <= tol * scale).all())
