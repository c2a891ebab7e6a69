r"""Parameter dicts: which parameters are attributed, detached copies, trees, checks.

Everything in :mod:`captum_sam.core` is a function of a parameter dict ``params``
(name -> tensor) and never touches the model's own parameters: the model is only a
structure for :func:`torch.func.functional_call`.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from captum_sam.core.errors import ArgumentError, LayerNameError, user_stacklevel

__all__ = [
    "Params",
    "Batch",
    "attributed_names",
    "detached_params",
    "eval_mode",
    "training_mode",
    "flatten",
    "unflatten",
    "tree_add",
    "tree_scale",
    "tree_dot",
    "check_finite",
    "SCOPES",
    "check_layers",
    "scope_names",
    "sample_wise_names",
]

SCOPES = ("trainable", "attributed")
"""Values of ``perturbation_scope``: what the SAM perturbation runs over."""

Params = dict[str, Tensor]
Batch = Sequence[Any]


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
            raise LayerNameError(
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
        raise ArgumentError(
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


def scope_names(model: nn.Module, names: list[str], scope: str, rho: float = 0.0) -> list[str]:
    """The perturbation's parameters: every trainable one (and the attributed), or these.

    Raises:
        ValueError: With ``rho > 0`` and scope ``"trainable"``, an attributed parameter
            that is frozen (``requires_grad=False``, attributed because ``layers``
            names its module, as Captum does): training's perturbation never moved
            it, and this one would (its gradient would enter the norm).
    """
    if scope not in SCOPES:
        raise ValueError(f"`perturbation_scope` must be one of {SCOPES}, got {scope!r}")
    if scope == "attributed":
        return list(names)
    chosen = set(names)
    frozen = [n for n, p in model.named_parameters() if n in chosen and not p.requires_grad]
    if frozen and rho > 0:
        raise ValueError(
            f"`layers` attributes the frozen parameters {frozen} (requires_grad=False): "
            "SAM's perturbation in training never moved them, and with rho > 0 it would "
            "move them here (their gradient in its norm), which is not supported yet. "
            "Name modules without frozen parameters in `layers`, or pass rho=0 "
            "(Captum's numbers)"
        )
    return [n for n, p in model.named_parameters() if p.requires_grad or n in chosen]


def sample_wise_names(model: nn.Module, names: list[str]) -> list[str]:
    """Captum's ``sample_wise_grads_per_batch`` attributes ``nn.Linear``/``nn.Conv2d`` only."""
    supported = {
        f"{prefix}.{n}" if prefix else n
        for prefix, m in model.named_modules()
        if isinstance(m, (nn.Linear, nn.Conv2d))
        for n, _ in m.named_parameters(recurse=False)
    }
    kept = [n for n in names if n in supported]
    dropped = [n for n in names if n not in supported]
    if dropped:
        warnings.warn(
            f"sample_wise_grads_per_batch=True attributes only nn.Linear and nn.Conv2d "
            f"parameters (as Captum does): {dropped[:5]}{' ...' if len(dropped) > 5 else ''} "
            "are left out",
            stacklevel=user_stacklevel(),
        )
    if not kept:
        raise ValueError(
            "sample_wise_grads_per_batch=True attributes only nn.Linear and nn.Conv2d "
            "parameters, and the model has none among the attributed ones"
        )
    return kept


def check_layers(layers: Any) -> list[str] | None:
    """``layers`` as a list of module names (Captum asserts a list); a bare string is refused.

    Raises:
        ArgumentError: ``layers`` is a string (``"02"`` would otherwise be read as the
            modules ``"0"`` and ``"2"``), empty, or holds something else than names.
    """
    from captum_sam.core.errors import ArgumentError

    if layers is None:
        return None
    if isinstance(layers, str) or not isinstance(layers, (list, tuple)):
        raise ArgumentError(
            f"`layers` should be a list of module names, got {layers!r}; write [{layers!r}] "
            "for a single module"
        )
    if not layers or not all(isinstance(x, str) for x in layers):
        raise ArgumentError(f"`layers` should be a non-empty list of module names, got {layers!r}")
    return list(layers)


@contextlib.contextmanager
def training_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in train mode, except what the user froze; restore every flag after.

    The rule: a sub-module is *frozen* when it is in eval mode while its parent is in
    train mode (e.g. a BatchNorm put in eval mode with ``model.bn.eval()`` so that its
    running statistics stay fixed). Inside the context ``model.train()`` is called and
    every frozen sub-module (with its own sub-modules) is put back in eval mode. A
    model that is in eval mode as a whole has nothing frozen: all of it trains in
    train mode. On exit, also after an exception, every module gets back its own
    ``training`` flag as it was on entry.

    Args:
        model: The model.

    Yields:
        ``model``.
    """
    flags = [(module, module.training) for module in model.modules()]
    frozen = [
        child
        for parent in model.modules()
        if parent.training
        for child in parent.children()
        if not child.training
    ]
    try:
        model.train()
        for module in frozen:
            module.eval()
        yield model
    finally:
        for module, flag in flags:
            module.training = flag
