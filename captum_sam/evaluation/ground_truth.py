r"""Ground-truth retraining runs with a verified on-disk cache, for LOO, LDS and editing.

Cache layout (``cache_dir``)::

    <mode>-<key>/            one directory per key: the settings, every input, the test set
        manifest.json        {"format", "version", "key", "fields", "rows": {rkey: entry}}
        row-<rkey>.pt        {"losses": (n_test,), "accuracy": (), "seconds": (), "params": (P,)}

The *key* is the SHA-256 of its *fields*: the retraining settings, an identity of the
loss, the starting weights (``"fixed_point"``) or the architecture (``"schedule"``),
the training data, the replayed schedule and the SHA-256 of the checkpoint file the
replay starts from, and the test data; any change of these gives another directory.
Each manifest entry records its row file's SHA-256. A row is served only when the
manifest lists it, its bytes have that hash and it has the expected fields, shapes and
dtypes. What is not trusted is handled as follows (a cache is derived data):

* a row the manifest does not list (written by an older version without a manifest,
  or by an interrupted writer) or a manifest that is not valid JSON: recomputed, with
  a warning naming the file; the flat ``<mode>-<key>-<test>-<removal>.pt`` files of
  older versions in ``cache_dir`` are never read (a warning names one; they are left
  in place);
* a row file that cannot be read (truncated, corrupt) or is missing: recomputed and
  rewritten, with a warning naming the file;
* a row file that reads but whose hash differs from the manifest's (edited after it
  was written), a row with other fields, shapes or dtypes, or a manifest with wrong
  fields: ``ValueError`` naming the file and the field; nothing is changed on disk.

The hashes detect accidental or naive edits, not an adversary who rewrites the
manifest too. Writers of one directory take its :class:`~captum_sam.core.files.DirectoryLock`
(waiting up to :data:`LOCK_TIMEOUT` seconds) to write a row and re-read, update and
atomically replace the manifest, so concurrent writers keep each other's rows (a row
another writer stored first for the same removal is kept, not replaced).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from captum_sam.core import eval_mode
from captum_sam.core.files import (
    DirectoryLock,
    atomic_write,
    finite_number,
    read_json,
    remove_stale_temporaries,
    sha256_bytes,
    sha256_file,
    torch_load,
)
from captum_sam.core.store import data_digest, function_digest
from captum_sam.evaluation.retrain import RETRAIN_MODES, sam_fixed_point
from captum_sam.training import checked_losses, replay_trajectory
from captum_sam.trajectory import Trajectory, load_trajectory

__all__ = ["GroundTruth", "RetrainResults", "random_subsets", "loo_scores", "lds_scores"]

FORMAT = "captum_sam.ground_truth"
VERSION = 2
MANIFEST = "manifest.json"
ROW_FIELDS = ("losses", "accuracy", "seconds", "params")
LOCK_TIMEOUT = 60.0
"""Seconds a writer waits for another writer of the same cache directory."""
_LEGACY_ROW = re.compile(r"(fixed_point|schedule)-[0-9a-f]{20}-[0-9a-f]{12}-[0-9a-f]{16}\.pt")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


@dataclass
class RetrainResults:
    """Test-set results of one retraining per removal.

    Attributes:
        losses: Per-example test losses ``(R, n_test)``.
        accuracies: Test accuracies ``(R,)``.
        seconds: Wall time of each retraining ``(R,)`` (as measured when computed,
            also when read back from the cache).
        params: Flat parameters of each retrained model ``(R, P)``.
    """

    losses: Tensor
    accuracies: Tensor
    seconds: Tensor
    params: Tensor


def random_subsets(n: int, fraction: float, count: int, seed: int = 0) -> Tensor:
    """``count`` random subsets of ``round(fraction * n)`` examples, as masks ``(count, n)``."""
    if not 0 < fraction < 1:
        raise ValueError(f"`fraction` must be in (0, 1), got {fraction}")
    if count < 1:
        raise ValueError(f"`count` must be >= 1, got {count}")
    g = torch.Generator().manual_seed(seed)
    keep = int(round(fraction * n))
    masks = torch.zeros(count, n, dtype=torch.bool)
    for m in range(count):
        masks[m, torch.randperm(n, generator=g)[:keep]] = True
    return masks


# --------------------------------------------------------------------------- key fields


def _digest(h: Any, obj: Any) -> None:
    """Feed ``obj`` (tensors with dtype and shape, dicts, lists, JSON values) to ``h``."""
    if isinstance(obj, Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"tensor {t.dtype} {tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, dict):
        h.update(b"dict")
        for k in sorted(obj, key=str):
            h.update(str(k).encode())
            _digest(h, obj[k])
    elif isinstance(obj, (list, tuple)):
        h.update(f"list {len(obj)}".encode())
        for item in obj:
            _digest(h, item)
    else:
        h.update(_ADDRESS.sub("", json.dumps(obj, sort_keys=True, default=repr)).encode())


def _sha(*objs: Any) -> str:
    h = hashlib.sha256()
    for obj in objs:
        _digest(h, obj)
    return h.hexdigest()


def _loss_identity(loss_fn: Any) -> str:
    """:func:`~captum_sam.core.store.function_digest` and the values a function closes over.

    The qualified name, settings and source hash of the loss, plus what a lambda or
    nested function captured (e.g. a ``label_smoothing``); global variables a plain
    function reads are not part of it.
    """
    cells = [c.cell_contents for c in getattr(loss_fn, "__closure__", None) or ()]
    closure = [function_digest(c) if callable(c) else c for c in cells]
    digest = function_digest(loss_fn)
    return f"{digest[0]}:{_sha(digest, closure)[:24]}"


def _model_identity(model: nn.Module, weights: bool) -> str:
    """Hash of the architecture (``repr``, state names, shapes, dtypes), optionally the values."""
    state = dict(model.state_dict())
    if weights:
        return _sha(repr(model), state)
    return _sha(repr(model), {k: [str(v.dtype), list(v.shape)] for k, v in state.items()})


def _dataset_identity(dataset: Dataset) -> dict[str, Any]:
    """:func:`~captum_sam.core.store.data_digest`, leaving the global torch RNG as it was."""
    with torch.random.fork_rng(devices=[]):  # its DataLoader draws a seed from the RNG
        torch.manual_seed(0)
        return data_digest(dataset)


def _trajectory_identity(traj: Trajectory) -> str:
    """Hash of the replayed schedule (steps, optimizer, seed), as loaded in memory."""
    steps = [[s.lr, s.rho, s.adaptive, list(s.indices)] for s in traj.steps]
    return _sha(
        {
            "n_train": traj.n_train,
            "seed": traj.seed,
            "optimizer": traj.optimizer,
            "initial_step": traj.initial.step,
            "steps": steps,
        }
    )


# --------------------------------------------------------------------------- cache files


@contextlib.contextmanager
def _writer_lock(directory: str) -> Iterator[None]:
    """Hold ``directory``'s lock, waiting up to :data:`LOCK_TIMEOUT` for another writer."""
    deadline = time.monotonic() + LOCK_TIMEOUT
    while True:
        lock = DirectoryLock(directory, "ground-truth cache")
        try:
            lock.__enter__()
            break
        except ValueError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.05)
    try:
        yield
    finally:
        lock.__exit__(None, None, None)


def _removal_key(removed: list[int]) -> str:
    return hashlib.sha256(json.dumps(removed).encode()).hexdigest()


def _row_name(rkey: str) -> str:
    return f"row-{rkey[:32]}.pt"


@dataclass
class _CacheDirectory:
    """The rows of one key: read verified, written under the directory's lock.

    Args:
        directory: ``cache_dir/<mode>-<key>``.
        key: The full key (SHA-256 of ``fields``).
        fields: What the rows depend on (JSON values).
        shapes: Expected shape and dtype of each row field (dtype ``None``: any float).
    """

    directory: str
    key: str
    fields: dict[str, Any]
    shapes: dict[str, tuple[tuple[int, ...], torch.dtype | None]]
    rows: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.manifest = os.path.join(self.directory, MANIFEST)
        self.unreadable = False  # the manifest was not JSON: its rows are recomputed
        self.rows = self._read_manifest()

    def _read_manifest(self, warn: bool = True) -> dict[str, Any]:
        if not os.path.isfile(self.manifest):
            return {}
        try:
            raw = read_json(self.manifest, "ground-truth cache manifest")
        except ValueError as err:
            if warn:
                warnings.warn(f"{err}: every row of it is recomputed", stacklevel=6)
            self.unreadable = True
            return {}

        def bad(name: str, why: str) -> ValueError:
            return ValueError(
                f"ground-truth cache manifest {self.manifest!r}: field {name!r} {why}; "
                f"delete the directory {self.directory!r} to recompute its rows"
            )

        if not isinstance(raw, dict):
            raise bad("format", f"missing: the manifest holds a {type(raw).__name__}")
        for name, expected in (("format", FORMAT), ("version", VERSION), ("key", self.key)):
            if raw.get(name) != expected:
                raise bad(name, f"is {raw.get(name)!r}, expected {expected!r}")
        fields = raw.get("fields")
        if not isinstance(fields, dict) or fields != self.fields:
            got = fields if isinstance(fields, dict) else {}
            diff = sorted(k for k in {*got, *self.fields} if got.get(k) != self.fields.get(k))
            raise bad(f"fields.{diff[0]}" if diff else "fields", "differs from this run's")
        rows = raw.get("rows")
        if not isinstance(rows, dict):
            raise bad("rows", f"is a {type(rows).__name__}, expected an object")
        for rkey, entry in rows.items():
            ok = isinstance(entry, dict) and entry.get("file") == _row_name(str(rkey))
            if not (ok and _SHA256.fullmatch(str(entry.get("sha256")))):
                raise bad(
                    f"rows.{rkey}",
                    f"is {entry!r}, expected {{'file': {_row_name(str(rkey))!r}, "
                    "'sha256': 64 hex digits}",
                )
        return rows

    def read(self, removed: list[int]) -> dict[str, Tensor] | None:
        """The verified row of ``removed``, or ``None`` to recompute it (see the module)."""
        rkey = _removal_key(removed)
        path = os.path.join(self.directory, _row_name(rkey))
        entry = self.rows.get(rkey)
        if entry is None:
            if os.path.exists(path) and not self.unreadable:
                warnings.warn(
                    f"ground-truth cache file {path!r} is not recorded in the manifest "
                    f"{self.manifest!r} (written by an older version or by an interrupted "
                    "writer): it is not trusted and is recomputed",
                    stacklevel=3,
                )
            return None
        if not os.path.isfile(path):
            warnings.warn(
                f"ground-truth cache file {path!r} is listed in the manifest but missing: "
                "it is recomputed",
                stacklevel=3,
            )
            return None
        digest = sha256_file(path)
        size = sum(torch.Size(shape).numel() for shape, _ in self.shapes.values())
        try:
            row = torch_load(path, "cpu", "ground-truth cache file", 16 * size + (1 << 20))
        except ValueError as err:
            warnings.warn(f"{err}; it is recomputed", stacklevel=3)
            return None
        if digest != entry["sha256"]:  # another writer may have replaced row and entry since
            entry = self._read_manifest(warn=False).get(rkey, entry)
        if digest != entry["sha256"]:
            raise ValueError(
                f"ground-truth cache file {path!r}: 'sha256' is {digest}, the manifest "
                f"{self.manifest!r} records {entry['sha256']}: the file was changed after it "
                "was written; delete it to recompute the row"
            )
        self._check_row(row, path)
        return row

    def _check_row(self, row: Any, path: str) -> None:
        def bad(why: str) -> ValueError:
            return ValueError(f"ground-truth cache file {path!r}: {why}; delete it to recompute")

        if not isinstance(row, dict) or sorted(row) != sorted(ROW_FIELDS):
            got = sorted(row) if isinstance(row, dict) else type(row).__name__
            raise bad(f"fields are {got}, expected {sorted(ROW_FIELDS)}")
        for name, (shape, dtype) in self.shapes.items():
            value = row[name]
            if not isinstance(value, Tensor):
                raise bad(f"'{name}' is a {type(value).__name__}, not a tensor")
            if tuple(value.shape) != shape:
                raise bad(f"'{name}' shape is {tuple(value.shape)}, expected {shape}")
            if not value.is_floating_point() or (dtype is not None and value.dtype != dtype):
                raise bad(f"'{name}' dtype is {value.dtype}, expected {dtype or 'floating'}")
        if not finite_number(float(row["accuracy"])) or float(row["accuracy"]) > 1:
            raise bad(f"'accuracy' is {float(row['accuracy'])}, expected a number in [0, 1]")
        if not finite_number(float(row["seconds"])):
            raise bad(f"'seconds' is {float(row['seconds'])}, expected a finite number >= 0")

    def write(self, removed: list[int], row: dict[str, Tensor]) -> None:
        """Write ``row`` and its manifest entry, under the lock, keeping other writers' rows.

        A valid row another writer stored for the same removal meanwhile is kept (same
        inputs, same retraining), so a reader never sees a listed row replaced.
        """
        rkey, buffer = _removal_key(removed), io.BytesIO()
        torch.save(row, buffer)
        data = buffer.getvalue()
        with _writer_lock(self.directory):
            remove_stale_temporaries(self.directory)
            rows = self._read_manifest(warn=False)  # a manifest that is not JSON is replaced
            name = _row_name(rkey)
            path = os.path.join(self.directory, name)
            theirs = rows.get(rkey)
            if (
                theirs is not None
                and os.path.isfile(path)
                and sha256_file(path) == theirs["sha256"]
            ):
                self.rows = rows  # another writer stored this row meanwhile: keep theirs
                return
            atomic_write(path, lambda f: f.write(data))
            rows[rkey] = {"file": name, "sha256": sha256_bytes(data), "removed": len(removed)}
            manifest = {
                "format": FORMAT,
                "version": VERSION,
                "key": self.key,
                "fields": self.fields,
                "rows": rows,
            }
            text = json.dumps(manifest, indent=1, sort_keys=True).encode()
            atomic_write(self.manifest, lambda f: f.write(text))
        self.rows = rows


# --------------------------------------------------------------------------- ground truth


@dataclass
class GroundTruth:
    r"""Real SAM retraining without given examples, evaluated on a test set.

    Args:
        model: ``"fixed_point"``: the full-data fixed point (start of Newton);
            ``"schedule"``: a model with the recorded architecture.
        dataset: The training set.
        loss_fn: Per-example loss, shape ``(B,)`` or ``(B, ...)``.
        mode: ``"fixed_point"`` or ``"schedule"`` (see :mod:`captum_sam.evaluation.retrain`).
        rho: SAM radius (``"fixed_point"``).
        weight_decay: :math:`\lambda` (``"fixed_point"``).
        adaptive: ASAM (``"fixed_point"``).
        trajectory: Record directory to replay (``"schedule"``).
        tol: Fixed-point residual target.
        cache_dir: Directory where each retraining's results are stored, keyed by a
            hash of everything that determines them and verified on reading (see the
            module's docstring); ``None`` disables caching.
    """

    model: nn.Module
    dataset: Dataset
    loss_fn: Callable[[Any, Any], Tensor]
    mode: str
    rho: float = 0.0
    weight_decay: float = 0.0
    adaptive: bool = False
    trajectory: str | Trajectory | None = None
    tol: float = 1e-10
    cache_dir: str | None = None
    _inputs: dict[str, Any] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.mode not in RETRAIN_MODES:
            raise ValueError(f"`mode` must be one of {RETRAIN_MODES}, got {self.mode!r}")
        if self.mode == "schedule":
            if self.trajectory is None:
                raise ValueError("mode 'schedule' needs the `trajectory` to replay")
            if not isinstance(self.trajectory, Trajectory):
                self.trajectory = load_trajectory(self.trajectory)
        # the slow parts of the key, once; the weights and files are hashed per evaluate()
        self._inputs = {
            "dataset": _dataset_identity(self.dataset),
            "trajectory": _trajectory_identity(self.trajectory)  # type: ignore[arg-type]
            if self.mode == "schedule"
            else None,
        }

    def retrain(self, removed: Sequence[int]) -> nn.Module:
        """A new model retrained without ``removed``."""
        if self.mode == "fixed_point":
            return sam_fixed_point(
                self.model,
                self.dataset,
                self.loss_fn,
                self.rho,
                self.weight_decay,
                self.adaptive,
                remove=list(removed),
                tol=self.tol,
            ).model
        return replay_trajectory(
            self.model,
            self.dataset,
            self.loss_fn,
            self.trajectory,  # type: ignore[arg-type]
            remove=list(removed),
        )

    def cache_fields(self, test_data: tuple[Tensor, ...]) -> dict[str, Any]:
        """What the cached results depend on (their key is the SHA-256 of this dict).

        The settings, the loss's identity, the starting weights (``"fixed_point"``) or
        the architecture (``"schedule"``: the replay loads the initial checkpoint), the
        training data, the replayed schedule and the SHA-256 of the initial checkpoint
        file the replay reads, and the test data.
        """
        schedule = self.mode == "schedule"
        traj: Trajectory | None = self.trajectory if schedule else None  # type: ignore[assignment]
        return {
            "mode": self.mode,
            "rho": None if schedule else float(self.rho),
            "weight_decay": None if schedule else float(self.weight_decay),
            "adaptive": None if schedule else bool(self.adaptive),
            "tol": None if schedule else float(self.tol),
            "loss": _loss_identity(self.loss_fn),
            "model": _model_identity(self.model, weights=not schedule),
            **self._inputs,
            "initial_checkpoint_sha256": sha256_file(traj.initial.path) if traj else None,
            "test_data": _sha(list(test_data)),
        }

    def evaluate(
        self,
        removals: Sequence[Sequence[int]],
        test_data: tuple[Tensor, ...],
        show_progress: bool = False,
        desc: str = "retraining",
    ) -> RetrainResults:
        """Retrain once per removal (cached) and evaluate on ``test_data``.

        Args:
            removals: Index lists, one retraining each.
            test_data: ``(features..., labels)`` in memory.
            show_progress: Progress bar.
            desc: Its label.

        Returns:
            Losses ``(R, n_test)``, accuracies, seconds ``(R,)`` and parameters ``(R, P)``.

        Raises:
            ValueError: A cache file was changed after it was written, or does not
                have the expected fields, shapes or dtypes (the message names the
                file and the field); another writer holds the cache directory for more
                than :data:`LOCK_TIMEOUT` seconds. Unreadable or unlisted cache files
                are recomputed with a warning instead.
        """
        from tqdm.auto import tqdm

        test_data = tuple(test_data)
        cache = self._open_cache(test_data) if self.cache_dir is not None else None
        rows = []
        for removed in tqdm(list(removals), desc=desc, disable=not show_progress):
            removed = sorted(int(i) for i in removed)
            row = cache.read(removed) if cache is not None else None
            if row is None:
                start = time.perf_counter()
                model = self.retrain(removed)
                seconds = time.perf_counter() - start
                row = {
                    **self._test(model, test_data),
                    "seconds": torch.tensor(seconds, dtype=torch.float64),
                    "params": torch.cat([p.detach().reshape(-1).cpu() for p in model.parameters()]),
                }
                if cache is not None:
                    cache.write(removed, row)
            rows.append(row)
        return RetrainResults(
            losses=torch.stack([r["losses"] for r in rows]),
            accuracies=torch.stack([r["accuracy"] for r in rows]),
            seconds=torch.stack([r["seconds"] for r in rows]),
            params=torch.stack([r["params"] for r in rows]),
        )

    def _open_cache(self, test_data: tuple[Tensor, ...]) -> _CacheDirectory:
        cache_dir = os.fspath(self.cache_dir)  # type: ignore[arg-type]
        legacy = sorted(
            name
            for name in (os.listdir(cache_dir) if os.path.isdir(cache_dir) else [])
            if _LEGACY_ROW.fullmatch(name) and name.startswith(self.mode + "-")
        )
        if legacy:
            warnings.warn(
                f"`cache_dir` {cache_dir!r} holds {len(legacy)} ground-truth files written by "
                f"an older version without a manifest (e.g. {legacy[0]!r}): they are not "
                "trusted and never served, the rows are recomputed; the old files are left "
                "in place (delete them to silence this warning)",
                stacklevel=3,
            )
        fields = self.cache_fields(test_data)
        key = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()
        params = [p.detach().reshape(-1)[:0].cpu() for p in self.model.parameters()]
        n_params = sum(p.numel() for p in self.model.parameters())
        shapes = {
            "losses": ((int(test_data[-1].shape[0]),), None),
            "accuracy": ((), torch.float64),
            "seconds": ((), torch.float64),
            "params": ((n_params,), torch.cat(params).dtype),
        }
        directory = os.path.join(cache_dir, f"{self.mode}-{key[:24]}")
        return _CacheDirectory(directory, key, fields, shapes)

    def _test(self, model: nn.Module, test_data: tuple[Tensor, ...]) -> dict[str, Tensor]:
        device = next(model.parameters()).device
        batch = tuple(t.to(device) for t in test_data)
        with eval_mode(model), torch.no_grad():
            out = model(*batch[:-1])
            losses = checked_losses(self.loss_fn, out, batch[-1], batch[-1].shape[0])
        return {
            "losses": losses.detach().cpu().clone(),
            "accuracy": (out.argmax(dim=1) == batch[-1]).double().mean().cpu(),
        }


def loo_scores(
    scores: Tensor,
    ground_truth: GroundTruth,
    test_data: tuple[Tensor, ...],
    removed: Sequence[int],
    show_progress: bool = False,
) -> tuple[float, float]:
    """LOO Pearson and Spearman of an estimator against real retraining.

    The prediction for removing :math:`z_k` is the sum of its influence scores over
    the test set (the first-order change of the summed test loss); the truth is the
    change after retraining without it (cached by ``ground_truth``).

    Args:
        scores: Influence scores ``(n_test, n_train)`` on ``test_data``.
        ground_truth: How to retrain.
        test_data: ``(features..., labels)``.
        removed: Training indices, one retraining each.
        show_progress: Progress bar.

    Returns:
        ``(pearson, spearman)``.
    """
    from captum_sam.evaluation.metrics import loo_correlation

    base = ground_truth.evaluate([[]], test_data, False).losses[0].sum()
    res = ground_truth.evaluate(
        [[int(k)] for k in removed], test_data, show_progress, "LOO retraining"
    )
    predicted = scores.sum(dim=0)[list(removed)].detach().cpu()
    return loo_correlation(predicted, res.losses.sum(dim=1) - base)


def lds_scores(
    scores: Tensor,
    ground_truth: GroundTruth,
    test_data: tuple[Tensor, ...],
    fraction: float = 0.5,
    count: int = 20,
    seed: int = 0,
    show_progress: bool = False,
) -> float:
    """Linear datamodeling score of ``scores`` against retraining on random subsets.

    Draws ``count`` subsets of ``fraction`` of the training set, retrains on each
    (results cached on disk by ``ground_truth``, so a second call reuses them) and
    returns :func:`captum_sam.evaluation.metrics.lds`.

    Args:
        scores: Influence scores ``(n_test, n_train)`` on ``test_data``.
        ground_truth: How to retrain.
        test_data: ``(features..., labels)``.
        fraction: Fraction of the training set kept in each subset.
        count: Number of subsets (at least 3).
        seed: Seed of the subsets.
        show_progress: Progress bar.

    Returns:
        The mean LDS over test examples.
    """
    from captum_sam.evaluation.metrics import lds

    masks = random_subsets(scores.shape[1], fraction, count, seed)
    res = ground_truth.evaluate(
        [torch.nonzero(~m).flatten().tolist() for m in masks],
        test_data,
        show_progress,
        "LDS subset retraining",
    )
    return lds(scores.detach().cpu(), masks, res.losses)[0]
