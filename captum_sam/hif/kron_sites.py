r"""Layer sites of the Kronecker-factored curvatures: layer inputs and pseudo-gradients.

A *site* is an ``nn.Linear`` or an ``nn.Conv2d`` (``groups=1``, zero padding) that
holds attributed parameters (its weight, its bias or both). For one batch at one
weight point, :func:`site_factors` returns per site the pair

* ``a`` ``(B, T, d_in)``: the layer input at each of its ``T`` positions (the
  trailing positions of a linear layer's input, the unfolded patches of a
  convolution, :func:`torch.nn.functional.unfold`);
* ``d`` ``(C, B, T, d_out)``: *pseudo-gradients* of the layer output. With the
  per-example Hessian of the loss in the model output written as
  :math:`H^{\mathrm{out}}_i = \sum_c q_{ic} q_{ic}^\top` (an eigendecomposition,
  negative eigenvalues set to zero), ``d[c]`` is the gradient in the layer output of
  :math:`q_{ic}^\top o_i` (:math:`o_i` the model output of example :math:`i`): one
  backward per column ``c``, batched. Then :math:`\sum_c G_{ic} G_{ic}^\top`, with
  :math:`G_{ic} = \sum_t d_{cit} a_{it}^\top`, is example :math:`i`'s generalised
  Gauss-Newton block of the layer.

Each ``d[c]`` follows the ``(a (B, T, d_in), d (B, T, d_out))`` contract of the layer
modules of :mod:`captum_sam.core.layers`, so the two can be unified. Everything runs on
the estimator's private copy of the model (hooks included); ``functional_call`` is
given the weights, the modules' own parameters are never read or changed.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import grad, vmap

from captum_sam import core as F
from captum_sam.core.curvature import second_order
from captum_sam.core.errors import ArgumentError, user_stacklevel
from captum_sam.core.layers.conv2d import CONV2D
from captum_sam.core.layers.linear import LINEAR
from captum_sam.core.layers.sites import LayerType
from captum_sam.core.losses import split_batch

__all__ = ["KroneckerSite", "kronecker_sites", "site_factors", "output_hessian_roots"]

NEGATIVE_TOL = 1e-4
"""A loss Hessian eigenvalue below ``-NEGATIVE_TOL`` times the largest one (in magnitude)
is reported as a sign that the loss is not convex in the model output (it is clipped to
zero either way)."""


@dataclass(frozen=True)
class KroneckerSite:
    """One ``nn.Linear`` or ``nn.Conv2d`` with attributed ``weight`` and/or ``bias``.

    Its parameters, as one ``(d_out, width)`` matrix: the weight reshaped to
    ``(d_out, d_in)`` (a convolution's ``(out, in, kh, kw)`` to ``(out, in kh kw)``, the
    order of :func:`~torch.nn.functional.unfold`'s patches), then the bias as one more
    column (a weight on a constant input 1). Its input and output rows are cut by the
    shared layer types of :mod:`captum_sam.core.layers` (the same rows SAM-GIF uses).
    """

    name: str
    module: nn.Module
    weight: str | None
    bias: str | None

    @property
    def d_out(self) -> int:
        """Output features (channels)."""
        return int(self.module.weight.shape[0])

    @property
    def d_in(self) -> int:
        """Input features per position (``in * kh * kw`` for a convolution)."""
        return math.prod(self.module.weight.shape[1:])

    @property
    def width(self) -> int:
        """Columns of the parameter matrix: ``d_in`` (+ 1 with a bias), 1 for a bias alone."""
        if self.weight is None:
            return 1
        return self.d_in + (self.bias is not None)

    def columns(self, a: Tensor) -> Tensor:
        """What multiplies the parameter matrix: ``[a, 1]``, ``a`` or ``1``, ``(..., width)``."""
        if self.weight is None:
            return a.new_ones(*a.shape[:-1], 1)
        if self.bias is None:
            return a
        return torch.cat([a, a.new_ones(*a.shape[:-1], 1)], dim=-1)

    def to_matrix(self, tree: F.Params) -> Tensor:
        """Parameter-shaped ``(m, *shape)`` entries of a dict as ``(m, d_out, width)``."""
        parts = []
        if self.weight is not None:
            w = tree[self.weight]
            parts.append(w.reshape(w.shape[0], self.d_out, self.d_in))
        if self.bias is not None:
            parts.append(tree[self.bias].unsqueeze(-1))
        return torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]

    def from_matrix(self, matrix: Tensor, like: F.Params) -> F.Params:
        """Inverse of :meth:`to_matrix`: ``(m, d_out, width)`` to ``name -> (m, *shape)``."""
        out = {}
        m = matrix.shape[0]
        if self.weight is not None:
            out[self.weight] = matrix[..., : self.d_in].reshape(m, *like[self.weight].shape)
        if self.bias is not None:
            out[self.bias] = matrix[..., -1].reshape(m, *like[self.bias].shape)
        return out

    def inputs(self, x: Tensor, size: int) -> Tensor:
        """The layer's recorded input as ``(B, T, d_in)``."""
        module = self.module
        if x.dim() < 2 or x.shape[0] != size:
            raise ArgumentError(
                f"K-FAC: layer {self.name!r} sees an input of shape {tuple(x.shape)}, not a "
                f"batch of {size} examples first: attribute other layers with `layers=`"
            )
        if isinstance(module, nn.Conv2d) and x.dim() != 4:
            raise ArgumentError(
                f"K-FAC: convolution {self.name!r} needs (B, C, H, W) inputs, got {tuple(x.shape)}"
            )
        return self.layer_type.inputs(module, x)

    def output_grads(self, d: Tensor, size: int) -> Tensor:
        """Gradients ``(C, *output shape)`` in the layer output as ``(C, B, T, d_out)``."""
        rows = self.layer_type.outputs(self.module, d.flatten(0, 1))  # (C B, T, d_out)
        return rows.reshape(d.shape[0], size, *rows.shape[1:])

    @property
    def layer_type(self) -> LayerType:
        """The shared layer interface (:mod:`captum_sam.core.layers`) that cuts its rows."""
        return CONV2D if isinstance(self.module, nn.Conv2d) else LINEAR


def _unsupported(name: str, module: nn.Module) -> str | None:
    """Why a module's parameters cannot be a site (``None``: they can)."""
    if isinstance(module, nn.Linear):
        if type(module).forward is not nn.Linear.forward:
            return f"{type(module).__name__} overrides nn.Linear.forward"
        return None
    if isinstance(module, nn.Conv2d):
        if type(module).forward is not nn.Conv2d.forward:
            return f"{type(module).__name__} overrides nn.Conv2d.forward"
        if module.groups != 1:
            return f"nn.Conv2d with groups={module.groups} (only groups=1 is supported)"
        if module.padding_mode != "zeros":
            return (
                f"nn.Conv2d with padding_mode={module.padding_mode!r} (only 'zeros' is supported)"
            )
        return None
    return f"{type(module).__name__} is neither nn.Linear nor nn.Conv2d"


def kronecker_sites(model: nn.Module, names: Sequence[str]) -> list[KroneckerSite]:
    """The ``nn.Linear``/``nn.Conv2d`` layers holding the attributed parameters.

    Args:
        model: The (private copy of the) model.
        names: Attributed parameter names.

    Returns:
        One site per layer with an attributed parameter, in ``named_modules`` order.

    Raises:
        ValueError: An attributed parameter belongs to another module type (an
            embedding, a normalisation layer), to a grouped or non-zero-padded
            convolution, or to a subclass with its own ``forward``: the message names
            the parameters and the layers ``layers=`` could attribute instead.
    """
    wanted = set(names)
    sites: list[KroneckerSite] = []
    refused: dict[str, str] = {}
    covered: set[str] = set()
    for prefix, module in model.named_modules():
        own = {
            kind: f"{prefix}.{kind}" if prefix else kind
            for kind, _ in module.named_parameters(recurse=False)
        }
        chosen = {kind: name for kind, name in own.items() if name in wanted}
        if not chosen:
            continue
        covered.update(chosen.values())
        why = _unsupported(prefix, module)
        if why is None and set(chosen) - {"weight", "bias"}:
            why = f"it has parameters other than weight and bias {sorted(chosen)}"
        if why is not None:
            for name in chosen.values():
                refused[name] = why
            continue
        sites.append(KroneckerSite(prefix, module, chosen.get("weight"), chosen.get("bias")))
    missing = [n for n in names if n not in covered]  # e.g. a parameter with no module
    refused.update({n: "it is not a module's own parameter" for n in missing})
    if refused:
        usable = [
            p
            for p, m in model.named_modules()
            if p and isinstance(m, (nn.Linear, nn.Conv2d)) and _unsupported(p, m) is None
        ]
        detail = "; ".join(f"{n!r} ({why})" for n, why in refused.items())
        raise ArgumentError(
            "curvature='kfac'/'ekfac' factors nn.Linear and nn.Conv2d (groups=1, zero "
            f"padding) weights and biases only, and these attributed parameters are not: "
            f"{detail}. Attribute supported layers with `layers=` (e.g. "
            f"layers={usable[:6]}) or use curvature='ggn'"
        )
    return sites


@contextlib.contextmanager
def _recording(sites: Sequence[KroneckerSite]) -> Iterator[list[list[tuple[Tensor, Tensor]]]]:
    """Record ``(input, probe)`` of every call of each site while the block runs.

    The probe is a zero leaf added to the layer output: the gradient in it is the
    gradient in the layer output, also when later operations modify that output in
    place.
    """
    calls: list[list[tuple[Tensor, Tensor]]] = [[] for _ in sites]

    def hook(i: int) -> Any:
        def record(module: nn.Module, args: tuple[Any, ...], out: Tensor) -> Tensor:
            probe = torch.zeros_like(out, requires_grad=True)
            calls[i].append((args[0], probe))
            return out + probe

        return record

    handles = [s.module.register_forward_hook(hook(i)) for i, s in enumerate(sites)]
    try:
        yield calls
    finally:
        for h in handles:
            h.remove()


def output_hessian_roots(
    floss: F.FunctionalLoss, outputs: Tensor, labels: Any
) -> tuple[Tensor, float]:
    r"""Square roots :math:`Q_i` with :math:`Q_i Q_i^\top = H^{\mathrm{out}}_i`, per example.

    The Hessian of each example's loss in its (flattened) model output, from ``C``
    forward-over-reverse products, eigendecomposed; negative eigenvalues are set to
    zero, so :math:`Q_i Q_i^\top` is the positive part of :math:`H^{\mathrm{out}}_i`
    (the Hessian itself for a loss convex in the output: cross-entropy, squared error).

    Args:
        floss: The loss (its per-example terms must not couple the examples).
        outputs: Model outputs ``(B, ...)``.
        labels: The batch's labels.

    Returns:
        ``Q`` ``(B, C, C)`` (column ``c`` is :math:`q_{ic}`) and the most negative
        eigenvalue relative to the largest magnitude (0 when none is negative).
    """
    out = outputs.detach()
    size, count = out.shape[0], out[0].numel()
    gradient = grad(lambda o: floss.summed_output_loss(o, labels, size))
    eye = torch.eye(count, dtype=out.dtype, device=out.device)
    basis = eye.reshape(count, 1, *out.shape[1:]).expand(count, *out.shape)
    columns = vmap(second_order(gradient, out))(basis)  # (C, B, ...): H_i e_c
    hess = columns.reshape(count, size, count).permute(1, 2, 0)
    values, vectors = torch.linalg.eigh((hess + hess.mT) / 2)
    top = values.abs().amax().clamp_min(torch.finfo(values.dtype).tiny)
    worst = float((values.amin() / top).clamp_max(0.0))
    return vectors * values.clamp_min(0.0).sqrt().unsqueeze(1), worst


def _backward(outputs: Tensor, targets: list[Tensor], seeds: Tensor) -> list[Tensor | None]:
    """Gradients of ``seeds[c] . outputs`` in every target, ``(C, *target shape)`` each."""
    try:
        return list(
            torch.autograd.grad(
                outputs, targets, grad_outputs=seeds, is_grads_batched=True, allow_unused=True,
                retain_graph=True,
            )
        )  # fmt: skip
    except RuntimeError:  # an op without a batching rule: one backward per column
        per_column = [
            torch.autograd.grad(outputs, targets, seed, allow_unused=True, retain_graph=True)
            for seed in seeds
        ]
        return [
            None if per_column[0][k] is None else torch.stack([g[k] for g in per_column])
            for k in range(len(targets))
        ]


def site_factors(
    floss: F.FunctionalLoss,
    params: F.Params,
    batch: F.Batch,
    sites: Sequence[KroneckerSite],
    check: bool = False,
    samples: int | None = None,
    generator: torch.Generator | None = None,
) -> tuple[list[tuple[Tensor, Tensor]], float]:
    r"""Layer inputs and pseudo-gradients of every site for one batch at ``params``.

    Args:
        floss: Model and per-example loss (bound to the non-attributed parameters).
        params: Attributed parameters (the point).
        batch: ``(features..., labels)``.
        sites: From :func:`kronecker_sites` (modules of ``floss.model``).
        check: Also verify, from the true output gradients, that the factors give the
            batch's gradient of every attributed parameter (``autograd``).
        samples: ``None``: the ``C`` exact roots :math:`q_{ic}` (``C`` backward passes).
            ``k``: ``k`` random-sign combinations
            :math:`v_{is} = \sum_c s_{ics} q_{ic} / \sqrt{k}`, :math:`s = \pm 1`
            (``k`` backward passes): :math:`\mathbb{E}[\sum_s v_{is} v_{is}^\top] =
            H^{\mathrm{out}}_i`, so every factor is unbiased (kronfluence and Grosse et al.
            2023 sample labels instead; signs need no likelihood).
        generator: The signs' random generator (CPU).

    Returns:
        Per site ``(a (B, T, d_in), d (C, B, T, d_out))`` (a layer called several times
        per forward has the calls' positions concatenated; a layer never called has
        one zero position), and the most negative relative output-Hessian eigenvalue
        (see :func:`output_hessian_roots`).

    Raises:
        ValueError: The model output is not one batch-first tensor, a layer sees
            another batch size, or (``check``) the factored gradient disagrees with
            ``autograd`` (a parameter used outside its module's ``forward``).
    """
    features, labels = split_batch(batch)
    leaves = {n: p.detach().requires_grad_(True) for n, p in params.items()}
    with torch.enable_grad(), _recording(sites) as calls:
        outputs = floss.outputs(leaves, features)
        if not isinstance(outputs, Tensor) or outputs.dim() < 1:
            raise ArgumentError(
                "curvature='kfac'/'ekfac' needs the model output to be one batch-first tensor"
            )
        size = outputs.shape[0]
        roots, worst = output_hessian_roots(floss, outputs, labels)
        if samples is not None:
            signs = torch.randint(0, 2, (size, roots.shape[2], samples), generator=generator)
            roots = roots @ (signs * 2 - 1).to(roots) / math.sqrt(samples)
        count = roots.shape[2]
        seeds = roots.permute(2, 0, 1).reshape(count, *outputs.shape)  # seeds[c, i] = q_ic
        seen = [[out for _, out in c] for c in calls]
        flat_outs = [o for outs in seen for o in outs]
        grads = _backward(outputs, flat_outs, seeds) if flat_outs else []
        true = None
        if check:
            total = floss.summed_output_loss(outputs, labels, size)
            targets = [*flat_outs, *leaves.values()]
            true = torch.autograd.grad(total, targets, allow_unused=True)
    factors, k = [], 0
    for site, site_calls in zip(sites, calls):
        a_parts, d_parts = [], []
        for x, out in site_calls:
            g = grads[k]
            k += 1
            a_parts.append(site.inputs(x.detach(), size))
            g = (
                torch.zeros(count, *out.shape, dtype=out.dtype, device=out.device)
                if g is None
                else g
            )
            d_parts.append(site.output_grads(g, size))
        if not a_parts:  # never called: no gradient
            w = site.module.weight
            a_parts = [w.new_zeros(size, 1, site.d_in)]
            d_parts = [w.new_zeros(count, size, 1, site.d_out)]
        factors.append((torch.cat(a_parts, dim=1), torch.cat(d_parts, dim=2)))
    if true is not None:
        _check_gradients(sites, calls, factors, list(true), leaves, size)
    return factors, worst


def _check_gradients(
    sites: Sequence[KroneckerSite],
    calls: list[list[tuple[Tensor, Tensor]]],
    factors: list[tuple[Tensor, Tensor]],
    true: list[Tensor | None],
    leaves: F.Params,
    size: int,
) -> None:
    """Refuse sites whose factored batch gradient is not ``autograd``'s."""
    n_outs = sum(len(c) for c in calls)
    out_grads, param_grads = true[:n_outs], dict(zip(leaves, true[n_outs:]))
    bad, k = [], 0
    for site, site_calls, (a, _) in zip(sites, calls, factors):
        d_parts = []
        for _, out in site_calls:
            g = out_grads[k]
            k += 1
            g = torch.zeros_like(out) if g is None else g
            d_parts.append(site.output_grads(g.unsqueeze(0), size)[0])
        if d_parts:
            d = torch.cat(d_parts, dim=1)
            factored = torch.einsum("bto,bti->oi", d, site.columns(a))
        else:
            factored = a.new_zeros(site.d_out, site.width)
        exact = {
            n: torch.zeros_like(leaves[n]) if param_grads[n] is None else param_grads[n]
            for n in (site.weight, site.bias)
            if n is not None
        }
        reference = site.to_matrix({n: v.unsqueeze(0) for n, v in exact.items()})[0]
        tol = 1e-9 if reference.dtype == torch.float64 else 1e-3
        scale = float(reference.abs().max()) + float(factored.abs().max()) + 1e-30
        if float((factored - reference).abs().max()) > tol * scale:
            bad.extend(n for n in (site.weight, site.bias) if n is not None)
    if bad:
        raise ArgumentError(
            f"curvature='kfac'/'ekfac': the gradient of {bad} is not the product of its "
            "layer's inputs and output gradients (a parameter used outside its module's "
            "forward, e.g. nn.MultiheadAttention's out_proj, or shared with another "
            "module); attribute other layers with `layers=` or use curvature='ggn'"
        )


def warn_if_not_convex(worst: float, loss_fn: Any) -> None:
    """Warn once when the loss Hessian in the output had clearly negative eigenvalues."""
    if worst < -NEGATIVE_TOL:
        warnings.warn(
            f"`loss_fn` {loss_fn!r} is not convex in the model output (an output-Hessian "
            f"eigenvalue of {worst:.2e} times the largest): K-FAC uses the positive part of "
            "that Hessian (negative eigenvalues set to zero), so it approximates a "
            "positive semi-definite Gauss-Newton matrix, not curvature='ggn''s",
            stacklevel=user_stacklevel(),
        )
