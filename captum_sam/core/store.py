"""On-disk cache of training-side intermediate quantities, refused when stale.

A cache directory holds torch files ``part-000000.pt``, ``part-000001.pt``, ... (one
per training batch, each ``{"rows": (batch, D)}``) and ``manifest.json``: the
format, the shape and dtype, the part list, and a *fingerprint* of everything the
rows depend on (the estimator class, the SHA-256 of every checkpoint file, the
settings that change the training side, the loss, and the training data). Opening a
cache with a different fingerprint raises ``ValueError`` naming what differs; a
cache is never reused silently. Parts are read with ``torch.load(...,
weights_only=True)``, one at a time, so using a cache needs memory for one part, not
for ``n x D``.

Under ``torch.distributed`` every rank writes the parts of its own batches and rank
0 writes the manifest once all parts exist.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import Dataset, TensorDataset

from captum_sam.core.checkpoints import atomic_write
from captum_sam.core.distributed import gather_ordered, is_distributed, rank_and_world

__all__ = [
    "projection_setting",
    "CachedQuantities",
    "save_quantities",
    "open_quantities",
    "file_digest",
    "data_digest",
]

FORMAT = "captum_sam.quantities"
MANIFEST = "manifest.json"


def file_digest(path: str) -> str:
    """SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def data_digest(dataset: Dataset) -> dict[str, Any]:
    """Fingerprint of a dataset (type, length; a hash of the tensors of a ``TensorDataset``)."""
    out: dict[str, Any] = {"type": type(dataset).__name__, "n": len(dataset)}  # type: ignore[arg-type]
    if isinstance(dataset, TensorDataset):
        h = hashlib.sha256()
        for t in dataset.tensors:
            h.update(str(t.dtype).encode() + str(tuple(t.shape)).encode())
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
        out["sha256"] = h.hexdigest()
    return out


def save_quantities(
    directory: str | os.PathLike[str],
    fingerprint: dict[str, Any],
    parts: Iterable[tuple[int, Tensor]],
) -> str:
    """Write ``(index, rows)`` parts and the manifest; returns the directory.

    Args:
        directory: Created if needed; an existing manifest is replaced.
        fingerprint: What the rows depend on (JSON-serialisable).
        parts: This rank's parts with their global order index.
    """
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    written = []
    for index, rows in parts:
        name = f"part-{index:06d}.pt"
        cpu = rows.detach().cpu().contiguous()
        atomic_write(os.path.join(directory, name), lambda f, t=cpu: torch.save({"rows": t}, f))
        written.append(
            {
                "index": index,
                "file": name,
                "rows": int(cpu.shape[0]),
                "width": int(cpu.shape[1]),
                "dtype": str(cpu.dtype),
            }
        )
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
        "version": 1,
        "fingerprint": fingerprint,
        "shape": [sum(p["rows"] for p in written), widths.pop()],
        "dtype": written[0]["dtype"],
        "parts": [{"file": p["file"], "rows": p["rows"]} for p in written],
    }
    if rank_and_world()[0] == 0:
        atomic_write(
            os.path.join(directory, MANIFEST),
            lambda f: f.write(json.dumps(manifest, indent=1).encode()),
        )
    if is_distributed():
        dist.barrier()
    return directory


class CachedQuantities:
    """A validated cache: stream its parts or load them whole."""

    def __init__(self, directory: str, manifest: dict[str, Any]) -> None:
        self.directory = directory
        self.manifest = manifest
        self.shape = tuple(manifest["shape"])

    def parts(
        self, device: torch.device | str = "cpu", local: bool = False
    ) -> Iterator[tuple[int, Tensor]]:
        """``(part index, rows)`` in order, one file at a time (``local``: this rank's)."""
        rank, world = rank_and_world()
        for i, part in enumerate(self.manifest["parts"]):
            if local and i % world != rank:
                continue
            path = _inside(self.directory, part["file"])
            rows = torch.load(path, map_location=device, weights_only=True)["rows"]
            if rows.shape[0] != part["rows"] or rows.shape[1] != self.shape[1]:
                raise ValueError(
                    f"cache part {path!r} has shape {tuple(rows.shape)}, "
                    "not the one in the manifest"
                )
            yield i, rows

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


def open_quantities(
    directory: str | os.PathLike[str], fingerprint: dict[str, Any]
) -> CachedQuantities:
    """Open a cache written for exactly this ``fingerprint``.

    Raises:
        FileNotFoundError: No manifest (or a part is missing).
        ValueError: Not a cache, or stale: the message lists what differs.
    """
    directory = os.fspath(directory)
    path = os.path.join(directory, MANIFEST)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no cached quantities in {directory!r} (missing {MANIFEST})")
    with open(path, encoding="utf-8") as f:
        manifest = json.load(f)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{path!r} is not a captum_sam quantity cache")
    stored = json.loads(json.dumps(manifest.get("fingerprint")))
    current = json.loads(json.dumps(fingerprint))
    diff = _differences(stored, current)
    if diff:
        raise ValueError(
            f"stale cache in {directory!r}: it was computed with different {', '.join(diff)} "
            "(a changed checkpoint, setting, loss or training set); recompute it with "
            "save_intermediate_quantities"
        )
    return CachedQuantities(directory, manifest)


def projection_setting(projector: Any) -> list[Any] | None:
    """The part of a fingerprint that describes a random projection (or its absence)."""
    return None if projector is None else [projector.dim, projector.kind, projector.seed]
