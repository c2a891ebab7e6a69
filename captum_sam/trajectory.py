r"""Recording and loading a SAM training trajectory.

A *record directory* holds model checkpoints (``torch.save`` files) and a JSON
manifest ``manifest.json``, written atomically (temporary file, then rename), with
for every training step ``t``: the learning rate :math:`\eta_t`, ``rho``,
``adaptive`` and the training-set indices of the batch :math:`B_t`. Checkpoints are
the initial weights, one every ``save_every`` steps (or at every epoch end) and the
final weights.

Batch indices need a dataset that can say which examples are in a batch:
:func:`train_sam` draws its batches itself from a seeded permutation; in a custom
loop wrap the dataset in :class:`IndexedDataset`, which prepends each example's
index, and pass the indices to :meth:`TrajectoryRecorder.record_step`.

Checkpoints are untrusted input: they are always read with
``torch.load(..., weights_only=True)`` (no pickled code runs) and a manifest may only
name files inside its own directory.

Training and replaying (:func:`~captum_sam.train_sam`,
:func:`~captum_sam.replay_trajectory`) live in :mod:`captum_sam.training`, which
uses this module (never the reverse).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from captum_sam.core.checkpoints import atomic_write
from captum_sam.optim import SAM

__all__ = [
    "IndexedDataset",
    "TrajectoryRecorder",
    "Trajectory",
    "StepRecord",
    "CheckpointRecord",
    "load_trajectory",
]

MANIFEST = "manifest.json"
FORMAT = "captum_sam.trajectory"
VERSION = 1


class IndexedDataset(Dataset):
    """Wrap a map-style dataset so every example carries its index.

    ``IndexedDataset(ds)[i]`` is ``(i, *ds[i])``: in a loop write
    ``for idx, *batch in loader`` and give ``idx`` to
    :meth:`TrajectoryRecorder.record_step`; ``batch`` keeps Captum's layout
    (features..., label).

    Args:
        dataset: A map-style dataset with ``__len__`` and ``__getitem__`` returning a
            tuple (features..., label).
    """

    def __init__(self, dataset: Dataset) -> None:
        _require_map_style(dataset)
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Any, ...]:
        item = self.dataset[index]
        if not isinstance(item, (tuple, list)):
            item = (item,)
        return (index, *item)


def _require_map_style(dataset: Any) -> None:
    if not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")):
        raise TypeError(
            "`dataset` must be a map-style Dataset with __len__ and __getitem__ so "
            "that the examples of each batch can be recorded by index; got "
            f"{type(dataset).__name__}"
        )
    if len(dataset) == 0:
        raise ValueError("`dataset` is empty")


# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class StepRecord:
    """One optimizer step: learning rate, SAM radius and batch membership."""

    lr: float
    rho: float
    adaptive: bool
    indices: tuple[int, ...]
    epoch: int


@dataclass(frozen=True)
class CheckpointRecord:
    """A saved checkpoint of the weights after ``step`` updates."""

    path: str
    step: int
    learning_rate: float
    epoch: int | None = None


@dataclass
class Trajectory:
    """A loaded record directory (see :func:`load_trajectory`)."""

    directory: str
    n_train: int
    steps: list[StepRecord]
    initial: CheckpointRecord
    checkpoints: list[CheckpointRecord]
    optimizer: dict[str, Any]
    complete: bool
    seed: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def final(self) -> CheckpointRecord:
        """The checkpoint of the final weights :math:`w_T`."""
        return self.checkpoints[-1] if self.checkpoints else self.initial

    @property
    def weight_decay(self) -> float:
        """Weight decay of the base optimizer (0 when it had none)."""
        return float(self.optimizer.get("hyperparameters", {}).get("weight_decay", 0.0))

    def segments(self) -> list[tuple[CheckpointRecord, list[int]]]:
        """Group steps by the latest checkpoint saved at or before them.

        Returns:
            ``[(checkpoint, [step, ...]), ...]`` in order; steps between two
            checkpoints use the earlier one (the TracIn-CP approximation).
        """
        saved = sorted(
            {c.step: c for c in [self.initial, *self.checkpoints]}.values(), key=lambda c: c.step
        )
        groups: list[tuple[CheckpointRecord, list[int]]] = []
        j = 0
        for t in range(len(self.steps)):
            while j + 1 < len(saved) and saved[j + 1].step <= t:
                j += 1
            if not groups or groups[-1][0] is not saved[j]:
                groups.append((saved[j], []))
            groups[-1][1].append(t)
        return groups


class TrajectoryRecorder:
    """Record a SAM run into a directory: checkpoints plus a JSON manifest.

    Call :meth:`start` before the first step, :meth:`record_step` right after every
    ``optimizer.second_step()`` / ``optimizer.step()`` (and before a learning-rate
    scheduler's ``step``), optionally :meth:`save_checkpoint` at epoch ends, and
    :meth:`finish` at the end.

    Args:
        record_dir: Directory to write (created; must not hold a manifest unless
            ``overwrite``).
        model: The model being trained.
        optimizer: The :class:`~captum_sam.optim.SAM` optimizer.
        n_train: Number of examples in the training set (indices are checked
            against it).
        save_every: Save a checkpoint every this many steps (``None``: only when
            :meth:`save_checkpoint` is called, e.g. at epoch ends).
        seed: Recorded in the manifest for reproducibility.
        overwrite: Allow writing into a directory that already has a manifest.
    """

    def __init__(
        self,
        record_dir: str | os.PathLike[str],
        model: nn.Module,
        optimizer: SAM,
        n_train: int,
        save_every: int | None = None,
        seed: int | None = None,
        overwrite: bool = False,
    ) -> None:
        if not isinstance(optimizer, SAM):
            raise TypeError("`optimizer` must be a captum_sam.SAM optimizer")
        if save_every is not None and (not isinstance(save_every, int) or save_every < 1):
            raise ValueError(f"`save_every` must be a positive int or None, got {save_every}")
        if not isinstance(n_train, int) or n_train < 1:
            raise ValueError(f"`n_train` must be a positive int, got {n_train}")
        self.directory = os.fspath(record_dir)
        os.makedirs(self.directory, exist_ok=True)
        if os.path.exists(os.path.join(self.directory, MANIFEST)) and not overwrite:
            raise FileExistsError(
                f"`record_dir` {self.directory!r} already holds a trajectory; pass "
                "overwrite=True or choose another directory"
            )
        self.model = model
        self.optimizer = optimizer
        self.n_train = n_train
        self.save_every = save_every
        self.seed = seed
        self.steps: list[dict[str, Any]] = []
        self.checkpoints: list[dict[str, Any]] = []
        self.initial: dict[str, Any] | None = None
        self.epoch = 0

    def _group_settings(self) -> tuple[float, float, bool]:
        groups = self.optimizer.param_groups
        first = groups[0]
        for g in groups[1:]:
            if (g["lr"], g["rho"], g["adaptive"]) != (first["lr"], first["rho"], first["adaptive"]):
                raise ValueError(
                    "all parameter groups must share lr, rho and adaptive for the "
                    "trajectory to define one eta_t and one perturbation per step"
                )
        return float(first["lr"]), float(first["rho"]), bool(first["adaptive"])

    def start(self) -> None:
        """Save the initial weights :math:`w_0`."""
        lr, _, _ = self._group_settings()
        self.initial = self._save("initial.pt", step=0, lr=lr, epoch=None)
        self._write_manifest(complete=False)

    def record_step(self, indices: Sequence[int] | Tensor, epoch: int | None = None) -> None:
        """Record the step just taken on the batch ``indices``.

        Args:
            indices: Training-set indices of the examples in the batch.
            epoch: Epoch number (defaults to the last one seen).

        Raises:
            ValueError: If the indices are missing, not integers, or out of range.
        """
        if self.initial is None:
            raise RuntimeError("call TrajectoryRecorder.start() before the first step")
        idx = _check_indices(indices, self.n_train)
        if epoch is not None:
            self.epoch = int(epoch)
        lr, rho, adaptive = self._group_settings()
        self.steps.append(
            {"lr": lr, "rho": rho, "adaptive": adaptive, "indices": idx, "epoch": self.epoch}
        )
        if self.save_every is not None and len(self.steps) % self.save_every == 0:
            self.save_checkpoint()

    def save_checkpoint(self, epoch: int | None = None) -> None:
        """Save the current weights (after ``len(steps)`` updates)."""
        step = len(self.steps)
        if any(c["step"] == step for c in self.checkpoints):
            return
        lr, _, _ = self._group_settings()
        record = self._save(
            f"step_{step:08d}.pt", step=step, lr=lr, epoch=self.epoch if epoch is None else epoch
        )
        self.checkpoints.append(record)
        self._write_manifest(complete=False)

    def finish(self) -> str:
        """Save the final weights and mark the manifest complete.

        Returns:
            The record directory.
        """
        self.save_checkpoint()
        self._write_manifest(complete=True)
        return self.directory

    def _save(self, name: str, step: int, lr: float, epoch: int | None) -> dict[str, Any]:
        state = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
        payload = {"model_state": state, "learning_rate": lr, "step": step}
        atomic_write(os.path.join(self.directory, name), lambda f: torch.save(payload, f))
        return {"file": name, "step": step, "learning_rate": lr, "epoch": epoch}

    def _write_manifest(self, complete: bool) -> None:
        base = self.optimizer.base_optimizer
        hyper = {
            k: v
            for k, v in base.defaults.items()
            if isinstance(v, (int, float, bool, str)) or v is None
        }
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "complete": complete,
            "n_train": self.n_train,
            "seed": self.seed,
            "optimizer": {
                "base": type(base).__module__ + "." + type(base).__qualname__,
                "hyperparameters": hyper,
            },
            "loss": "sum of per-example losses over the batch divided by the batch size",
            "initial": self.initial,
            "checkpoints": self.checkpoints,
            "steps": self.steps,
        }
        atomic_write(
            os.path.join(self.directory, MANIFEST),
            lambda f: f.write(json.dumps(manifest).encode()),
        )


def _check_indices(indices: Any, n_train: int) -> list[int]:
    if indices is None:
        raise ValueError(
            "`indices` is None: the dataset cannot report which examples are in the "
            "batch; wrap it in captum_sam.IndexedDataset"
        )
    idx = torch.as_tensor(indices)
    if idx.dtype.is_floating_point or idx.dtype == torch.bool or idx.dim() != 1:
        raise ValueError(
            f"`indices` must be a 1-D integer sequence, got {idx.dtype} {tuple(idx.shape)}"
        )
    if idx.numel() == 0:
        raise ValueError("`indices` is empty: a step needs at least one example")
    if int(idx.min()) < 0 or int(idx.max()) >= n_train:
        raise ValueError(
            f"`indices` must lie in [0, {n_train}), got {int(idx.min())}..{int(idx.max())}"
        )
    return [int(i) for i in idx]


# --------------------------------------------------------------------------- loading


def _safe_path(directory: str, name: Any, what: str) -> str:
    if not isinstance(name, str) or not name:
        raise ValueError(f"manifest field {what} must be a file name, got {name!r}")
    root = os.path.realpath(directory)
    full = os.path.realpath(os.path.join(root, name))
    if os.path.isabs(name) or os.path.commonpath([root, full]) != root or full == root:
        raise ValueError(
            f"manifest field {what} names {name!r}, outside the record directory "
            f"{directory!r}: refused"
        )
    if not os.path.isfile(full):
        raise FileNotFoundError(f"manifest field {what}: checkpoint file {full!r} is missing")
    return full


def load_trajectory(record_dir: str | os.PathLike[str]) -> Trajectory:
    """Load and validate a record directory written by :class:`TrajectoryRecorder`.

    Raises:
        FileNotFoundError: No manifest, or a checkpoint it names is missing.
        ValueError: A field is missing or malformed, or a file lies outside the
            directory.
    """
    directory = os.fspath(record_dir)
    path = os.path.join(directory, MANIFEST)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"`record_dir` {directory!r} has no {MANIFEST}")
    with open(path, encoding="utf-8") as f:
        try:
            raw = json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path!r} is not valid JSON: {err}") from err
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise ValueError(f"{path!r} is not a captum_sam trajectory manifest")
    for key in ("n_train", "initial", "checkpoints", "steps", "optimizer", "complete"):
        if key not in raw:
            raise ValueError(f"manifest {path!r} lacks the field {key!r}")

    def ckpt(entry: Any, what: str) -> CheckpointRecord:
        if not isinstance(entry, dict):
            raise ValueError(f"manifest field {what} must be an object")
        for key in ("file", "step", "learning_rate"):
            if key not in entry:
                raise ValueError(f"manifest field {what} lacks {key!r}")
        return CheckpointRecord(
            path=_safe_path(directory, entry["file"], what + ".file"),
            step=int(entry["step"]),
            learning_rate=float(entry["learning_rate"]),
            epoch=entry.get("epoch"),
        )

    n_train = int(raw["n_train"])
    steps = []
    for t, s in enumerate(raw["steps"]):
        for key in ("lr", "rho", "adaptive", "indices"):
            if key not in s:
                raise ValueError(f"manifest step {t} lacks the field {key!r}")
        steps.append(
            StepRecord(
                lr=float(s["lr"]),
                rho=float(s["rho"]),
                adaptive=bool(s["adaptive"]),
                indices=tuple(_check_indices(s["indices"], n_train)),
                epoch=int(s.get("epoch", 0)),
            )
        )
    return Trajectory(
        directory=directory,
        n_train=n_train,
        steps=steps,
        initial=ckpt(raw["initial"], "initial"),
        checkpoints=[ckpt(c, f"checkpoints[{i}]") for i, c in enumerate(raw["checkpoints"])],
        optimizer=dict(raw["optimizer"]),
        complete=bool(raw["complete"]),
        seed=raw.get("seed"),
    )
