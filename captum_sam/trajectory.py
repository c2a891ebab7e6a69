r"""The record-directory format of a SAM training trajectory, and loading it.

A *record directory* holds model checkpoints (``torch.save`` files) and a JSON
manifest ``manifest.json``, written atomically (temporary file, then rename), with
for every training step ``t``: the learning rate :math:`\eta_t`, ``rho``,
``adaptive`` and the training-set indices of the batch :math:`B_t`. Checkpoints are
the initial weights, one every ``save_every`` steps (or at every epoch end) and the
final weights.

The directory is written by :class:`~captum_sam.TrajectoryRecorder`
(:mod:`captum_sam.recorder`) and read by :func:`load_trajectory`, which checks every
field (:mod:`captum_sam.record_schema`) and every file.

Checkpoints are untrusted input: they are always read with
``torch.load(..., weights_only=True)`` (no pickled code runs) and a manifest may only
name files inside its own directory.

Training and replaying (:func:`~captum_sam.train_sam`,
:func:`~captum_sam.replay_trajectory`) live in :mod:`captum_sam.training`, which
uses this module (never the reverse).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from typing import Any

from captum_sam.core.errors import user_stacklevel
from captum_sam.core.files import read_json, sha256_file
from captum_sam.record_schema import CURRENT_VERSION, check_manifest

__all__ = [
    "Trajectory",
    "StepRecord",
    "CheckpointRecord",
    "load_trajectory",
    "DEFAULT_RHO",
    "sam_settings",
]

MANIFEST = "manifest.json"
VERSION = CURRENT_VERSION


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
    data: dict[str, Any] | None = None
    """Fingerprint of the training set (:func:`~captum_sam.core.store.data_digest`),
    when the recorder was given it (:func:`~captum_sam.train_sam` always gives it)."""

    def check_data(self, dataset: Any, name: str = "train_dataset") -> None:
        """Refuse ``dataset`` unless it is the recorded training set (when one is recorded).

        Compared by content (:func:`~captum_sam.core.store.data_digest` of the dataset,
        or of a DataLoader's dataset); only the size can be checked for a record
        without a fingerprint.

        Raises:
            ValueError: Naming the manifest, the field and ``name``.
        """
        from torch.utils.data import DataLoader

        from captum_sam.core.store import data_digest

        base = dataset.dataset if isinstance(dataset, DataLoader) else dataset
        path = os.path.join(self.directory, MANIFEST)
        n = len(base)
        if n != self.n_train:
            raise ValueError(
                f"`{name}` has {n} examples but the run recorded in {path!r} trained on "
                f"{self.n_train} (field n_train)"
            )
        if self.data is None:
            return
        digest = data_digest(base)
        for key in ("type", "sha256"):
            if digest[key] != self.data[key]:
                raise ValueError(
                    f"`{name}` is not the training set of the run recorded in {path!r}: its "
                    f"content differs from field data.{key} ({digest[key]!r} against "
                    f"{self.data[key]!r}); pass the same dataset, in the same order"
                )

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


def load_trajectory(
    record_dir: str | os.PathLike[str], allow_incomplete: bool = False, verify: bool = True
) -> Trajectory:
    """Load and validate a record directory written by :class:`TrajectoryRecorder`.

    Every field of the manifest is checked (:mod:`captum_sam.record_schema`), every file
    it names must lie in the directory and, for manifests of version 2, match the
    SHA-256 recorded when it was written.

    Args:
        record_dir: The record directory.
        allow_incomplete: Load a run that did not finish (killed, or still running):
            its recorded prefix, with a warning. By default such a run is refused.
        verify: Check every checkpoint file against its recorded SHA-256.

    Raises:
        FileNotFoundError: No manifest, or a checkpoint it names is missing.
        ValueError: A field is missing, of the wrong type or inconsistent; a file lies
            outside the directory or was changed; the run is incomplete.
    """
    directory = os.fspath(record_dir)
    path = os.path.join(directory, MANIFEST)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"`record_dir` {directory!r} has no {MANIFEST}")
    fields = check_manifest(read_json(path, "trajectory manifest"), path)
    if not fields["complete"]:
        if not allow_incomplete:
            raise ValueError(
                f"trajectory manifest {path!r}: field complete is false: the run was "
                f"interrupted (or is still running) after {len(fields['steps'])} steps; "
                "finish it, or pass allow_incomplete=True to use the recorded prefix"
            )
        warnings.warn(
            f"the trajectory in {directory!r} is incomplete: using its first "
            f"{len(fields['steps'])} recorded steps",
            stacklevel=user_stacklevel(),
        )
    if fields["version"] < CURRENT_VERSION and verify:
        unverified = "its checkpoint files and itself" if fields["version"] < 2 else "itself"
        warnings.warn(
            f"trajectory manifest {path!r} is version {fields['version']}: {unverified} "
            "carry no SHA-256 and cannot be verified",
            stacklevel=user_stacklevel(),
        )

    def ckpt(entry: dict[str, Any], what: str) -> CheckpointRecord:
        full = _safe_path(directory, entry["file"], what + ".file")
        if verify and entry["sha256"] is not None and sha256_file(full) != entry["sha256"]:
            raise ValueError(
                f"trajectory manifest {path!r}: checkpoint {full!r} does not match field "
                f"{what}.sha256: it was changed or replaced after it was recorded"
            )
        return CheckpointRecord(full, entry["step"], entry["learning_rate"], entry["epoch"])

    steps = [StepRecord(**s) for s in fields["steps"]]
    return Trajectory(
        directory=directory,
        n_train=fields["n_train"],
        steps=steps,
        initial=ckpt(fields["initial"], "initial"),
        checkpoints=[ckpt(c, f"checkpoints[{i}]") for i, c in enumerate(fields["checkpoints"])],
        optimizer=dict(fields["optimizer"]),
        complete=fields["complete"],
        seed=fields["seed"],
        data=fields["data"],
    )


# --------------------------------------------------------------------------- settings

DEFAULT_RHO = 0.05
"""The estimators' ``rho`` when neither the caller nor a record directory gives one
(the radius of the SAM paper's and the usual ``SAM`` wrapper's examples)."""


def sam_settings(rho: Any, adaptive: Any, checkpoints: Any) -> tuple[Any, Any]:
    """An estimator's ``(rho, adaptive)``: given, else the record's, else the defaults.

    When ``checkpoints`` is a record directory (a :class:`TrajectoryRecorder` output),
    ``None`` takes the recorded run's radius and ASAM flag, and a given value that
    differs from the recorded one is used with a warning. Otherwise ``None`` is
    :data:`DEFAULT_RHO` and ``adaptive=False``. Values are returned unchecked.

    Raises:
        ValueError: ``None`` for a record whose steps used more than one value (give
            it, or use ``from_trajectory``, which follows the steps).
    """
    steps = _recorded_steps(checkpoints)
    if not steps:
        return (DEFAULT_RHO if rho is None else rho), (False if adaptive is None else adaptive)
    path = os.path.join(os.fspath(checkpoints), MANIFEST)
    out = []
    for name, given in (("rho", rho), ("adaptive", adaptive)):
        values = sorted({getattr(s, name) for s in steps})
        if given is None:
            if len(values) > 1:
                raise ValueError(
                    f"`{name}` is not given and the run recorded in {path!r} used several "
                    f"values {values[:5]}: pass `{name}=` (or use from_trajectory, which "
                    "takes each step's own)"
                )
            given = values[0]
        elif values != [given]:
            warnings.warn(
                f"`{name}`={given!r} differs from the {values[:5]} recorded in {path!r}: "
                "the estimator uses the given value",
                stacklevel=user_stacklevel(),
            )
        out.append(given)
    return out[0], out[1]


def _recorded_steps(checkpoints: Any) -> list[StepRecord]:
    """The steps of a record directory (manifest checked, files not hashed), or ``[]``."""
    if not isinstance(checkpoints, (str, os.PathLike)):
        return []
    path = os.fspath(checkpoints)
    if not (os.path.isdir(path) and os.path.isfile(os.path.join(path, MANIFEST))):
        return []
    return load_trajectory(path, allow_incomplete=False, verify=False).steps
