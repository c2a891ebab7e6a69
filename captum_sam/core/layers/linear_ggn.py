r"""The generalised Gauss-Newton matrix of ``nn.Linear`` models from layer factors.

For linear layers the Jacobian of model output :math:`c` of example :math:`i` with
respect to :math:`W_l` is :math:`s_{icl} a_{il}^\top` (:math:`s_{icl}` the Jacobian of
the output in the layer's output, :math:`a_{il}` the layer input), so the GGN
:math:`G = \sum_i J_i^\top H_{out,i} J_i` is assembled from one forward pass with
hooks and one matrix product over the data per pair of layers
(:func:`linear_ggn`), instead of :math:`P` curvature-vector products. The layer
sites and the hooks are those of :mod:`captum_sam.core.layers.sites`; the same conditions
hold (every attributed parameter in an ``nn.Linear`` called once per forward, no
coupling across the batch), checked numerically by :func:`ggn_matches`.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from captum_sam import core as F
from captum_sam.core.layers.linear import LinearSite, Unsupported, _single_calls
from captum_sam.core.layers.sites import _grads_to, _recording
from captum_sam.core.layers.sites import agrees as _agrees
from captum_sam.core.layers.sites import head as _head
from captum_sam.core.losses import split_batch

__all__ = ["linear_ggn", "ggn_pieces", "ggn_product", "ggn_matches", "MAX_OUTPUTS"]


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
    features, labels = split_batch(batch)
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
    gradient = torch.func.grad(lambda o: floss.summed_output_loss(o, labels, size))
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
