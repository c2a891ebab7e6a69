"""Recording a SAM run: :class:`TrajectoryRecorder` and :class:`IndexedDataset`.

The recorder writes the record-directory format of :mod:`captum_sam.trajectory`:
checkpoints (each with its SHA-256) and ``manifest.json``, rewritten atomically after
every checkpoint and marked ``complete`` by :meth:`TrajectoryRecorder.finish`. Batch
indices need a dataset that can say which examples are in a batch: :func:`train_sam`
draws its batches itself from a seeded permutation; in a custom loop wrap the dataset
in :class:`IndexedDataset`, which prepends each example's index, and pass the indices
to :meth:`TrajectoryRecorder.record_step`.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from captum_sam.core.files import (
    DirectoryLock,
    atomic_write,
    read_json,
    remove_stale_temporaries,
    sha256_file,
)
from captum_sam.optim import SAM
from captum_sam.record_schema import FORMAT, SELF_HASH, manifest_digest
from captum_sam.trajectory import MANIFEST, VERSION

__all__ = ["IndexedDataset", "TrajectoryRecorder"]


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
        dataset: The training set (without :class:`IndexedDataset`): its fingerprint
            by content (:func:`~captum_sam.core.store.data_digest`) is recorded, and
            replays and estimators built on the record refuse other data
            (:meth:`~captum_sam.trajectory.Trajectory.check_data`). ``None``: only
            ``n_train`` is checked.

    Every write (removing an earlier record, a checkpoint, the manifest) holds the
    directory's :class:`~captum_sam.core.files.DirectoryLock`, and the manifest names
    this recorder's run (field ``"run"``, a random id). A second recorder that takes
    over the directory (``overwrite=True``) while this one still records makes this
    one's next write fail with a ``RuntimeError``, instead of two runs mixing their
    checkpoints in one record.
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
        dataset: Any = None,
    ) -> None:
        if not isinstance(optimizer, SAM):
            raise TypeError("`optimizer` must be a captum_sam.SAM optimizer")
        if save_every is not None and (not isinstance(save_every, int) or save_every < 1):
            raise ValueError(f"`save_every` must be a positive int or None, got {save_every}")
        if not isinstance(n_train, int) or n_train < 1:
            raise ValueError(f"`n_train` must be a positive int, got {n_train}")
        self.directory = os.fspath(record_dir)
        self.run = uuid.uuid4().hex
        self._written = False
        os.makedirs(self.directory, exist_ok=True)
        with DirectoryLock(self.directory, "a trajectory record"):
            if os.path.exists(os.path.join(self.directory, MANIFEST)):
                if not overwrite:
                    raise FileExistsError(
                        f"`record_dir` {self.directory!r} already holds a trajectory; pass "
                        "overwrite=True or choose another directory"
                    )
                _remove_recorded_files(self.directory)
        self.model = model
        self.optimizer = optimizer
        self.n_train = n_train
        self.save_every = save_every
        self.seed = seed
        self.data: dict[str, Any] | None = None
        if dataset is not None:
            from captum_sam.core.store import data_digest

            if len(dataset) != n_train:
                raise ValueError(f"`dataset` has {len(dataset)} examples, `n_train` is {n_train}")
            self.data = data_digest(dataset)
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

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """Hold the directory's lock; refuse if another recorder wrote the manifest since."""
        with DirectoryLock(self.directory, "a trajectory record"):
            path = os.path.join(self.directory, MANIFEST)
            try:
                raw = read_json(path, "trajectory manifest")
                owner = raw.get("run") if isinstance(raw, dict) else None
                found = f"run {owner}'s" if isinstance(owner, str) else "another writer's"
            except FileNotFoundError:
                owner, found = None, "gone"
            except ValueError:
                owner, found = None, "unreadable"
            if (owner != self.run) if self._written else (found != "gone"):
                raise RuntimeError(
                    f"`record_dir` {self.directory!r} was taken over: {MANIFEST} is {found}"
                    + (f", not this recorder's run {self.run}" if self._written else "")
                    + ". Another writer uses this directory; this run stops recording "
                    "(give each run its own directory)"
                )
            yield

    def start(self) -> None:
        """Save the initial weights :math:`w_0` (and remove a killed run's temporary files)."""
        with self._writing():
            remove_stale_temporaries(self.directory)
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
        if self.initial is None:
            raise RuntimeError("call TrajectoryRecorder.start() before save_checkpoint()")
        step = len(self.steps)
        if any(c["step"] == step for c in self.checkpoints):
            return
        lr, _, _ = self._group_settings()
        with self._writing():
            record = self._save(
                f"step_{step:08d}.pt",
                step=step,
                lr=lr,
                epoch=self.epoch if epoch is None else epoch,
            )
            self.checkpoints.append(record)
            self._write_manifest(complete=False)

    def finish(self) -> str:
        """Save the final weights and mark the manifest complete.

        Returns:
            The record directory.
        """
        self.save_checkpoint()
        with self._writing():
            self._write_manifest(complete=True)
        return self.directory

    def _save(self, name: str, step: int, lr: float, epoch: int | None) -> dict[str, Any]:
        state = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
        payload = {"model_state": state, "learning_rate": lr, "step": step}
        path = os.path.join(self.directory, name)
        atomic_write(path, lambda f: torch.save(payload, f))
        return {
            "file": name, "step": step, "learning_rate": lr, "epoch": epoch,
            "sha256": sha256_file(path),
        }  # fmt: skip

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
            "run": self.run,
            "optimizer": {
                "base": type(base).__module__ + "." + type(base).__qualname__,
                "hyperparameters": hyper,
            },
            "loss": "sum of per-example losses over the batch divided by the batch size",
            "initial": self.initial,
            "checkpoints": self.checkpoints,
            "steps": self.steps,
        }
        if self.data is not None:
            manifest["data"] = self.data
        manifest[SELF_HASH] = manifest_digest(manifest)
        atomic_write(
            os.path.join(self.directory, MANIFEST),
            lambda f: f.write(json.dumps(manifest).encode()),
        )
        self._written = True


def _remove_recorded_files(directory: str) -> None:
    """Remove the manifest of a previous run and the checkpoint files it names (only those)."""
    path = os.path.join(directory, MANIFEST)
    try:
        raw = read_json(path, "trajectory manifest")
        named = [raw["initial"]["file"], *(c["file"] for c in raw["checkpoints"])]
    except (ValueError, KeyError, TypeError):
        named = []  # unreadable: remove the manifest only, keep every other file
    root = os.path.realpath(directory)
    for name in named:
        full = os.path.realpath(os.path.join(root, str(name)))
        if os.path.dirname(full) == root and os.path.isfile(full):
            os.remove(full)
    os.remove(path)


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
