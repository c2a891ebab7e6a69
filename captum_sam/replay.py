r"""Retraining a recorded SAM run without some training examples.

Two ways, both starting from the recorded initial weights with the recorded optimizer
settings (SGD learning rates, momentum, weight decay, ``rho``, ``adaptive``):

* :func:`replay_trajectory` re-runs the recorded steps with their batches. With
  ``renormalise=True`` (the default: "trained without") each batch is the mean over
  its *kept* examples, :math:`\frac{1}{|B_t \setminus S|}\sum_{i \in B_t \setminus S} l_i`,
  and a batch left empty is skipped (no step, no momentum update); with
  ``renormalise=False`` the removed examples get weight 0 and the batch is still divided
  by :math:`|B_t|` (what first-order trajectory estimators such as SAM-GIF differentiate).
* :func:`retrain_fresh` trains on the kept examples with a new seeded permutation per
  epoch: the same epochs, batch size and per-epoch learning rate, ``rho`` and
  ``adaptive`` as recorded, other batches.

Both check every step as :func:`~captum_sam.train_sam` does
(:func:`~captum_sam.training.sam_step`) and never modify the template model.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from captum_sam.core import check_per_example_loss, to_device
from captum_sam.core.checkpoints import checkpoints_load_func, model_device
from captum_sam.core.data import check_indices, fetch_batch
from captum_sam.core.params import training_mode
from captum_sam.optim import SAM
from captum_sam.training import sam_step
from captum_sam.trajectory import StepRecord, Trajectory, load_trajectory

__all__ = ["replay_trajectory", "retrain_fresh"]

_SGD_SETTINGS = {"lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize"}


def _load(dataset: Dataset, record_dir: str | os.PathLike[str] | Trajectory) -> Trajectory:
    traj = record_dir if isinstance(record_dir, Trajectory) else load_trajectory(record_dir)
    traj.check_data(dataset, "dataset")
    base_name = traj.optimizer.get("base", "")
    if base_name != "torch.optim.sgd.SGD":
        raise ValueError(f"replay supports SGD base optimizers, the record used {base_name!r}")
    return traj


def _removed_mask(traj: Trajectory, remove: Sequence[int] | Tensor | None) -> Tensor:
    removed = torch.zeros(traj.n_train, dtype=torch.bool)
    if remove is not None:
        removed[check_indices(remove, traj.n_train, "remove", allow_empty=True)] = True
    return removed


def _start(model: nn.Module, traj: Trajectory) -> tuple[nn.Module, SAM]:
    """A copy of ``model`` at the recorded initial weights and its SAM-SGD optimizer."""
    hyper = dict(traj.optimizer.get("hyperparameters", {}))
    hyper = {k: v for k, v in hyper.items() if k in _SGD_SETTINGS}
    replica = copy.deepcopy(model)
    checkpoints_load_func(replica, traj.initial.path)
    first = traj.steps[0] if traj.steps else None
    optimizer = SAM(
        replica.parameters(),
        torch.optim.SGD,
        rho=first.rho if first else 0.0,
        adaptive=first.adaptive if first else False,
        **hyper,
    )
    return replica, optimizer


def _set_step(optimizer: SAM, step: StepRecord) -> None:
    for group in optimizer.param_groups:
        group["lr"], group["rho"], group["adaptive"] = step.lr, step.rho, step.adaptive


def replay_trajectory(
    model: nn.Module,
    dataset: Dataset,
    loss_fn: Callable[[Any, Any], Tensor],
    record_dir: str | os.PathLike[str] | Trajectory,
    remove: Sequence[int] | Tensor | None = None,
    show_progress: bool = False,
    renormalise: bool = True,
) -> nn.Module:
    r"""Re-run a recorded SAM schedule, optionally without some examples.

    Starts from the recorded initial weights, rebuilds the base optimizer with its
    recorded hyperparameters and replays every step with its recorded batch and
    learning rate. The removed examples are left out of the batch:

    * ``renormalise=True`` (default, "trained without"): the step's loss is the mean over
      the batch's kept examples, :math:`\frac{1}{|B_t \setminus S|}\sum_{i \in B_t
      \setminus S} l_i`, in the SAM perturbation and in the update; a batch whose
      examples are all removed is skipped (no step, no momentum update).
    * ``renormalise=False`` (zero weight): the removed examples get weight 0 and the
      batch keeps its :math:`1/|B_t|` normalisation, so every step is taken (what
      SAM-GIF and TracIn approximate to first order).

    With nothing removed both are the exact replay. The user's model is not modified.
    Steps are checked as in :func:`~captum_sam.train_sam`, and the copy trains under the
    same :func:`~captum_sam.core.params.training_mode` rule with the template's
    train/eval flags; the returned model has the template's flags.

    Args:
        model: A model with the recorded architecture (used as a template).
        dataset: The training set the trajectory indexes into.
        loss_fn: Per-example loss, shape ``(B,)`` or ``(B, ...)``.
        record_dir: Record directory or a loaded :class:`~captum_sam.Trajectory`.
        remove: Training indices to leave out (``None``: exact replay).
        show_progress: Progress bar over steps.
        renormalise: Mean over the kept examples (``True``) or weight 0 with the full
            batch size (``False``).

    Returns:
        A new model with the replayed final weights.

    Raises:
        ValueError: The trajectory does not fit ``dataset`` or ``remove``;
            ``loss_fn`` does not return one loss per example; a loss, gradient or
            update is NaN or infinite (the message names the step).
    """
    from tqdm.auto import tqdm

    check_per_example_loss(loss_fn)
    traj = _load(dataset, record_dir)
    removed = _removed_mask(traj, remove)
    replica, optimizer = _start(model, traj)
    device = model_device(replica)
    dtype = next(replica.parameters()).dtype
    seed = traj.seed if traj.seed is not None else 0
    steps = tqdm(traj.steps, desc="replaying SAM steps", disable=not show_progress)
    with (
        torch.random.fork_rng(devices=[] if device.type == "cpu" else [device]),
        training_mode(replica),
    ):
        torch.manual_seed(seed)
        for t, step in enumerate(steps):
            idx = torch.tensor(step.indices, dtype=torch.long)
            weights = None
            if remove is not None and renormalise:
                idx = idx[~removed[idx]]
                if idx.numel() == 0:
                    continue  # an empty batch: no step at all
            elif remove is not None:
                weights = (~removed[idx]).to(device=device, dtype=dtype)
            _set_step(optimizer, step)
            batch = to_device(fetch_batch(dataset, idx), device)
            where = f"replay_trajectory step {t} (epoch {step.epoch}) of {traj.directory!r}"
            sam_step(replica, optimizer, loss_fn, batch, weights, where)
    return replica


def retrain_fresh(
    model: nn.Module,
    dataset: Dataset,
    loss_fn: Callable[[Any, Any], Tensor],
    record_dir: str | os.PathLike[str] | Trajectory,
    remove: Sequence[int] | Tensor | None = None,
    seed: int = 0,
    show_progress: bool = False,
) -> nn.Module:
    r"""Retrain from the recorded initial weights on the kept examples, new batches.

    Like :func:`~captum_sam.train_sam` on the kept examples: per epoch a permutation of
    them from a generator seeded with ``seed``, split into batches of the recorded batch
    size (the largest recorded batch; the last one may be smaller), each step the mean
    loss over its batch. The number of epochs, the optimizer settings and, per epoch, the
    learning rate, ``rho`` and ``adaptive`` are the recorded ones (step ``j`` of epoch
    ``e`` takes those of recorded step ``min(j, last)`` of that epoch). Removing nothing
    with ``seed`` the recorded run's seed reproduces that run. The model's own randomness
    (dropout) is seeded with ``seed`` too. The user's model is not modified.

    Args:
        model: A model with the recorded architecture (used as a template).
        dataset: The training set the trajectory indexes into.
        loss_fn: Per-example loss, shape ``(B,)`` or ``(B, ...)``.
        record_dir: Record directory or a loaded :class:`~captum_sam.Trajectory`.
        remove: Training indices to leave out (``None``: none).
        seed: Seed of the batch order.
        show_progress: Progress bar over epochs.

    Returns:
        A new model with the retrained weights.

    Raises:
        ValueError: The trajectory does not fit ``dataset`` or ``remove``, or removes
            every example; a step's check failed (the message names it).
    """
    from tqdm.auto import tqdm

    check_per_example_loss(loss_fn)
    traj = _load(dataset, record_dir)
    kept = torch.nonzero(~_removed_mask(traj, remove)).flatten()
    if kept.numel() == 0:
        raise ValueError("`remove` leaves no training example to retrain on")
    epochs: dict[int, list[StepRecord]] = {}
    for step in traj.steps:
        epochs.setdefault(step.epoch, []).append(step)
    batch_size = max((len(s.indices) for s in traj.steps), default=1)
    replica, optimizer = _start(model, traj)
    device = model_device(replica)
    generator = torch.Generator().manual_seed(int(seed))
    t = 0
    with (
        torch.random.fork_rng(devices=[] if device.type == "cpu" else [device]),
        training_mode(replica),
    ):
        torch.manual_seed(int(seed))
        for epoch in tqdm(sorted(epochs), desc="fresh retraining", disable=not show_progress):
            recorded = epochs[epoch]
            order = kept[torch.randperm(kept.numel(), generator=generator)]
            for j, idx in enumerate(order.split(batch_size)):
                _set_step(optimizer, recorded[min(j, len(recorded) - 1)])
                batch = to_device(fetch_batch(dataset, idx), device)
                where = f"retrain_fresh epoch {epoch}, step {t} (seed {seed})"
                sam_step(replica, optimizer, loss_fn, batch, None, where)
                t += 1
    return replica
