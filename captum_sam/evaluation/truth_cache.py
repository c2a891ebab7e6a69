r"""The verified on-disk cache of :class:`~captum_sam.evaluation.GroundTruth`.

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
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from captum_sam.core.errors import user_stacklevel
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
from captum_sam.core.store import data_digest, function_digest, without_addresses
from captum_sam.trajectory import Trajectory

__all__ = [
    "CacheDirectory",
    "FORMAT",
    "VERSION",
    "LOCK_TIMEOUT",
    "LEGACY_ROW",
    "sha",
    "loss_identity",
    "model_identity",
    "dataset_identity",
    "trajectory_identity",
]

FORMAT = "captum_sam.ground_truth"
VERSION = 2
MANIFEST = "manifest.json"
ROW_FIELDS = ("losses", "accuracy", "seconds", "params")
LOCK_TIMEOUT = 60.0
"""Seconds a writer waits for another writer of the same cache directory."""
LEGACY_ROW = re.compile(r"(fixed_point|schedule)-[0-9a-f]{20}-[0-9a-f]{12}-[0-9a-f]{16}\.pt")
_SHA256 = re.compile(r"[0-9a-f]{64}")


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
        h.update(without_addresses(json.dumps(obj, sort_keys=True, default=repr)).encode())


def sha(*objs: Any) -> str:
    """SHA-256 of the objects' content (tensors by bytes, containers recursively)."""
    h = hashlib.sha256()
    for obj in objs:
        _digest(h, obj)
    return h.hexdigest()


def loss_identity(loss_fn: Any) -> str:
    """:func:`~captum_sam.core.store.function_digest` and the values a function closes over.

    The qualified name, settings and source hash of the loss, plus what a lambda or
    nested function captured (e.g. a ``label_smoothing``); global variables a plain
    function reads are not part of it.
    """
    cells = [c.cell_contents for c in getattr(loss_fn, "__closure__", None) or ()]
    closure = [function_digest(c) if callable(c) else c for c in cells]
    digest = function_digest(loss_fn)
    return f"{digest[0]}:{sha(digest, closure)[:24]}"


def model_identity(model: nn.Module, weights: bool) -> str:
    """Hash of the architecture (``repr``, state names, shapes, dtypes), optionally the values.

    Also what retraining reads besides the weights: which parameters are trained
    (``requires_grad``) and each sub-module's train/eval flag.
    """
    state = dict(model.state_dict())
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    flags = [m.training for m in model.modules()]
    if weights:
        return sha(repr(model), state, trained, flags)
    shapes = {k: [str(v.dtype), list(v.shape)] for k, v in state.items()}
    return sha(repr(model), shapes, trained, flags)


def dataset_identity(dataset: Dataset) -> dict[str, Any]:
    """:func:`~captum_sam.core.store.data_digest`, leaving the global torch RNG as it was."""
    with torch.random.fork_rng(devices=[]):  # its DataLoader draws a seed from the RNG
        torch.manual_seed(0)
        return data_digest(dataset)


def trajectory_identity(traj: Trajectory) -> str:
    """Hash of the replayed schedule (steps, optimizer, seed), as loaded in memory."""
    steps = [[s.lr, s.rho, s.adaptive, list(s.indices)] for s in traj.steps]
    return sha(
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
class CacheDirectory:
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
                warnings.warn(f"{err}: every row of it is recomputed", stacklevel=user_stacklevel())
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
                    stacklevel=user_stacklevel(),
                )
            return None
        if not os.path.isfile(path):
            warnings.warn(
                f"ground-truth cache file {path!r} is listed in the manifest but missing: "
                "it is recomputed",
                stacklevel=user_stacklevel(),
            )
            return None
        digest = sha256_file(path)
        size = sum(torch.Size(shape).numel() for shape, _ in self.shapes.values())
        try:
            row = torch_load(path, "cpu", "ground-truth cache file", 16 * size + (1 << 20))
        except ValueError as err:
            warnings.warn(f"{err}; it is recomputed", stacklevel=user_stacklevel())
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
