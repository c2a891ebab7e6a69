r"""Training with SAM.

:func:`train_sam` trains a model with SAM-SGD on batches drawn from a seeded
permutation and, given ``record_dir``, records its trajectory with a
:class:`~captum_sam.TrajectoryRecorder`; :func:`sam_step` is its checked step, shared
with :mod:`captum_sam.replay` (replaying a recorded schedule without some examples,
retraining on the kept ones). The record directory format and its loading live in
:mod:`captum_sam.trajectory`.

Training and replay check every step as strictly as the estimators read their losses
(:func:`~captum_sam.core.losses.checked_losses`: one loss per example, trailing
dimensions summed) and refuse a NaN or infinite loss, gradient or update, naming the
step. Train/eval flags follow :func:`~captum_sam.core.params.training_mode`: modules
the user froze stay in eval mode and every module's own flag is restored afterwards,
also when an error stops the run.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from captum_sam.core import check_per_example_loss, to_device
from captum_sam.core.checkpoints import model_device
from captum_sam.core.data import fetch_batch
from captum_sam.core.errors import check_number
from captum_sam.core.losses import checked_losses
from captum_sam.core.params import training_mode
from captum_sam.optim import SAM
from captum_sam.recorder import TrajectoryRecorder, _require_map_style

__all__ = ["TrainResult", "train_sam", "sam_step"]


@dataclass
class TrainResult:
    """What :func:`train_sam` returns."""

    model: nn.Module
    epoch_losses: list[float]
    record_dir: str | None


def _all_finite(tensors: Sequence[Tensor]) -> bool:
    """Whether every entry of every tensor is finite (one device sync)."""
    if not tensors:
        return True
    flags = [torch.isfinite(t).all() for t in tensors]
    return bool(torch.stack([f.to(flags[0].device) for f in flags]).all())


def sam_step(
    model: nn.Module,
    optimizer: SAM,
    loss_fn: Callable[[Any, Any], Tensor],
    batch: tuple[Any, ...],
    weights: Tensor | None = None,
    where: str = "this step",
) -> float:
    """One SAM step on ``sum_i w_i l_i / |B|`` (weights default to one).

    :meth:`SAM.step` with both forward-backward passes checked: the losses have one
    entry per example (:func:`~captum_sam.core.losses.checked_losses`), and the loss
    and the gradients are finite. A failing check raises before the update, with the weights
    back at :math:`w`; an update that makes the weights non-finite raises after it.

    Args:
        model: The model (trained in place).
        optimizer: Its SAM optimizer.
        loss_fn: Per-example loss.
        batch: ``(features..., labels)`` on the model's device.
        weights: Per-example weights ``(B,)`` (``None``: all one).
        where: The step, for messages (e.g. ``"train_sam epoch 0, step 3"``).

    Returns:
        The loss at :math:`w`.

    Raises:
        ValueError: A check failed (the message names ``where``).
    """
    size = batch[-1].shape[0]
    params = [p for group in optimizer.param_groups for p in group["params"]]
    hint = (
        "check the features and labels of this batch for NaN/inf, the loss function and "
        "the learning rate"
    )

    points = iter(("at the weights w", "at the SAM-perturbed weights w + eps"))

    def closure() -> Tensor:
        point = next(points, "in an extra closure call")
        optimizer.zero_grad()
        losses = checked_losses(loss_fn, model(*batch[:-1]), batch[-1], size)
        if weights is not None:
            losses = losses * weights
        loss = losses.sum() / size
        if not bool(torch.isfinite(loss)):
            raise ValueError(
                f"the training loss is {float(loss.detach())} at {where} ({point}): {hint}"
            )
        loss.backward()
        if not _all_finite([p.grad for p in params if p.grad is not None]):
            raise ValueError(f"the gradients contain NaN or inf at {where} ({point}): {hint}")
        return loss

    optimizer.zero_grad()  # no gradient given: step() calls the closure at w, then w + eps
    loss = optimizer.step(closure)  # a failure at w + eps puts the weights back at w
    if not _all_finite([p.detach() for p in params]):
        raise ValueError(
            f"the update of {where} made the weights NaN or inf: the learning rate is "
            "probably too large"
        )
    return float(loss.detach())


def train_sam(
    model: nn.Module,
    dataset: Dataset,
    loss_fn: Callable[[Any, Any], Tensor],
    epochs: int,
    lr: float,
    rho: float,
    batch_size: int,
    weight_decay: float = 0.0,
    record_dir: str | os.PathLike[str] | None = None,
    seed: int = 0,
    adaptive: bool = False,
    momentum: float = 0.0,
    save_every: int | None = None,
    lr_schedule: Callable[[int], float] | None = None,
    show_progress: bool = False,
    overwrite: bool = False,
) -> TrainResult:
    r"""Train ``model`` in place with SAM-SGD and optionally record the trajectory.

    Each step minimises :math:`\frac{1}{|B_t|}\sum_{i \in B_t} l_i` at the SAM
    perturbed weights, with ``weight_decay`` :math:`\lambda` applied by SGD at
    :math:`w_t` (Algorithm 1 of the paper). Batches come from a permutation drawn
    per epoch from a generator seeded with ``seed``, so a run is deterministic.

    Every batch is checked: ``loss_fn`` must return one loss per example and the
    loss, the gradients and the updated weights must be finite. Train/eval flags
    follow :func:`~captum_sam.core.params.training_mode`: the model trains in train mode except the
    sub-modules the user froze (in eval mode inside a parent in train mode, e.g. a
    BatchNorm whose running statistics must not move), which stay in eval mode; every
    module's own flag is restored at the end, also when an error stops training.

    Args:
        model: Model to train (its parameters are updated).
        dataset: Map-style dataset of ``(features..., label)`` tuples.
        loss_fn: Per-example loss (``reduction="none"``): shape ``(B,)`` or
            ``(B, ...)`` for a batch of ``B`` (trailing dimensions summed).
        epochs: Passes over the data.
        lr: Learning rate :math:`\eta`.
        rho: SAM radius.
        batch_size: Examples per step.
        weight_decay: :math:`\lambda` of the objective.
        record_dir: Where to record the trajectory (``None``: no recording).
        seed: Seed for the batch order and any randomness in the model.
        adaptive: ASAM.
        momentum: SGD momentum.
        save_every: Checkpoint every this many steps; ``None`` checkpoints at every
            epoch end.
        lr_schedule: Optional multiplier of ``lr`` per epoch (``LambdaLR``).
        show_progress: Show a tqdm progress bar over epochs.
        overwrite: Allow reusing a record directory.

    Returns:
        The trained model, the mean loss per epoch and the record directory.

    Raises:
        ValueError: A bad argument; ``loss_fn`` does not return one loss per example;
            a loss, gradient or update is NaN or infinite (the message names the epoch
            and step; a failing loss or gradient check leaves the weights as they were
            before that step).
    """
    from tqdm.auto import tqdm

    _require_map_style(dataset)
    check_per_example_loss(loss_fn)
    for name, value in (("epochs", epochs), ("batch_size", batch_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"`{name}` must be a positive int, got {value!r}")
    check_number("lr", lr, positive=True)
    check_number("weight_decay", weight_decay)
    check_number("momentum", momentum)
    device = model_device(model)
    n = len(dataset)
    optimizer = SAM(
        model.parameters(),
        torch.optim.SGD,
        rho=rho,
        adaptive=adaptive,
        lr=lr,
        momentum=momentum,
        weight_decay=weight_decay,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule) if lr_schedule else None
    recorder = None
    if record_dir is not None:
        recorder = TrajectoryRecorder(
            record_dir,
            model,
            optimizer,
            n_train=n,
            save_every=save_every,
            seed=seed,
            overwrite=overwrite,
            dataset=dataset,
        )
    generator = torch.Generator().manual_seed(seed)
    epoch_losses: list[float] = []
    step = 0
    with (
        torch.random.fork_rng(devices=[] if device.type == "cpu" else [device]),
        training_mode(model),
    ):
        torch.manual_seed(seed)
        if recorder is not None:
            recorder.start()
        bar = tqdm(range(epochs), desc="SAM training", disable=not show_progress)
        for epoch in bar:
            order = torch.randperm(n, generator=generator)
            total = 0.0
            for idx in order.split(batch_size):
                batch = to_device(fetch_batch(dataset, idx), device)
                where = f"train_sam epoch {epoch}, step {step}"
                total += sam_step(model, optimizer, loss_fn, batch, where=where) * len(idx)
                step += 1
                if recorder is not None:
                    recorder.record_step(idx, epoch=epoch)
            if recorder is not None and save_every is None:
                recorder.save_checkpoint(epoch=epoch)
            if scheduler is not None:
                scheduler.step()
            epoch_losses.append(total / n)
            bar.set_postfix(loss=f"{epoch_losses[-1]:.4f}")
    directory = recorder.finish() if recorder is not None else None
    return TrainResult(model=model, epoch_losses=epoch_losses, record_dir=directory)


def __getattr__(name: str) -> Any:
    """``replay_trajectory`` moved to :mod:`captum_sam.replay`; still importable from here."""
    if name == "replay_trajectory":
        from captum_sam.replay import replay_trajectory

        return replay_trajectory
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
