r"""Training with SAM and replaying a recorded SAM schedule.

:func:`train_sam` trains a model with SAM-SGD on batches drawn from a seeded
permutation and, given ``record_dir``, records its trajectory with a
:class:`~captum_sam.TrajectoryRecorder`; :func:`replay_trajectory` re-runs a
recorded schedule step by step, optionally with some training examples left out
(the ground truth that SAM-GIF approximates). The record directory format and its
loading live in :mod:`captum_sam.trajectory`.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from captum_sam.core import check_per_example_loss, to_device
from captum_sam.core.checkpoints import checkpoints_load_func, model_device
from captum_sam.core.data import fetch_batch
from captum_sam.optim import SAM
from captum_sam.trajectory import (
    Trajectory,
    TrajectoryRecorder,
    _require_map_style,
    load_trajectory,
)

__all__ = ["TrainResult", "train_sam", "replay_trajectory"]


@dataclass
class TrainResult:
    """What :func:`train_sam` returns."""

    model: nn.Module
    epoch_losses: list[float]
    record_dir: str | None


def _sam_step(
    model: nn.Module,
    optimizer: SAM,
    loss_fn: Callable[[Any, Any], Tensor],
    batch: tuple[Any, ...],
    weights: Tensor | None = None,
) -> float:
    """One SAM step on ``sum_i w_i l_i / |B|`` (weights default to one)."""
    size = batch[-1].shape[0]

    def closure() -> Tensor:
        optimizer.zero_grad()
        losses = loss_fn(model(*batch[:-1]), batch[-1])
        if weights is not None:
            losses = losses * weights
        loss = losses.sum() / size
        loss.backward()
        return loss

    return float(optimizer.step(closure).detach())


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

    Args:
        model: Model to train (its parameters are updated).
        dataset: Map-style dataset of ``(features..., label)`` tuples.
        loss_fn: Per-example loss (``reduction="none"``).
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
    """
    from tqdm.auto import tqdm

    _require_map_style(dataset)
    check_per_example_loss(loss_fn)
    for name, value in (("epochs", epochs), ("batch_size", batch_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"`{name}` must be a positive int, got {value!r}")
    if not lr > 0:
        raise ValueError(f"`lr` must be > 0, got {lr}")
    if weight_decay < 0:
        raise ValueError(f"`weight_decay` must be >= 0, got {weight_decay}")
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
        )
    generator = torch.Generator().manual_seed(seed)
    was_training = model.training
    epoch_losses: list[float] = []
    with torch.random.fork_rng(devices=[] if device.type == "cpu" else [device]):
        torch.manual_seed(seed)
        model.train()
        if recorder is not None:
            recorder.start()
        bar = tqdm(range(epochs), desc="SAM training", disable=not show_progress)
        for epoch in bar:
            order = torch.randperm(n, generator=generator)
            total = 0.0
            for idx in order.split(batch_size):
                batch = to_device(fetch_batch(dataset, idx), device)
                total += _sam_step(model, optimizer, loss_fn, batch) * len(idx)
                if recorder is not None:
                    recorder.record_step(idx, epoch=epoch)
            if recorder is not None and save_every is None:
                recorder.save_checkpoint(epoch=epoch)
            if scheduler is not None:
                scheduler.step()
            epoch_losses.append(total / n)
            bar.set_postfix(loss=f"{epoch_losses[-1]:.4f}")
    model.train(was_training)
    directory = recorder.finish() if recorder is not None else None
    return TrainResult(model=model, epoch_losses=epoch_losses, record_dir=directory)


def replay_trajectory(
    model: nn.Module,
    dataset: Dataset,
    loss_fn: Callable[[Any, Any], Tensor],
    record_dir: str | os.PathLike[str] | Trajectory,
    remove: Sequence[int] | Tensor | None = None,
    show_progress: bool = False,
) -> nn.Module:
    """Re-run a recorded SAM schedule, optionally without some examples.

    Starts from the recorded initial weights, rebuilds the base optimizer with its
    recorded hyperparameters and replays every step with its recorded batch and
    learning rate. Removed examples get weight 0 while the batch keeps its
    :math:`1/|B_t|` normalisation (MATH.md's leave-out convention), both in the
    SAM perturbation and in the update. The user's model is not modified.

    Args:
        model: A model with the recorded architecture (used as a template).
        dataset: The training set the trajectory indexes into.
        loss_fn: Per-example loss.
        record_dir: Record directory or a loaded :class:`Trajectory`.
        remove: Training indices to leave out (``None``: exact replay).
        show_progress: Progress bar over steps.

    Returns:
        A new model with the replayed final weights.
    """
    from tqdm.auto import tqdm

    check_per_example_loss(loss_fn)
    traj = record_dir if isinstance(record_dir, Trajectory) else load_trajectory(record_dir)
    if len(dataset) != traj.n_train:
        raise ValueError(
            f"`dataset` has {len(dataset)} examples but the trajectory was recorded on "
            f"{traj.n_train}"
        )
    base_name = traj.optimizer.get("base", "")
    if base_name != "torch.optim.sgd.SGD":
        raise ValueError(f"replay supports SGD base optimizers, the record used {base_name!r}")
    hyper = dict(traj.optimizer.get("hyperparameters", {}))
    hyper.pop("rho", None)
    hyper.pop("adaptive", None)
    allowed = {"lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize"}
    hyper = {k: v for k, v in hyper.items() if k in allowed}
    removed = torch.zeros(traj.n_train, dtype=torch.bool)
    if remove is not None:
        idx = torch.as_tensor(remove, dtype=torch.long)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= traj.n_train):
            raise ValueError(f"`remove` indices must lie in [0, {traj.n_train})")
        removed[idx] = True
    replica = copy.deepcopy(model)
    device = model_device(replica)
    dtype = next(replica.parameters()).dtype
    checkpoints_load_func(replica, traj.initial.path)
    first = traj.steps[0] if traj.steps else None
    optimizer = SAM(
        replica.parameters(),
        torch.optim.SGD,
        rho=first.rho if first else 0.0,
        adaptive=first.adaptive if first else False,
        **hyper,
    )
    seed = traj.seed if traj.seed is not None else 0
    with torch.random.fork_rng(devices=[] if device.type == "cpu" else [device]):
        torch.manual_seed(seed)
        replica.train()
        for step in tqdm(traj.steps, desc="replaying SAM steps", disable=not show_progress):
            for group in optimizer.param_groups:
                group["lr"], group["rho"], group["adaptive"] = step.lr, step.rho, step.adaptive
            idx = torch.tensor(step.indices)
            batch = to_device(fetch_batch(dataset, idx), device)
            weights = None
            if remove is not None:
                weights = (~removed[idx]).to(device=device, dtype=dtype)
            _sam_step(replica, optimizer, loss_fn, batch, weights)
    replica.train(model.training)
    return replica
