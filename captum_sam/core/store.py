"""On-disk cache of training-side intermediate quantities, verified on every read.

A cache directory holds torch files ``part-<save>-000000.pt``, ... (one per training
batch, each ``{"rows": (batch, D)}``) and ``manifest.json``: the format and version,
the shape and dtype, a *fingerprint* of everything the rows depend on (the estimator
class, the SHA-256 of every checkpoint file, the settings that change the training
side, the loss, the training data by content), and every part's file name, row count
and SHA-256.

What is verified, and when:

* opening (:func:`open_quantities`): the manifest's schema (every field's type and
  value), the fingerprint (a stale cache raises ``ValueError`` naming what differs),
  that the parts' rows add up to the shape, and that the shape has one row per
  training example;
* reading a part: its SHA-256 (a flipped byte, a swapped or replaced part raises
  ``ValueError`` naming the file), the sizes its archive declares, its shape and
  dtype. Parts are read one at a time, so using a cache needs memory for one part.

Saving is atomic and exclusive: a :class:`~captum_sam.core.files.DirectoryLock`
refuses a second writer; parts get a name unique to the save, the manifest is renamed
into place last, and only then are the previous save's parts removed. A save killed
half-way therefore leaves the previous cache (manifest and parts) intact.

Under ``torch.distributed`` every rank writes the parts of its own batches and rank 0
takes the lock and writes the manifest once all parts exist.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import re
import uuid
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, TensorDataset, default_collate

from captum_sam.core.data import dataset_size
from captum_sam.core.distributed import (
    gather_ordered,
    is_distributed,
    on_rank_zero,
    rank_and_world,
    require_same,
)
from captum_sam.core.files import (
    DirectoryLock,
    atomic_write,
    read_json,
    remove_stale_temporaries,
    sha256_file,
    torch_load,
)

__all__ = [
    "projection_setting",
    "CachedQuantities",
    "save_quantities",
    "open_quantities",
    "file_digest",
    "data_digest",
    "function_digest",
    "model_digest",
    "without_addresses",
]

FORMAT = "captum_sam.quantities"
VERSION = 2
MANIFEST = "manifest.json"
_PART = re.compile(r"^part-[0-9a-f]{12}-\d{6}\.pt$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def file_digest(path: str) -> str:
    """SHA-256 of a file's bytes."""
    return sha256_file(path)


def _hash_value(h: Any, value: Any) -> None:
    if isinstance(value, Tensor):
        t = value.detach().cpu().contiguous()
        h.update(f"tensor{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(value, (tuple, list)):
        h.update(f"seq{len(value)}".encode())
        for v in value:
            _hash_value(h, v)
    elif isinstance(value, dict):
        for k in sorted(value, key=str):
            h.update(str(k).encode())
            _hash_value(h, value[k])
    else:
        h.update(repr(value).encode())


def data_digest(dataset: Dataset | DataLoader, batch_size: int = 256) -> dict[str, Any]:
    """Fingerprint of a dataset by content: its type, length and a SHA-256 of its examples.

    A ``TensorDataset`` is hashed from its tensors (unless a DataLoader with its own
    ``collate_fn`` transforms them); any other map-style dataset is streamed through an
    in-order ``DataLoader`` (or the DataLoader given), so the hash covers the examples
    exactly as the estimator sees them, one batch at a time. A list of batches (data
    given in memory) is hashed as it is.
    """
    if isinstance(dataset, (list, tuple)):  # batches given in memory
        h = hashlib.sha256()
        _hash_value(h, list(dataset))
        return {"type": "batches", "n": dataset_size(dataset), "sha256": h.hexdigest()}
    loader = dataset if isinstance(dataset, DataLoader) else None
    base = loader.dataset if loader is not None else dataset
    out: dict[str, Any] = {"type": type(base).__name__, "n": len(base)}  # type: ignore[arg-type]
    h = hashlib.sha256()
    plain = loader is None or loader.collate_fn is default_collate
    if isinstance(base, TensorDataset) and plain:  # the batches are slices of its tensors
        for t in base.tensors:
            _hash_value(h, t)
    else:
        batches = loader if loader is not None else DataLoader(base, batch_size, shuffle=False)
        state = torch.random.get_rng_state()  # opening a DataLoader draws a base seed
        try:
            for batch in batches:
                _hash_value(h, batch)
        finally:
            torch.random.set_rng_state(state)
    out["sha256"] = h.hexdigest()
    return out


_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def without_addresses(text: str) -> str:
    """``text`` without memory addresses (``" at 0x7f..."``), stable across processes."""
    return _ADDRESS.sub("", text)


def model_digest(model: nn.Module) -> str:
    """Fingerprint of an architecture (not its weights, which the checkpoints carry).

    SHA-256 of the model's ``repr`` (memory addresses removed), every parameter's and
    buffer's name, shape, dtype and ``requires_grad``, and the source of the
    ``forward`` of every module class it uses (where Python can find it), so that a
    cache written for another model, or the same layers wired differently, is refused.
    """
    h = hashlib.sha256(without_addresses(repr(model)).encode())
    for name, t in (*model.named_parameters(), *model.named_buffers()):
        h.update(f"|{name} {tuple(t.shape)} {t.dtype} {t.requires_grad}".encode())
    kinds = {f"{k.__module__}.{k.__qualname__}": k for k in map(type, model.modules())}
    for qualname in sorted(kinds):
        try:
            source = inspect.getsource(kinds[qualname].forward)
        except (OSError, TypeError):
            source = "?"
        h.update(f"|{qualname}:{source}".encode())
    return h.hexdigest()


def function_digest(fn: Any) -> list[Any]:
    """Fingerprint of a loss: its qualified name, its configuration and a hash of its source.

    Stable across processes (no memory addresses): a module is described by its class
    and ``repr`` (which holds settings such as ``reduction``), a function by its
    qualified name and the SHA-256 of its source where Python can find it.
    """
    if fn is None:
        return ["none"]
    kind = fn if inspect.isfunction(fn) or inspect.ismethod(fn) else type(fn)
    name = f"{getattr(kind, '__module__', '?')}.{getattr(kind, '__qualname__', repr(kind))}"
    try:
        source = inspect.getsource(kind)
    except (OSError, TypeError):
        source = ""
    config = "" if inspect.isfunction(fn) else re.sub(r" at 0x[0-9a-f]+", "", repr(fn))
    if isinstance(fn, torch.nn.Module):  # settings (reduction, ...) and tensors (weight)
        simple = {
            k: v
            for k, v in vars(fn).items()
            if not k.startswith("_") and k != "training" and isinstance(v, (int, float, str, bool))
        }
        h = hashlib.sha256(json.dumps(simple, sort_keys=True).encode())
        _hash_value(h, dict(fn.state_dict()))
        config += " " + h.hexdigest()
    return [name, config, hashlib.sha256(source.encode()).hexdigest()]


def projection_setting(projector: Any) -> list[Any] | None:
    """The part of a fingerprint that describes a random projection (or its absence)."""
    if projector is None:
        return None
    setting = [projector.dim, projector.kind, projector.seed]
    if type(projector).__name__ == "LayerProjection":  # per-layer Kronecker: other numbers
        setting.append("per-layer")
    return setting


# --------------------------------------------------------------------------- saving


def _save_id() -> str:
    """A save's id, shared by every rank."""
    token = [uuid.uuid4().hex[:12]]
    if is_distributed():
        dist.broadcast_object_list(token, src=0)
    return token[0]


def save_quantities(
    directory: str | os.PathLike[str],
    fingerprint: dict[str, Any],
    parts: Iterable[tuple[int, Tensor]],
) -> str:
    """Write ``(index, rows)`` parts and the manifest atomically; returns the directory.

    Args:
        directory: Created if needed. A previous cache there is replaced only once the
            new one is complete; anything else in the directory is left alone.
        fingerprint: What the rows depend on (JSON-serialisable).
        parts: This rank's parts with their global order index.

    Raises:
        ValueError: Another process is saving into ``directory``, or there is nothing
            to save.
    """
    directory = os.fspath(directory)
    require_same(fingerprint, f"the fingerprint of quantity cache {directory!r}")  # (first)
    rank, _ = rank_and_world()
    os.makedirs(directory, exist_ok=True)
    lock = DirectoryLock(directory, "a quantity cache")
    on_rank_zero(lock.__enter__)  # held by another process: every rank refuses
    try:
        save = _save_id()
        written = []
        for index, rows in parts:
            name = f"part-{save}-{index:06d}.pt"
            path = os.path.join(directory, name)
            cpu = rows.detach().cpu().contiguous()
            atomic_write(path, lambda f, t=cpu: torch.save({"rows": t}, f))
            written.append(
                {"index": index, "file": name, "rows": int(cpu.shape[0]),
                 "width": int(cpu.shape[1]), "dtype": str(cpu.dtype),
                 "sha256": sha256_file(path)}
            )  # fmt: skip
        if is_distributed():
            every: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(every, written)
            written = [p for part in every for p in part]
        written.sort(key=lambda p: p["index"])
        if not written:
            raise ValueError("no quantities to cache: the training set is empty")
        widths = {p["width"] for p in written}
        if len(widths) != 1:
            raise ValueError(f"parts have different widths {sorted(widths)}")
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "fingerprint": fingerprint,
            "shape": [sum(p["rows"] for p in written), widths.pop()],
            "dtype": written[0]["dtype"],
            "parts": [{k: p[k] for k in ("file", "rows", "sha256")} for p in written],
        }

        def publish() -> None:
            atomic_write(
                os.path.join(directory, MANIFEST),
                lambda f: f.write(json.dumps(manifest, indent=1).encode()),
            )
            keep = {p["file"] for p in written}
            for name in os.listdir(directory):  # the previous save's parts, now unused
                if _PART.match(name) and name not in keep:
                    os.remove(os.path.join(directory, name))
            remove_stale_temporaries(directory)

        on_rank_zero(publish)  # a failure on rank 0 fails every rank
    finally:
        if rank == 0:
            lock.__exit__(None, None, None)
    return directory


# --------------------------------------------------------------------------- reading


class CachedQuantities:
    """A validated cache: stream its parts (each verified) or load them whole."""

    def __init__(self, directory: str, manifest: dict[str, Any]) -> None:
        self.directory = directory
        self.manifest = manifest
        self.shape = tuple(manifest["shape"])
        self.dtype = manifest["dtype"]

    def _read(self, i: int, part: dict[str, Any], device: Any) -> Tensor:
        path = _inside(self.directory, part["file"])
        if sha256_file(path) != part["sha256"]:
            raise ValueError(
                f"cache part {path!r} does not match the SHA-256 in the manifest (field "
                f"parts[{i}].sha256): it was changed, replaced or swapped after the cache was "
                "written; recompute the cache with save_intermediate_quantities"
            )
        itemsize = torch.empty((), dtype=getattr(torch, self.dtype.split(".")[-1])).element_size()
        limit = part["rows"] * self.shape[1] * itemsize + (1 << 20)
        loaded = torch_load(path, device, "cache part", max_bytes=limit)
        rows = loaded.get("rows") if isinstance(loaded, dict) else None
        if not isinstance(rows, Tensor) or tuple(rows.shape) != (part["rows"], self.shape[1]):
            shape = tuple(rows.shape) if isinstance(rows, Tensor) else type(rows).__name__
            raise ValueError(
                f"cache part {path!r} holds {shape}, not the ({part['rows']}, {self.shape[1]}) "
                f"rows of field parts[{i}]"
            )
        if str(rows.dtype) != self.dtype:
            raise ValueError(f"cache part {path!r} holds {rows.dtype}, not {self.dtype}")
        return rows

    def parts(
        self, device: torch.device | str = "cpu", local: bool = False
    ) -> Iterator[tuple[int, Tensor]]:
        """``(part index, rows)`` in order, one verified file at a time (``local``: this rank's)."""
        rank, world = rank_and_world()
        for i, part in enumerate(self.manifest["parts"]):
            if local and i % world != rank:
                continue
            yield i, self._read(i, part, device)

    def load(self, device: torch.device | str = "cpu") -> Tensor:
        """All rows ``(n, D)``."""
        return torch.cat([rows for _, rows in self.parts(device)])

    def scores(self, test_rows: Tensor) -> list[Tensor]:
        """``test_rows @ rows.T`` blocks for every part, in order (parts split over ranks)."""
        if test_rows.shape[1] != self.shape[1]:
            raise ValueError(
                f"test-side width {test_rows.shape[1]} does not match the cache's {self.shape[1]}"
            )
        local = [(i, test_rows @ rows.T) for i, rows in self.parts(test_rows.device, local=True)]
        return gather_ordered(local)


def _inside(directory: str, name: Any) -> str:
    root = os.path.realpath(directory)
    path = os.path.realpath(os.path.join(root, str(name)))
    if os.path.isabs(str(name)) or os.path.commonpath([root, path]) != root:
        raise ValueError(f"cache manifest names {name!r}, outside {directory!r}: refused")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"cache part {path!r} is missing")
    return path


def _differences(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b), key=str):
            out += _differences(a.get(key), b.get(key), f"{prefix}{key}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]


def _is_count(value: Any, positive: bool = True) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= int(positive)


def _check_manifest(manifest: Any, path: str) -> None:
    """Check every field of a cache manifest; ``ValueError`` naming the field."""

    def bad(field: str, expected: str) -> ValueError:
        value = (
            manifest.get(field.split("[")[0].split(".")[0])
            if isinstance(manifest, dict)
            else manifest
        )
        return ValueError(
            f"cache manifest {path!r}: field {field} must be {expected} (got {value!r:.80})"
        )

    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{path!r} is not a captum_sam quantity cache (field format)")
    if manifest.get("version") != VERSION:
        raise ValueError(
            f"cache manifest {path!r}: field version is {manifest.get('version')!r}; this "
            f"version of captum_sam reads version {VERSION}: recompute the cache"
        )
    if not isinstance(manifest.get("fingerprint"), dict):
        raise bad("fingerprint", "an object")
    shape = manifest.get("shape")
    if not (isinstance(shape, list) and len(shape) == 2 and all(_is_count(v) for v in shape)):
        raise bad("shape", "two positive integers")
    dtype = manifest.get("dtype")
    if dtype not in ("torch.float16", "torch.bfloat16", "torch.float32", "torch.float64"):
        raise bad("dtype", "a floating torch dtype")
    parts = manifest.get("parts")
    if not isinstance(parts, list) or not parts:
        raise bad("parts", "a non-empty list")
    for i, part in enumerate(parts):
        ok = (
            isinstance(part, dict)
            and isinstance(part.get("file"), str)
            and _PART.match(part["file"]) is not None
            and _is_count(part.get("rows"))
            and isinstance(part.get("sha256"), str)
            and _HEX64.match(part["sha256"]) is not None
        )
        if not ok:
            raise ValueError(
                f"cache manifest {path!r}: field parts[{i}] must be {{file: part-*.pt, rows: "
                f"positive int, sha256: 64 hex digits}} (got {part!r:.120})"
            )
    if len({p["file"] for p in parts}) != len(parts):
        raise ValueError(f"cache manifest {path!r}: field parts names a file twice")
    if sum(p["rows"] for p in parts) != shape[0]:
        raise ValueError(
            f"cache manifest {path!r}: field parts has {sum(p['rows'] for p in parts)} rows "
            f"but field shape says {shape[0]}"
        )


def open_quantities(
    directory: str | os.PathLike[str], fingerprint: dict[str, Any]
) -> CachedQuantities:
    """Open a cache written for exactly this ``fingerprint`` (see the module for checks).

    Raises:
        FileNotFoundError: No manifest (or a part is missing).
        ValueError: Not a cache, a malformed manifest, a cache for other inputs (the
            message lists what differs), or rows that do not cover the training set.
    """
    directory = os.fspath(directory)
    path = os.path.join(directory, MANIFEST)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no cached quantities in {directory!r} (missing {MANIFEST})")
    manifest = read_json(path, "cache manifest")
    _check_manifest(manifest, path)
    stored = json.loads(json.dumps(manifest["fingerprint"]))
    current = json.loads(json.dumps(fingerprint))
    diff = _differences(stored, current)
    if diff:
        raise ValueError(
            f"stale cache in {directory!r}: it was computed with different {', '.join(diff)} "
            "(a changed checkpoint, setting, loss or training set); recompute it with "
            "save_intermediate_quantities"
        )
    n = current.get("data", {}).get("n") if isinstance(current.get("data"), dict) else None
    if n is not None and manifest["shape"][0] != n:
        raise ValueError(
            f"cache manifest {path!r}: field shape has {manifest['shape'][0]} rows for a "
            f"training set of {n} examples"
        )
    for part in manifest["parts"]:
        _inside(directory, part["file"])  # every part exists before anything is used
    return CachedQuantities(directory, manifest)
