r"""The pure ``torch.func`` core: parameter dicts, per-example gradients, SAM, HVPs.

Everything here is a function of a parameter dict ``params`` (name -> tensor) and
never touches the model's own parameters: the model is only used as a structure
for :func:`torch.func.functional_call`. Dataset-level quantities are sums over an
iterable of batches (tuples whose last element is the label, as in Captum), so no
``P x P`` matrix and no ``n x P`` matrix is ever formed here.

Scales: :func:`summed_grad`, :func:`hvp` and :func:`ggn_vp` use the *summed* loss
:math:`S(w) = \sum_i l_i(w)` over the batches they are given;
:func:`mean_grad` divides by the number of examples.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, vjp, vmap

__all__ = [
    "Params",
    "FunctionalLoss",
    "attributed_names",
    "detached_params",
    "eval_mode",
    "per_example_grads",
    "stacked_per_example_grads",
    "stacked_mean_grad",
    "stacked_grad_sum",
    "grad_sum",
    "summed_grad",
    "mean_grad",
    "sam_perturbation",
    "sam_perturbation_list",
    "per_example_perturbations",
    "hvp",
    "ggn_vp",
    "perturbation_jvp",
    "perturbation_vjp",
    "flatten",
    "unflatten",
    "tree_add",
    "tree_scale",
    "tree_dot",
    "check_finite",
    "check_per_example_loss",
]

Params = dict[str, Tensor]
Batch = Sequence[Any]


# --------------------------------------------------------------------------- params


def attributed_names(model: nn.Module, layers: Sequence[str] | None = None) -> list[str]:
    """Names of the parameters attribution differentiates with respect to.

    Args:
        model: The model.
        layers: Names of sub-modules (as in ``model.named_modules()``), or ``None``
            for every parameter with ``requires_grad``.

    Returns:
        Parameter names in ``model.named_parameters()`` order.

    Raises:
        ValueError: If a layer name does not exist, or the selection is empty.
    """
    if layers is None:
        names = [n for n, p in model.named_parameters() if p.requires_grad]
    else:
        if isinstance(layers, str) or not all(isinstance(x, str) for x in layers):
            raise TypeError(f"`layers` must be a list of module names, got {layers!r}")
        modules = dict(model.named_modules())
        missing = [name for name in layers if name not in modules]
        if missing:
            raise ValueError(
                f"`layers` names {missing} are not modules of the model; valid names "
                f"include {[n for n in modules if n][:10]}"
            )
        prefixes = [name + "." if name else "" for name in layers]
        names = [
            n
            for n, _ in model.named_parameters()
            if any(n.startswith(prefix) for prefix in prefixes)
        ]
    if not names:
        raise ValueError(
            "no parameters to attribute: the model has no trainable parameters"
            + (f" in `layers`={list(layers)}" if layers is not None else "")
        )
    return names


def detached_params(model: nn.Module, names: Sequence[str]) -> tuple[Params, Params]:
    """Split the model's state into attributed params and everything else.

    Args:
        model: The model (not modified).
        names: Attributed parameter names, from :func:`attributed_names`.

    Returns:
        ``(params, frozen)``: detached copies-by-reference of the attributed
        parameters, and of every other parameter and buffer.
    """
    chosen = set(names)
    params = {n: p.detach() for n, p in model.named_parameters() if n in chosen}
    frozen = {n: p.detach() for n, p in model.named_parameters() if n not in chosen}
    frozen.update({n: b.detach() for n, b in model.named_buffers()})
    return params, frozen


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every sub-module in eval mode and restore each one's flag afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, flag in flags:
            module.training = flag


# --------------------------------------------------------------------------- losses


def check_per_example_loss(loss_fn: Callable, name: str = "loss_fn") -> None:
    """Refuse a loss module whose ``reduction`` is not ``"none"``.

    Raises:
        ValueError: If ``loss_fn.reduction`` exists and is not ``"none"``.
        TypeError: If ``loss_fn`` is not callable.
    """
    if loss_fn is None or not callable(loss_fn):
        raise TypeError(
            f"`{name}` must be a callable per-example loss, e.g. "
            f"nn.CrossEntropyLoss(reduction='none'); got {loss_fn!r}"
        )
    reduction = getattr(loss_fn, "reduction", "none")
    if reduction != "none":
        raise ValueError(
            f"`{name}` has reduction={reduction!r}; captum_sam needs per-example "
            f"losses: construct it with reduction='none' (it sums or averages them "
            "itself, with the scale documented for each estimator)"
        )


@dataclass
class FunctionalLoss:
    """A model and a per-example loss, as pure functions of a parameter dict.

    Args:
        model: The model, used only as a structure for ``functional_call``.
        loss_fn: Per-example loss ``loss_fn(outputs, labels) -> (batch,)``
            (``reduction="none"``).
        frozen: Parameters that are not attributed, and buffers.
    """

    model: nn.Module
    loss_fn: Callable[[Any, Any], Tensor]
    frozen: Params
    _tied: bool = field(init=False, repr=False)

    def __post_init__(self) -> None:
        # functional_call re-ties tensors shared between modules on every call, which
        # costs about as much as a small forward pass: skip it when nothing is shared
        self._tied = _has_shared_tensors(self.model)

    def outputs(self, params: Params, features: Sequence[Any]) -> Any:
        """Model outputs for a batch of features at ``params``."""
        return functional_call(
            self.model, (params, self.frozen), tuple(features), tie_weights=self._tied
        )

    def batch_losses(self, params: Params, batch: Batch) -> Tensor:
        """Per-example losses ``(batch,)`` of a batch at ``params``."""
        features, labels = _split(batch)
        losses = self.loss_fn(self.outputs(params, features), labels)
        size = _batch_size(batch)
        if not isinstance(losses, Tensor) or losses.shape != (size,):
            shape = getattr(losses, "shape", type(losses).__name__)
            raise ValueError(
                f"the loss function returned shape {tuple(shape)} for a batch of "
                f"{size} examples; it must return one loss per example, shape "
                f"({size},): use reduction='none' and check that outputs and labels "
                "have matching shapes"
            )
        return losses

    def summed_loss(self, params: Params, batch: Batch) -> Tensor:
        """Summed loss of a batch at ``params`` (a scalar)."""
        return self.batch_losses(params, batch).sum()

    def example_loss(self, params: Params, features: Sequence[Any], label: Any) -> Tensor:
        """Loss of one example (no batch dimension in the arguments)."""
        batched = tuple(_unsqueeze(f) for f in features)
        return self.loss_fn(self.outputs(params, batched), _unsqueeze(label)).sum()


def _has_shared_tensors(model: nn.Module) -> bool:
    """Whether a parameter or buffer is registered under more than one name."""
    seen: set[int] = set()
    named = (
        *model.named_parameters(remove_duplicate=False),
        *model.named_buffers(remove_duplicate=False),
    )
    for _, tensor in named:
        if id(tensor) in seen:
            return True
        seen.add(id(tensor))
    return False


def _split(batch: Batch) -> tuple[tuple[Any, ...], Any]:
    if not isinstance(batch, (tuple, list)) or len(batch) < 2:
        raise ValueError(
            "each batch must be a tuple (features..., labels) with the labels last, "
            f"as in Captum; got {type(batch).__name__}"
        )
    return tuple(batch[:-1]), batch[-1]


def _batch_size(batch: Batch) -> int:
    labels = batch[-1]
    if isinstance(labels, Tensor) and labels.dim() > 0:
        return labels.shape[0]
    for item in batch:
        if isinstance(item, Tensor) and item.dim() > 0:
            return item.shape[0]
    raise ValueError("cannot infer the batch size: no tensor with a batch dimension")


def _unsqueeze(x: Any) -> Any:
    return x.unsqueeze(0) if isinstance(x, Tensor) else x


def _in_dims(batch: Batch) -> tuple[Any, ...]:
    return tuple(0 if isinstance(x, Tensor) and x.dim() > 0 else None for x in batch)


def to_device(batch: Batch, device: torch.device) -> tuple[Any, ...]:
    """Move the tensors of a batch to ``device``."""
    return tuple(x.to(device) if isinstance(x, Tensor) else x for x in batch)


# --------------------------------------------------------------------------- grads


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
    features, labels = _split(batch)
    dims = _in_dims(batch)

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
        bound = FunctionalLoss(floss.model, floss.loss_fn, fr)
        return per_example_grads(bound, p, batch, params_per_example=params_per_example)

    if next(iter(params.values())).shape[0] == 1:  # one set: skip the outer vmap
        first = one({k: v[0] for k, v in params.items()}, {k: v[0] for k, v in frozen.items()})
        return {k: v.unsqueeze(0) for k, v in first.items()}
    return vmap(one)(params, frozen)


def stacked_grad_sum(
    floss: FunctionalLoss, params: Params, frozen: Params, batches: Iterable[Batch]
) -> tuple[Params, int]:
    """Summed gradient for ``K`` stacked weight sets in one pass over the data.

    Returns:
        ``(grad, n)``: the gradient of the summed loss with a leading ``K``
        dimension (zeros when there is no batch), and the number of examples.
    """

    def one(p: Params, fr: Params, batch: Batch) -> Params:
        return grad(FunctionalLoss(floss.model, floss.loss_fn, fr).summed_loss)(p, batch)

    single = next(iter(params.values())).shape[0] == 1  # one set: skip the outer vmap
    total, count = None, 0
    for batch in batches:
        if single:
            g = one(
                {k: v[0] for k, v in params.items()}, {k: v[0] for k, v in frozen.items()}, batch
            )
            g = {k: v.unsqueeze(0) for k, v in g.items()}
        else:
            g = vmap(one, in_dims=(0, 0, None))(params, frozen, batch)
        total = g if total is None else tree_add(total, g)
        count += _batch_size(batch)
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


def grad_sum(floss: FunctionalLoss, params: Params, batches: Iterable[Batch]) -> tuple[Params, int]:
    """Gradient of the summed loss over the batches (zeros if none) and the count."""
    total, count = None, 0
    for batch in batches:
        g = grad(floss.summed_loss)(params, batch)
        total = g if total is None else tree_add(total, g)
        count += _batch_size(batch)
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


# --------------------------------------------------------------------------- SAM


def sam_perturbation_list(
    weights: Sequence[Tensor],
    grads: Sequence[Tensor],
    rho: float | Sequence[float],
    adaptive: bool | Sequence[bool],
) -> list[Tensor]:
    r"""SAM / ASAM perturbation of a list of tensors (the optimizer's formula).

    :math:`\epsilon = \rho\, a^2 g / (\lVert a g \rVert + 10^{-12})` with
    :math:`a = |w|` for ASAM and :math:`a = 1` for SAM; the norm runs over all
    tensors together. ``rho`` and ``adaptive`` may be given per tensor (the
    optimizer's per-group values).

    Returns:
        One perturbation tensor per weight tensor.
    """
    k = len(weights)
    rhos = [rho] * k if isinstance(rho, (int, float)) else list(rho)
    adaptives = [adaptive] * k if isinstance(adaptive, bool) else list(adaptive)
    norms = [
        ((torch.abs(w) if a else 1.0) * g).norm(p=2) for w, g, a in zip(weights, grads, adaptives)
    ]
    grad_norm = torch.norm(torch.stack(norms), p=2)
    return [
        (torch.pow(w, 2) if a else 1.0) * g * (r / (grad_norm + 1e-12))
        for w, g, r, a in zip(weights, grads, rhos, adaptives)
    ]


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


# --------------------------------------------------------------------------- HVPs


def hvp(
    floss: FunctionalLoss,
    params: Params,
    batches: Iterable[Batch],
    vectors: Params,
    *,
    batched: bool = False,
    mode: str = "forward-over-reverse",
    allow_empty: bool = False,
) -> Params:
    """Hessian-vector products of the summed loss over all batches.

    Args:
        floss: Model and loss.
        params: The point :math:`w` where the Hessian is taken.
        batches: The data; the loss is summed over every example.
        vectors: Tangent :math:`v` (keys of ``params``); with ``batched`` each
            tensor has a leading dimension of ``m`` vectors.
        batched: Compute ``m`` products at once with ``vmap``.
        mode: ``"forward-over-reverse"`` (``jvp`` of ``grad``) or
            ``"reverse-over-reverse"`` (``vjp`` of ``grad``).
        allow_empty: Return zeros instead of raising when there is no batch.

    Returns:
        :math:`H v` with the shape of ``vectors``.
    """
    if mode not in ("forward-over-reverse", "reverse-over-reverse"):
        raise ValueError(
            f"`mode` must be 'forward-over-reverse' or 'reverse-over-reverse', got {mode!r}"
        )

    def one_batch(batch: Batch) -> Callable[[Params], Params]:
        gradient = grad(lambda p: floss.summed_loss(p, batch))
        if mode == "forward-over-reverse":
            return lambda v: jvp(gradient, (params,), (v,))[1]
        _, pullback = vjp(gradient, params)
        return lambda v: pullback(v)[0]

    return _sum_over_batches(one_batch, batches, vectors, batched, allow_empty)


def ggn_vp(
    floss: FunctionalLoss,
    params: Params,
    batches: Iterable[Batch],
    vectors: Params,
    *,
    batched: bool = False,
    allow_empty: bool = False,
) -> Params:
    r"""Generalised Gauss-Newton products :math:`G v = \sum_i J_i^T H_{out,i} J_i v`.

    :math:`J_i` is the Jacobian of example i's model output and :math:`H_{out,i}`
    the Hessian of its loss in the output; computed as ``jvp`` through the model,
    an output-space HVP of the loss, then ``vjp`` back. Positive semi-definite
    for convex losses (cross-entropy, squared error).

    Args:
        floss: Model and loss.
        params: The point :math:`w`.
        batches: The data (summed over every example).
        vectors: Tangent(s), as in :func:`hvp`.
        batched: ``m`` products at once.
        allow_empty: Return zeros instead of raising when there is no batch.

    Returns:
        :math:`G v` with the shape of ``vectors``.
    """

    def one_batch(batch: Batch) -> Callable[[Params], Params]:
        features, labels = _split(batch)

        def forward(p: Params) -> Any:
            return floss.outputs(p, features)

        outputs, pullback = vjp(forward, params)

        def output_loss(o: Any) -> Tensor:
            return floss.loss_fn(o, labels).sum()

        def product(v: Params) -> Params:
            jv = jvp(forward, (params,), (v,))[1]
            hjv = jvp(grad(output_loss), (outputs,), (jv,))[1]
            return pullback(hjv)[0]

        return product

    return _sum_over_batches(one_batch, batches, vectors, batched, allow_empty)


def _sum_over_batches(
    make_product: Callable[[Batch], Callable[[Params], Params]],
    batches: Iterable[Batch],
    vectors: Params,
    batched: bool,
    allow_empty: bool,
) -> Params:
    total = None
    for batch in batches:
        product = make_product(batch)
        out = vmap(product)(vectors) if batched else product(vectors)
        total = out if total is None else tree_add(total, out)
    if total is None:
        if allow_empty:  # e.g. a rank whose shard of the data is empty
            return {k: torch.zeros_like(v) for k, v in vectors.items()}
        raise ValueError("the dataset is empty: no batch for the Hessian")
    return total


# --------------------------------------------------------------------------- trees


def flatten(tree: Params, names: Sequence[str] | None = None, batch_dims: int = 0) -> Tensor:
    """Concatenate a dict of tensors into one vector (per leading batch index).

    Args:
        tree: The dict.
        names: Key order (default: the dict's order).
        batch_dims: Number of leading dimensions kept (0 -> ``(P,)``,
            1 -> ``(B, P)``).
    """
    names = list(tree) if names is None else names
    return torch.cat(
        [tree[n].reshape(*tree[n].shape[:batch_dims], -1) for n in names], dim=batch_dims
    )


def unflatten(vector: Tensor, like: Params, batch_dims: int = 0) -> Params:
    """Inverse of :func:`flatten` for the shapes (and key order) of ``like``."""
    out, start = {}, 0
    lead = vector.shape[:batch_dims]
    for name, ref in like.items():
        size = ref.numel()
        out[name] = vector[..., start : start + size].reshape(*lead, *ref.shape)
        start += size
    if start != vector.shape[-1]:
        raise ValueError(f"vector has {vector.shape[-1]} entries, parameters {start}")
    return out


def tree_add(a: Params, b: Params, alpha: float = 1.0) -> Params:
    """``a + alpha * b`` key by key."""
    return {k: a[k] + alpha * b[k] for k in a}


def tree_scale(a: Params, scale: float | Tensor) -> Params:
    """``scale * a`` key by key."""
    return {k: scale * v for k, v in a.items()}


def tree_dot(a: Params, b: Params) -> Tensor:
    """Inner product of two dicts over all entries (a scalar)."""
    return sum((a[k] * b[k]).sum() for k in a)


def check_finite(tree: Params | Tensor, what: str) -> None:
    """Raise ``ValueError`` if any entry is NaN or infinite.

    Args:
        tree: A tensor or dict of tensors.
        what: Description used in the message, e.g. ``"training gradients"``.
    """
    tensors = tree.values() if isinstance(tree, dict) else [tree]
    for t in tensors:
        if not torch.isfinite(t).all():
            raise ValueError(
                f"{what} contain NaN or inf: check the inputs, the loss function and "
                "the checkpoint weights"
            )
