r"""A model and a loss as pure functions of a parameter dict, with Captum's reductions.

Captum accepts three kinds of loss and so do we (see :func:`loss_reduction`):

* a *per-example* loss (``reduction="none"``, the default with
  ``sample_wise_grads_per_batch=False``) returning shape ``(B,)`` or ``(B, ...)``;
  trailing dimensions are summed, as Captum's gradients of ``loss[i]`` do;
* a *reducing* loss returning one number for the batch, the ``"sum"`` or ``"mean"``
  of the per-example losses (``sample_wise_grads_per_batch=True``);
* no loss (``loss_fn=None``): the model output itself, summed over its trailing
  dimensions per example.

Whatever the kind, :meth:`FunctionalLoss.example_loss` is the loss of one example
(the loss applied to a batch of one, summed) and :meth:`FunctionalLoss.summed_loss`
the sum of the per-example losses of a batch (a ``"mean"`` loss is multiplied by the
batch size, as Captum does), so every estimator sees the same per-example losses.
A class-weighted ``"mean"`` loss (``nn.CrossEntropyLoss(weight=...)``) divides by the
batch's total weight, so on one example its weight cancels: it is taken unweighted,
with a warning (Captum's result then depends on its batch size; at its default of 1
it is ours).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

from captum_sam.core.errors import ArgumentError, user_stacklevel
from captum_sam.core.params import Batch, Params

__all__ = [
    "FunctionalLoss",
    "REDUCTIONS",
    "loss_reduction",
    "check_per_example_loss",
    "checked_losses",
    "split_batch",
    "batch_size",
    "in_dims",
    "to_device",
]

REDUCTIONS = ("none", "sum", "mean")


def loss_reduction(loss_fn: Any, name: str, sample_wise_grads_per_batch: bool = False) -> str:
    """How ``loss_fn`` reduces a batch, checked as Captum checks it.

    Args:
        loss_fn: The loss (or ``None``: the model output is the loss).
        name: Argument name for messages (``"loss_fn"``, ``"test_loss_fn"``).
        sample_wise_grads_per_batch: Captum's flag: ``True`` means ``loss_fn`` is a
            reducing loss (``reduction`` ``"sum"`` or ``"mean"``), ``False`` a
            per-example one (``reduction="none"``).

    Returns:
        ``"none"``, ``"sum"`` or ``"mean"`` (``"sum"`` for ``loss_fn=None``, as in
        Captum; the model output is then summed per example either way).

    Raises:
        ArgumentError: ``loss_fn`` is not callable, or its ``reduction`` attribute
            does not fit ``sample_wise_grads_per_batch``.
    """
    if not isinstance(sample_wise_grads_per_batch, bool):
        raise TypeError(
            f"`sample_wise_grads_per_batch` must be a bool, got {sample_wise_grads_per_batch!r}"
        )
    if loss_fn is None:
        return "sum"
    if not callable(loss_fn):
        raise ArgumentError(f"`{name}` must be callable (outputs, labels) -> loss, got {loss_fn!r}")
    if not hasattr(loss_fn, "reduction"):
        if sample_wise_grads_per_batch:
            warnings.warn(
                f"`{name}` has no 'reduction' attribute and sample_wise_grads_per_batch=True: "
                f"it is taken to return the *sum* of the per-example losses; if it returns "
                f"their mean, set `{name}.reduction = 'mean'`",
                stacklevel=user_stacklevel(),
            )
            return "sum"
        return "none"  # checked on the first batch: it must return one loss per example
    reduction = loss_fn.reduction
    if sample_wise_grads_per_batch and reduction not in ("sum", "mean"):
        raise ArgumentError(
            f"`{name}` has reduction={reduction!r}, but sample_wise_grads_per_batch=True "
            "needs a reducing loss: reduction 'sum' or 'mean'"
        )
    if not sample_wise_grads_per_batch and reduction != "none":
        raise ArgumentError(
            f"`{name}` has reduction={reduction!r}, but sample_wise_grads_per_batch=False "
            "(the default) needs a per-example loss: construct it with reduction='none', "
            "or pass sample_wise_grads_per_batch=True"
        )
    if reduction == "mean" and getattr(loss_fn, "weight", None) is not None:
        warnings.warn(
            f"`{name}` is a class-weighted loss with reduction='mean': it divides by the "
            "total weight of the batch, so each example is taken alone here, where its "
            "weight cancels (the unweighted loss; Captum's result is the same at its default "
            "batch_size=1 and changes with the batch size). For each example's weighted "
            "loss use reduction='sum'",
            stacklevel=user_stacklevel(),
        )
    return str(reduction)


def check_per_example_loss(loss_fn: Callable, name: str = "loss_fn") -> None:
    """Refuse a loss that is not callable or whose ``reduction`` is not ``"none"``.

    Raises:
        TypeError: ``loss_fn`` is not callable.
        ArgumentError: ``loss_fn.reduction`` exists and is not ``"none"``.
    """
    if loss_fn is None or not callable(loss_fn):
        raise TypeError(
            f"`{name}` must be a callable per-example loss, e.g. "
            f"nn.CrossEntropyLoss(reduction='none'); got {loss_fn!r}"
        )
    reduction = getattr(loss_fn, "reduction", "none")
    if reduction != "none":
        raise ArgumentError(
            f"`{name}` has reduction={reduction!r}; per-example losses are needed here: "
            "construct it with reduction='none'"
        )


WRAPPERS = (nn.DataParallel, nn.parallel.DistributedDataParallel)
"""Wrappers whose ``module`` is evaluated instead (``functional_call`` refuses them)."""


def call_model(
    model: nn.Module, params: Params, frozen: Params, features: Sequence[Any], tied: bool = True
) -> Any:
    """``functional_call`` of ``model``; a :data:`WRAPPERS` model's ``module`` is called."""
    if isinstance(model, WRAPPERS):  # the wrapped module, on this process's device
        model = model.module
        params = {k.removeprefix("module."): v for k, v in params.items()}
        frozen = {k.removeprefix("module."): v for k, v in frozen.items()}
    return functional_call(model, (params, frozen), tuple(features), tie_weights=tied)


@dataclass
class FunctionalLoss:
    """A model and a loss, as pure functions of a parameter dict.

    Args:
        model: The model, used only as a structure for ``functional_call``.
        loss_fn: ``loss_fn(outputs, labels)``; ``None`` means the outputs are the loss.
        frozen: Parameters that are not attributed, and buffers.
        reduction: ``"none"`` (per example), ``"sum"`` or ``"mean"``, from
            :func:`loss_reduction`.
    """

    model: nn.Module
    loss_fn: Callable[[Any, Any], Tensor] | None
    frozen: Params
    reduction: str = "none"
    _tied: bool = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"`reduction` must be one of {REDUCTIONS}, got {self.reduction!r}")
        # functional_call re-ties tensors shared between modules on every call, which
        # costs about as much as a small forward pass: skip it when nothing is shared
        self._tied = _has_shared_tensors(self.model)

    def bind(self, frozen: Params) -> FunctionalLoss:
        """The same model and loss with other non-attributed parameters and buffers."""
        return FunctionalLoss(self.model, self.loss_fn, frozen, self.reduction)

    def outputs(self, params: Params, features: Sequence[Any]) -> Any:
        """Model outputs for a batch of features at ``params``."""
        return call_model(self.model, params, self.frozen, features, self._tied)

    def _raw(self, outputs: Any, labels: Any) -> Tensor:
        if self.loss_fn is None:
            if not isinstance(outputs, Tensor) or outputs.dim() == 0:
                raise ArgumentError(
                    "with loss_fn=None the model output is the loss: it must be a tensor "
                    "with a batch dimension"
                )
            return outputs
        return self.loss_fn(outputs, labels)

    def batch_losses(self, params: Params, batch: Batch) -> Tensor:
        """Per-example losses ``(batch,)`` of a batch at ``params``.

        A reducing loss is evaluated on each example alone (``vmap``); use
        :meth:`summed_loss` where only the sum is needed.
        """
        if self.reduction != "none" and self.loss_fn is not None:
            features, labels = split_batch(batch)
            dims = in_dims(batch)
            return vmap(self.example_loss, in_dims=(None, dims[:-1], dims[-1]))(
                params, features, labels
            )
        features, labels = split_batch(batch)
        outputs = self.outputs(params, features)
        losses = self._raw(outputs, labels)
        if self.loss_fn is not None:
            _refuse_broadcast(losses, outputs, labels)
        return _per_example(losses, batch_size(batch))

    def summed_loss(self, params: Params, batch: Batch) -> Tensor:
        """The sum of the per-example losses of a batch at ``params`` (a scalar)."""
        features, labels = split_batch(batch)
        return self.summed_output_loss(self.outputs(params, features), labels, batch_size(batch))

    def summed_output_loss(self, outputs: Any, labels: Any, size: int) -> Tensor:
        """The sum of the per-example losses of ``size`` examples given their outputs."""
        raw = self._raw(outputs, labels)
        if self.loss_fn is None:
            return _per_example(raw, size).sum()
        if self.reduction == "none":
            _refuse_broadcast(raw, outputs, labels)
            return _per_example(raw, size).sum()
        if not isinstance(raw, Tensor) or raw.numel() != 1:
            shape = tuple(getattr(raw, "shape", ()))
            raise ArgumentError(
                f"the loss has reduction={self.reduction!r} but returned shape {shape} for a "
                "batch: a reducing loss must return one number (the sum or mean of the "
                "per-example losses)"
            )
        raw = raw.reshape(())
        return raw * size if self.reduction == "mean" else raw

    def example_loss(self, params: Params, features: Sequence[Any], label: Any) -> Tensor:
        """Loss of one example (no batch dimension in the arguments)."""
        batched = tuple(_unsqueeze(f) for f in features)
        return self._raw(self.outputs(params, batched), _unsqueeze(label)).sum()


def _refuse_broadcast(losses: Any, outputs: Any, labels: Any) -> None:
    """Refuse per-example losses with more entries than the outputs and labels have.

    An elementwise loss of outputs ``(B, 1)`` and labels ``(B,)`` broadcasts to
    ``(B, B)``: every example's loss would then sum ``B`` wrong terms (torch only
    warns).
    """
    if not (isinstance(losses, Tensor) and isinstance(outputs, Tensor)):
        return
    if not isinstance(labels, Tensor):
        return
    if losses.numel() > max(outputs.numel(), labels.numel()):
        raise ArgumentError(
            f"the loss function returned shape {tuple(losses.shape)} for outputs of shape "
            f"{tuple(outputs.shape)} and labels of shape {tuple(labels.shape)}: more losses "
            "than outputs or labels, so they were broadcast against each other (e.g. "
            "outputs (B, 1) with labels (B,)); give the labels the outputs' shape"
        )


def _per_example(losses: Any, size: int) -> Tensor:
    """``(B, ...)`` losses -> ``(B,)``, trailing dimensions summed; refuse other shapes."""
    if not isinstance(losses, Tensor) or losses.dim() == 0 or losses.shape[0] != size:
        shape = tuple(getattr(losses, "shape", ())) if isinstance(losses, Tensor) else None
        raise ArgumentError(
            f"the loss function returned shape {shape} for a batch of {size} examples; a "
            f"per-example loss must return shape ({size},) or ({size}, ...): use "
            "reduction='none' (or sample_wise_grads_per_batch=True for a loss that returns "
            "the batch's sum or mean) and check that outputs and labels have matching shapes"
        )
    return losses.reshape(size, -1).sum(1) if losses.dim() > 1 else losses


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


def split_batch(batch: Batch) -> tuple[tuple[Any, ...], Any]:
    """``(features, labels)`` of a batch whose last element is the labels."""
    if not isinstance(batch, (tuple, list)) or len(batch) < 2:
        raise ValueError(
            "each batch must be a tuple (features..., labels) with the labels last, "
            f"as in Captum; got {type(batch).__name__}"
        )
    return tuple(batch[:-1]), batch[-1]


def slice_batch(batch: Batch, start: int, stop: int) -> tuple[Any, ...]:
    """Examples ``start:stop`` of a batch (every tensor with a batch dimension is cut)."""
    return tuple(x[start:stop] if isinstance(x, Tensor) and x.dim() > 0 else x for x in batch)


def batch_size(batch: Batch) -> int:
    """Number of examples of a batch (from its labels, or its first batched tensor)."""
    labels = batch[-1]
    if isinstance(labels, Tensor) and labels.dim() > 0:
        return labels.shape[0]
    for item in batch:
        if isinstance(item, Tensor) and item.dim() > 0:
            return item.shape[0]
    raise ValueError("cannot infer the batch size: no tensor with a batch dimension")


def _unsqueeze(x: Any) -> Any:
    return x.unsqueeze(0) if isinstance(x, Tensor) else x


def in_dims(batch: Batch) -> tuple[Any, ...]:
    """``vmap`` in-dims of a batch: 0 for batched tensors, ``None`` for the rest."""
    return tuple(0 if isinstance(x, Tensor) and x.dim() > 0 else None for x in batch)


def to_device(batch: Batch, device: torch.device) -> tuple[Any, ...]:
    """Move the tensors of a batch to ``device``."""
    return tuple(x.to(device) if isinstance(x, Tensor) else x for x in batch)


def checked_losses(
    loss_fn: Callable[[Any, Any], Tensor], outputs: Any, labels: Any, size: int
) -> Tensor:
    """Per-example losses ``(size,)`` of a batch, with the estimators' shape rule.

    ``loss_fn(outputs, labels)`` must return shape ``(size,)`` or ``(size, ...)``
    (trailing dimensions are summed, as
    :meth:`~captum_sam.core.losses.FunctionalLoss.batch_losses` does). A loss that
    returns the batch's mean or sum (a scalar) is refused: training would divide it by
    the batch size a second time.

    Args:
        loss_fn: The per-example loss.
        outputs: Model outputs for the batch.
        labels: The batch's labels.
        size: Number of examples in the batch.

    Returns:
        The per-example losses ``(size,)``.

    Raises:
        ArgumentError: (a ``ValueError``) the shape does not start with ``size``.
    """
    losses = loss_fn(outputs, labels)
    _refuse_broadcast(losses, outputs, labels)
    try:
        return _per_example(losses, size)
    except ArgumentError:
        shape = tuple(losses.shape) if isinstance(losses, Tensor) else type(losses).__name__
        raise ArgumentError(
            f"`loss_fn` returned {shape} for a batch of {size} examples; it must return one "
            f"loss per example, shape ({size},) or ({size}, ...) (trailing dimensions are "
            "summed): a loss returning the batch's mean or sum would be divided by the batch "
            "size again. Use e.g. nn.CrossEntropyLoss(reduction='none')"
        ) from None
