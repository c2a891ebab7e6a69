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
import itertools
from collections.abc import Iterable, Iterator, Sequence
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
    "linear_factors_stacked",
    "factor_dots",
    "factor_cross",
    "factor_apply",
    "concat_factors",
    "factor_grad_sum",
    "matches_vmap",
    "linear_ggn",
    "ggn_pieces",
    "ggn_product",
    "ggn_matches",
    "MAX_OUTPUTS",
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
        losses = floss.batch_losses(leaves, batch)
        size = losses.shape[0]
        seen = _single_calls(calls, sites, size)
        grads = _grads_to(losses.sum(), [out for _, out in seen])
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
        floss.batch_losses(point(0), _head(rows(0), 1))
    _single_calls(calls, sites, 1)
    used = [i for i, seen in enumerate(calls) if seen]
    probes = [calls[i][0][1].new_zeros(steps, size, *calls[i][0][1].shape[1:]) for i in used]

    def summed(p: F.Params, probe: list[Tensor], b: F.Batch) -> tuple[Tensor, list[Tensor]]:
        with _recording([sites[i] for i in used], probe) as seen:
            losses = floss.batch_losses(p, b)
        if any(len(s) != 1 for s in seen):
            raise Unsupported("a linear layer is called more than once per forward")
        return losses.sum(), [s[0][0] for s in seen]

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


MAX_OUTPUTS = 256
"""Largest number of model outputs per example :func:`linear_ggn` handles (one
backward per output)."""

_BLOCK_ELEMENTS = 1 << 23  # elements of one example chunk's partial products


def _site_columns(site: LinearSite, a: Tensor) -> Tensor:
    """What multiplies the output Jacobian: ``[a, 1]``, ``a`` or ``1`` (bias only)."""
    ones = a.new_ones(a.shape[0], 1)
    if site.weight is None:
        return ones
    return torch.cat([a, ones], 1) if site.bias is not None else a


def _site_parts(site: LinearSite, d_in: int) -> list[tuple[str, slice]]:
    """Attributed parameters of a site and their columns in :func:`_site_columns`."""
    if site.weight is None:
        return [(site.bias, slice(0, 1))]  # type: ignore[list-item]
    parts = [(site.weight, slice(0, d_in))]
    if site.bias is not None:
        parts.append((site.bias, slice(d_in, d_in + 1)))
    return parts


def _symmetric_pairs(c: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Index pairs ``j <= k`` of a symmetric ``c x c`` matrix, and where each entry is.

    Returns:
        The pairs, ``(2, c (c + 1) / 2)``, and for every ``(j, k)`` the position of
        its pair, ``(c, c)``.
    """
    upper = torch.triu_indices(c, c, device=device)
    where = torch.empty(c, c, dtype=torch.long, device=device)
    where[upper[0], upper[1]] = where[upper[1], upper[0]] = torch.arange(
        upper.shape[1], device=device
    )
    return upper, where


def ggn_pieces(
    floss: F.FunctionalLoss, params: F.Params, batch: F.Batch, sites: Sequence[LinearSite]
) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """What the Gauss-Newton matrix of one batch needs, from one forward pass.

    Args:
        floss: Model and per-example loss.
        params: Attributed parameters.
        batch: ``(features..., labels)``.
        sites: From :func:`linear_sites`.

    Returns:
        Three lists with one tensor per site: the Jacobians ``S (B, C, d_out)`` of
        the ``C`` model outputs in the layer's output, ``H_out S`` (``H_out`` the
        per-example Hessian of the loss in the outputs), and the input columns
        ``(B, d_in + 1)`` (``[a, 1]`` with a bias, ``a`` without, ``1`` for a bias
        alone).

    Raises:
        Unsupported: As :func:`linear_ggn`.
    """
    features, labels = F._split(batch)
    leaves = {n: p.detach().requires_grad_(True) for n, p in params.items()}
    with torch.enable_grad(), _recording(sites) as calls:
        outputs = floss.outputs(leaves, features)
        if not isinstance(outputs, Tensor) or outputs.dim() < 1:
            raise Unsupported("the model output is not one batch-first tensor")
        size, count = outputs.shape[0], outputs[0].numel()
        if count > MAX_OUTPUTS:
            raise Unsupported(f"the model has {count} outputs per example (over {MAX_OUTPUTS})")
        seen = _single_calls(calls, sites, size)
        if any(a.dim() != 2 for a, _ in seen):
            raise Unsupported("a linear layer sees several positions per example")
        eye = torch.eye(count, dtype=outputs.dtype, device=outputs.device)
        basis = eye.reshape(count, 1, *outputs.shape[1:]).expand(count, *outputs.shape)
        jac = _grads_to(
            outputs, [out for _, out in seen], grad_outputs=basis, is_grads_batched=True
        )
    out = outputs.detach()
    gradient = torch.func.grad(lambda o: floss.loss_fn(o, labels).sum())
    h = torch.func.vmap(lambda t: torch.func.jvp(gradient, (out,), (t,))[1])(basis)
    h = h.reshape(count, size, count).transpose(0, 1)  # (B, C, C), per example
    s = [j.reshape(count, size, -1).transpose(0, 1) for j in jac]  # (B, C, d_out)
    cols = [_site_columns(site, a.detach()) for site, (a, _) in zip(sites, seen)]
    return s, [torch.bmm(h, x) for x in s], cols


def linear_ggn(
    floss: F.FunctionalLoss,
    params: F.Params,
    batches: Iterable[F.Batch],
    sites: Sequence[LinearSite],
    names: Sequence[str],
) -> Tensor:
    r"""The generalised Gauss-Newton matrix of the summed loss, from layer factors.

    For linear layers the Jacobian of output :math:`c` of example :math:`i` with
    respect to :math:`W_l` is :math:`s_{icl} a_{il}^\top` (:math:`s_{icl}` the
    Jacobian of the output in the layer's output, :math:`a_{il}` its input), so the
    block of :math:`G = \sum_i J_i^\top H_{out,i} J_i` for layers :math:`l, m` is
    :math:`\sum_i M_{ilm} \otimes a_{il} a_{im}^\top` with
    :math:`M_{ilm} = S_{il}^\top H_{out,i} S_{im}`: one matrix product over the
    examples per pair of layers, :math:`O(n P^2)` in all, instead of :math:`P`
    curvature-vector products of :math:`O(n P)` each. Equal to forming the matrix
    from :func:`captum_sam.functional.ggn_vp` products, up to rounding.

    Args:
        floss: Model and per-example loss (the model must be the one whose
            modules ``sites`` hold).
        params: Attributed parameters (the point where the matrix is taken).
        batches: ``(features..., labels)`` batches; the loss is summed over all.
        sites: From :func:`linear_sites`.
        names: Order of the parameters in the matrix (every name belongs to a site).

    Returns:
        ``(P, P)``, symmetric; zeros when ``batches`` is empty.

    Raises:
        Unsupported: If the model output is not one tensor of at most
            :data:`MAX_OUTPUTS` entries per example, or a layer sees several
            positions per example or is not called exactly once.
    """
    pairs = list(itertools.combinations_with_replacement(range(len(sites)), 2))
    blocks: dict[tuple[int, int], Tensor] = {}
    inputs = [0] * len(sites)
    for batch in batches:
        s, hs, cols = ggn_pieces(floss, params, batch, sites)
        for left, right in pairs:
            c_l, c_m = cols[left].shape[1], cols[right].shape[1]
            o_l, o_m = s[left].shape[2], s[right].shape[2]
            # a block of one layer with itself: M_i and a_i a_i^T are symmetric, so the
            # products for output pairs (o, p) and (p, o) and input pairs (j, k) and
            # (k, j) are equal, and only o <= p, j <= k are computed
            same = left == right
            if same:
                upper_o, _ = _symmetric_pairs(o_l, cols[left].device)
                upper, _ = _symmetric_pairs(c_l, cols[left].device)
            width = (upper_o.shape[1] + upper.shape[1]) if same else o_l * o_m + c_l * c_m
            step = max(1, _BLOCK_ELEMENTS // width)
            for start in range(0, cols[0].shape[0], step):
                rows = slice(start, start + step)
                mid = torch.bmm(s[left][rows].transpose(1, 2), hs[right][rows])  # (b, o, p)
                if same:
                    mid = mid[:, upper_o[0], upper_o[1]]  # (b, pairs o <= p)
                    x = cols[left][rows]
                    outer = x[:, upper[0]] * x[:, upper[1]]  # (b, pairs j <= k)
                else:
                    outer = (
                        cols[left][rows].unsqueeze(2) * cols[right][rows].unsqueeze(1)
                    ).flatten(1)
                part = mid.flatten(1).T @ outer
                key = (left, right)
                blocks[key] = part if key not in blocks else blocks[key].add_(part)
                inputs[left], inputs[right] = c_l, c_m
    sizes = {n: params[n].numel() for n in names}
    starts = dict(zip(names, [0, *itertools.accumulate(sizes[n] for n in names)]))
    ref = params[names[0]]
    g = ref.new_zeros(sum(sizes.values()), sum(sizes.values()))
    for (left, right), block in blocks.items():
        o_l, o_m = sites[left].module.weight.shape[0], sites[right].module.weight.shape[0]
        if left == right:  # back from o <= p and j <= k to every (o, p) and (j, k)
            block = block[_symmetric_pairs(o_l, block.device)[1].flatten()]
            block = block[:, _symmetric_pairs(inputs[left], block.device)[1]]
        block = block.reshape(o_l, o_m, inputs[left], inputs[right]).permute(0, 2, 1, 3)
        for name_l, j in _site_parts(sites[left], sites[left].module.weight.shape[1]):
            for name_m, k in _site_parts(sites[right], sites[right].module.weight.shape[1]):
                sub = block[:, j, :, k].reshape(sizes[name_l], sizes[name_m])
                rows = slice(starts[name_l], starts[name_l] + sizes[name_l])
                columns = slice(starts[name_m], starts[name_m] + sizes[name_m])
                g[rows, columns] = sub
                if left != right:
                    g[columns, rows] = sub.T
    return g


def ggn_matches(
    floss: F.FunctionalLoss,
    params: F.Params,
    batch: F.Batch,
    sites: Sequence[LinearSite],
    names: Sequence[str],
    examples: int = 8,
) -> bool:
    """Whether :func:`linear_ggn` agrees with ``ggn_vp`` products on a few examples.

    Two seeded random vectors, the first ``examples`` of ``batch``. Catches models
    whose forward couples the examples of a batch or whose loss is not one term
    per example.
    """
    head = _head(batch, examples)
    try:
        pieces = ggn_pieces(floss, params, head, sites)
    except Unsupported:
        return False
    like = {n: params[n] for n in names}
    ref = like[names[0]]
    gen = torch.Generator().manual_seed(0)
    dim = sum(p.numel() for p in like.values())
    v = torch.randn(dim, 2, generator=gen, dtype=torch.float64).to(ref)
    exact = F.flatten(
        F.ggn_vp(floss, params, [head], F.unflatten(v.T, like, batch_dims=1), batched=True),
        names,
        batch_dims=1,
    ).T
    return _agrees(ggn_product([pieces], sites, like, v), exact)


def ggn_product(
    pieces: Sequence[tuple[list[Tensor], list[Tensor], list[Tensor]]],
    sites: Sequence[LinearSite],
    like: F.Params,
    columns: Tensor,
) -> Tensor:
    r""":math:`G V` for a few ``(P, m)`` columns from the layer pieces of some batches.

    Per layer :math:`z = V_l [a, 1]` (the change of the layer output), the output
    change :math:`J v = \sum_l S_l z_l`, then back through :math:`H_{out}` and
    :math:`S_l^\top` to :math:`\sum_i r_{il} [a_i, 1]^\top`, without forming
    :math:`G`. (For many columns on an MLP this costs about what ``jvp`` and ``vjp``
    through the model cost, so the solvers keep :func:`captum_sam.functional.ggn_vp`;
    it serves the check in :func:`ggn_matches`.)

    Args:
        pieces: :func:`ggn_pieces` of each batch (summed over the batches).
        sites: From :func:`linear_sites`.
        like: Attributed parameters (names, order and shapes of the flat columns).
        columns: ``(P, m)``.

    Returns:
        ``(P, m)``.
    """
    vectors = F.unflatten(columns.T, like, batch_dims=1)  # name -> (m, *shape)
    weights = []  # per site (m, d_out, width of the input columns)
    for site in sites:
        parts = [vectors[site.weight]] if site.weight is not None else []
        if site.bias is not None:
            parts.append(vectors[site.bias].unsqueeze(2))
        weights.append(torch.cat(parts, 2) if len(parts) > 1 else parts[0])
    grads = [torch.zeros_like(w) for w in weights]
    for s, hs, cols in pieces:
        moved = [torch.matmul(w, c.T) for w, c in zip(weights, cols)]  # (m, d_out, B)
        h_jv = sum(torch.einsum("bco,mob->mbc", x, z) for x, z in zip(hs, moved))
        for k, (x, c) in enumerate(zip(s, cols)):
            grads[k] += torch.matmul(torch.einsum("bco,mbc->mob", x, h_jv), c)
    out = {}
    for site, g in zip(sites, grads):
        both = site.weight is not None and site.bias is not None
        for name, cols_ in _site_parts(site, g.shape[2] - 1 if both else g.shape[2]):
            out[name] = g[:, :, cols_].reshape(g.shape[0], -1)
    return torch.cat([out[n] for n in like], dim=1).T
