r"""BatchNorm made explicit: running statistics (``"eval"``) or the training batch's (``"batch"``).

A model with BatchNorm computes a different function in train mode (each layer
normalises with the mean and biased variance of the current batch) and in eval mode
(the running statistics). Training saw the former; the estimators, by default, the
latter (``batchnorm="eval"``). With ``batchnorm="batch"`` the per-example *training*
gradients use the statistics of the recorded batch :math:`B_t` the example was trained
in, computed at the weights where the gradient is taken (:math:`w_t + \epsilon_t` for
SAM-GIF) and held constant:

.. math:: \nabla_w\, l\big(f(x_k; w, \mu_{B_t}(w'), \sigma^2_{B_t}(w'))\big)
          \Big|_{w = w'}, \qquad \mu, \sigma^2 \text{ not differentiated},

so the gradients of a batch's examples sum to the gradient of the batch loss with its
statistics as constants. Test examples keep the running statistics.

Implementation: the statistics are read by a forward pass over the batch with every
BatchNorm layer in train mode and ``track_running_stats`` off (so no running buffer
moves), then substituted for the layer's ``running_mean`` / ``running_var`` in the
buffers handed to ``functional_call``: an eval-mode BatchNorm normalises with exactly
those constants. A BatchNorm the user froze (eval mode inside a parent in train
mode, the rule of :func:`~captum_sam.core.params.training_mode`) trained on its
running statistics and keeps them.
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from captum_sam.core.errors import user_stacklevel
from captum_sam.core.losses import FunctionalLoss, batch_size, split_batch
from captum_sam.core.params import Batch, Params

__all__ = [
    "BATCHNORM_MODES",
    "BatchStatistics",
    "TrainModeLoss",
    "batchnorm_layers",
    "check_batchnorm",
    "train_mode_batchnorm",
    "warn_on_batchnorm_gap",
]

BATCHNORM_MODES = ("eval", "batch")
"""Values of ``batchnorm``: running statistics, or the statistics of the training batch."""


def check_batchnorm(batchnorm: Any, tolerance: Any) -> None:
    """Validate ``batchnorm`` and ``batchnorm_tolerance`` (``None`` turns the check off).

    Raises:
        ValueError: An unknown mode or a tolerance that is not a number > 0.
    """
    if batchnorm not in BATCHNORM_MODES:
        raise ValueError(f"`batchnorm` must be one of {BATCHNORM_MODES}, got {batchnorm!r}")
    if tolerance is None:
        return
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)):
        raise TypeError(f"`batchnorm_tolerance` must be a number or None, got {tolerance!r}")
    if not (tolerance > 0 and math.isfinite(tolerance)):
        raise ValueError(f"`batchnorm_tolerance` must be a finite number > 0, got {tolerance!r}")


def batchnorm_layers(model: nn.Module) -> dict[str, _BatchNorm]:
    """The BatchNorm layers that trained on batch statistics, by module name.

    Every ``_BatchNorm`` (``BatchNorm1d/2d/3d``, ``SyncBatchNorm``) except those the
    user froze: in eval mode inside a parent in train mode (with their sub-modules),
    as :func:`~captum_sam.core.params.training_mode` trains them.
    """
    frozen: set[int] = set()
    for parent in model.modules():
        if parent.training:
            for child in parent.children():
                if not child.training:
                    frozen.update(id(m) for m in child.modules())
    return {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, _BatchNorm) and id(m) not in frozen
    }


@contextlib.contextmanager
def train_mode_batchnorm(layers: Iterable[_BatchNorm]) -> Iterator[None]:
    """BatchNorm layers normalise with batch statistics and move no buffer; restored after.

    Inside, every layer is in train mode with ``track_running_stats`` off: its
    forward passes ``None`` for the running buffers, so it neither reads nor updates
    them (nor ``num_batches_tracked``), which is also safe under ``vmap``.
    """
    saved = [(m, m.training, m.track_running_stats) for m in layers]
    try:
        for m, _, _ in saved:
            m.training = True
            m.track_running_stats = False
        yield
    finally:
        for m, training, track in saved:
            m.training = training
            m.track_running_stats = track


@dataclass
class TrainModeLoss(FunctionalLoss):
    """A :class:`FunctionalLoss` whose model runs its BatchNorm ``layers`` on batch statistics.

    The loss of a batch is the train-mode loss training minimised (the statistics
    differentiated too); no running buffer moves.
    """

    layers: tuple[_BatchNorm, ...] = ()

    def bind(self, frozen: Params) -> TrainModeLoss:
        """The same model, loss and layers with other non-attributed tensors."""
        return TrainModeLoss(self.model, self.loss_fn, frozen, self.reduction, self.layers)

    def outputs(self, params: Params, features: Sequence[Any]) -> Any:
        """Model outputs with the layers on the batch's statistics.

        Raises:
            ValueError: A layer sees one value per channel (a batch of one example
                without spatial dimensions) and has no batch statistics.
        """
        with train_mode_batchnorm(self.layers):
            try:
                return super().outputs(params, features)
            except ValueError as err:
                if "Expected more than 1 value per channel" not in str(err):
                    raise
                raise ValueError(
                    "batchnorm='batch' evaluates BatchNorm on batch statistics, which a batch "
                    "of one example does not have here: choose a `batch_size` that leaves no "
                    f"batch of one ({err})"
                ) from err


@dataclass
class BatchStatistics:
    """Batch statistics of a model's BatchNorm layers and their use as constants.

    Args:
        layers: BatchNorm layers by module name (:func:`batchnorm_layers`) of the model
            the functional losses run (the estimator's private copy).
    """

    layers: dict[str, _BatchNorm]
    _order: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        untracked = [n for n, m in self.layers.items() if m.running_mean is None]
        if untracked:
            raise ValueError(
                f"batchnorm='batch' needs running buffers to substitute, but BatchNorm "
                f"layers {untracked} have track_running_stats=False (they use batch "
                "statistics in every mode): use batchnorm='eval'"
            )

    def train_loss(self, floss: FunctionalLoss) -> TrainModeLoss:
        """``floss`` evaluated in train mode (batch statistics, differentiated)."""
        return TrainModeLoss(
            floss.model, floss.loss_fn, floss.frozen, floss.reduction, tuple(self.layers.values())
        )

    def statistics(self, floss: FunctionalLoss, params: Params, batch: Batch) -> Params:
        r"""``{"<layer>.running_mean": mu, "<layer>.running_var": sigma^2}`` of a batch.

        Mean and *biased* variance of each layer's input over every dimension but the
        channel (dimension 1), as a train-mode forward normalises with; computed at
        ``params`` and ``floss.frozen``, detached.
        """
        found: dict[str, tuple[Tensor, Tensor]] = {}

        def hook(name: str) -> Any:
            def read(module: nn.Module, inputs: tuple[Tensor, ...], output: Any) -> None:
                x = inputs[0]
                dims = [d for d in range(x.dim()) if d != 1]
                found[name] = (x.mean(dim=dims), x.var(dim=dims, unbiased=False))

            return read

        handles = [m.register_forward_hook(hook(n)) for n, m in self.layers.items()]
        try:
            with torch.no_grad():
                self.train_loss(floss).outputs(params, split_batch(batch)[0])
        finally:
            for h in handles:
                h.remove()
        out: Params = {}
        for name in self.layers:
            if name not in found:
                raise ValueError(f"BatchNorm layer {name!r} was not called by the model's forward")
            prefix = f"{name}." if name else ""
            out[prefix + "running_mean"], out[prefix + "running_var"] = found[name]
        return out

    def stacked_frozen(
        self, floss: FunctionalLoss, params: Params, frozen: Params, batch: Batch
    ) -> Params:
        """``frozen`` ``(K, ...)``, each set's running buffers replaced by its batch statistics."""
        k_sets = next(iter(params.values())).shape[0]
        stats = [
            self.statistics(
                floss.bind({n: v[k] for n, v in frozen.items()}),
                {n: v[k] for n, v in params.items()},
                batch,
            )
            for k in range(k_sets)
        ]
        out = dict(frozen)
        for name in stats[0]:
            out[name] = torch.stack([s[name] for s in stats]).to(frozen[name])
        return out


def mean_losses(floss: FunctionalLoss, params: Params, batches: Sequence[Batch]) -> float:
    """Mean per-example loss over the batches (no gradient)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for b in batches:
            total += float(floss.summed_loss(params, b))
            count += batch_size(b)
    return total / max(count, 1)


def warn_on_batchnorm_gap(
    stats: BatchStatistics,
    floss: FunctionalLoss,
    params: Params,
    batches: Sequence[Batch],
    tolerance: float,
    checkpoint: str,
    mode: str,
) -> float | None:
    """Warn when the eval-mode and train-mode (batch statistics) losses differ at a checkpoint.

    Args:
        stats: The model's BatchNorm layers.
        floss: The loss bound to the checkpoint's frozen tensors (eval mode).
        params: The checkpoint's attributed weights.
        batches: Training batches (at least two examples each).
        tolerance: Largest relative difference ``|eval - batch| / |batch|`` accepted.
        checkpoint: The checkpoint's path, for the message.
        mode: The estimator's ``batchnorm`` (for the message).

    Returns:
        The relative difference, or ``None`` when there is no usable batch.
    """
    batches = [b for b in batches if batch_size(b) >= 2]
    if not stats.layers or not batches:
        return None
    eval_loss = mean_losses(floss, params, batches)
    batch_loss = mean_losses(stats.train_loss(floss), params, batches)
    gap = abs(eval_loss - batch_loss) / max(abs(batch_loss), 1e-12)
    if gap > tolerance:
        side = (
            "test gradients use the running statistics, training gradients the batch's"
            if mode == "batch"
            else "every gradient uses the running statistics (batchnorm='eval'); "
            "batchnorm='batch' (trajectory form) takes training gradients with the "
            "statistics of the recorded batch"
        )
        warnings.warn(
            f"BatchNorm: at checkpoint {os.path.basename(checkpoint)!r} the mean loss with "
            f"running statistics (eval mode) is {eval_loss:.4g} against {batch_loss:.4g} with "
            f"batch statistics (train mode) on {len(batches)} training batch(es): relative "
            f"difference {gap:.3g} > batchnorm_tolerance={tolerance:g}. The model the "
            f"scores describe is not the one training saw; {side}",
            UserWarning,
            stacklevel=user_stacklevel(),
        )
    return gap
