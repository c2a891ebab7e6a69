r"""Verified on-disk cache of fitted K-FAC/EK-FAC curvatures (``factors_dir=``).

A fitted curvature at one point is stored as two files in ``factors_dir``:

* ``<kind>-<point>-<save>.pt``: the factors and eigendecompositions of every layer
  (``{"s", "count", "qs", "qa", "values"}``, one list entry per layer; ``qa`` and
  ``values`` have ``k <= width`` columns, fewer for a thin input basis). The input
  sums :math:`A_l` are not stored: nothing uses them once decomposed (version 1 stored
  them);
* ``<kind>-<point>.json``: the manifest, with the format and version, the *fingerprint*
  of everything the factors depend on (the checkpoint's SHA-256, the point and, at
  :math:`w^* + \epsilon^*`, ``rho``/``adaptive``/the perturbation scope and the
  training data, the attributed parameters and layers, the curvature data by content,
  its scale, the loss and the dtype), the file's name and SHA-256, and the layers'
  shapes.

``<kind>`` is ``kfac`` or ``ekfac`` and ``<point>`` ``perturbed`` (:math:`w^* +
\epsilon^*`) or ``params`` (:math:`w^*`), so one directory serves several variants
(``plain`` and the :math:`H_0` of ``full`` share the factors at :math:`w^*`).

Reading follows :mod:`captum_sam.core.store`'s rules: every manifest field is checked
(``ValueError`` naming the manifest and the field), a stale fingerprint is refused
(naming what differs), the data file's SHA-256 must match (``ValueError`` naming the
file), the archive's declared size is bounded before inflating, and every tensor's
shape and dtype is checked. Writing is atomic and locked: the data file has a name
unique to the save, the manifest is renamed into place last, then the previous save's
file is removed. With no manifest the curvature is fitted and saved; a stale or
damaged cache is never silently overwritten.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist

from captum_sam.core.distributed import is_distributed, on_rank_zero, require_same
from captum_sam.core.files import (
    DirectoryLock,
    atomic_write,
    read_json,
    remove_stale_temporaries,
    sha256_file,
    torch_load,
)
from captum_sam.core.store import data_digest, file_digest, function_digest, model_digest
from captum_sam.hif.kfac import KroneckerCurvature, KroneckerFactors
from captum_sam.hif.kron_sites import KroneckerSite

__all__ = ["cached_fit", "fingerprint", "FORMAT", "VERSION"]

FORMAT = "captum_sam.kronecker_factors"
VERSION = 2
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_FIELDS = ("s", "count", "qs", "qa", "values")
_DTYPES = ("torch.float32", "torch.float64")


def _site_shapes(sites: Sequence[KroneckerSite]) -> list[list[Any]]:
    return [[s.name, s.weight, s.bias, s.d_out, s.width] for s in sites]


def fingerprint(est: Any, key: str, sites: Sequence[KroneckerSite]) -> dict[str, Any]:
    """What the curvature of ``est`` at ``key`` (``"perturbed"``/``"params"``) depends on."""
    op = est.operator
    out: dict[str, Any] = {
        "kind": est.curvature,
        "model": model_digest(est.model),
        "point": key,
        "checkpoint": file_digest(est.checkpoint),
        "parameters": list(op.names),
        "sites": _site_shapes(sites),
        "curvature_data": data_digest(est.hessian_dataloader),
        "scale": float(op.hessian_scale),
        "loss": [*function_digest(est.loss_fn), est.reduction_type],
        "dtype": str(op.mean_grad[op.names[0]].dtype),
    }
    if est.kfac_samples is not None:  # random pseudo-gradients: their number and seed
        out.update(samples=int(est.kfac_samples), seed=int(est.seed), signs="per batch")
    if key == "perturbed":  # w* + eps*: eps* from the training data's gradient
        out.update(
            rho=float(op.rho), adaptive=bool(op.adaptive), scope=est.perturbation_scope,
            perturbation_data=data_digest(est.train_dataloader),
        )  # fmt: skip
    return json.loads(json.dumps(out))


def _shapes(site: KroneckerSite, k: int | None = None) -> dict[str, tuple[int, ...]]:
    """Every field's shape for ``site`` with ``k`` input eigenvectors (``None``: all)."""
    k = site.width if k is None else k
    return {
        "s": (site.d_out, site.d_out),
        "count": (),
        "qs": (site.d_out, site.d_out),
        "qa": (site.width, k),
        "values": (site.d_out, k),
    }


def _basis_size(value: Any, site: KroneckerSite) -> int | None:
    """The ``k`` of a stored ``qa`` ``(width, k)`` with ``k <= width``, else ``None``."""
    if isinstance(value, torch.Tensor) and value.dim() == 2 and value.shape[0] == site.width:
        return int(value.shape[1]) if value.shape[1] <= site.width else None
    return None


def _differences(stored: dict[str, Any], current: dict[str, Any]) -> list[str]:
    return sorted(k for k in set(stored) | set(current) if stored.get(k) != current.get(k))


def _check_manifest(manifest: Any, path: str, prefix: str) -> None:
    """Every field of a factors manifest, or ``ValueError`` naming the file and field."""

    def bad(field: str, expected: str) -> ValueError:
        value = manifest.get(field) if isinstance(manifest, dict) else manifest
        return ValueError(
            f"K-FAC factors manifest {path!r}: field {field} must be {expected} (got {value!r:.80})"
        )

    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise bad("format", repr(FORMAT))
    if manifest.get("version") != VERSION:
        raise bad("version", f"{VERSION} (recompute the factors in a new directory)")
    if not isinstance(manifest.get("fingerprint"), dict):
        raise bad("fingerprint", "an object")
    name = manifest.get("file")
    if not (isinstance(name, str) and re.fullmatch(re.escape(prefix) + r"-[0-9a-f]{12}\.pt", name)):
        raise bad("file", f"'{prefix}-<12 hex digits>.pt'")
    if not (isinstance(manifest.get("sha256"), str) and _HEX64.match(manifest["sha256"])):
        raise bad("sha256", "64 hex digits")
    if manifest.get("dtype") not in _DTYPES:
        raise bad("dtype", f"one of {_DTYPES}")
    if manifest.get("sites") != manifest["fingerprint"].get("sites"):
        raise bad("sites", "the layers of field fingerprint.sites")


def _load(
    directory: str, manifest: dict[str, Any], sites: Sequence[KroneckerSite], path: str
) -> dict[str, list[torch.Tensor]]:
    """The verified tensors of a cache whose manifest was checked."""
    data = os.path.join(directory, manifest["file"])
    if not os.path.isfile(data):
        raise FileNotFoundError(f"K-FAC factors file {data!r} (named by {path!r}) is missing")
    if sha256_file(data) != manifest["sha256"]:
        raise ValueError(
            f"K-FAC factors file {data!r} does not match the SHA-256 of field sha256 in "
            f"{path!r}: it was changed or replaced after it was written; remove the "
            "directory's files to refit"
        )
    dtype = getattr(torch, manifest["dtype"].split(".")[-1])
    size = torch.empty((), dtype=dtype).element_size()
    numel = sum(sum(max(1, int(torch.Size(s).numel())) for s in _shapes(x).values()) for x in sites)
    loaded = torch_load(data, "cpu", "K-FAC factors file", max_bytes=numel * size + (1 << 20))
    if not isinstance(loaded, dict) or sorted(loaded) != sorted(_FIELDS):
        raise ValueError(f"K-FAC factors file {data!r} must hold the entries {list(_FIELDS)}")
    for field in _FIELDS:
        if not isinstance(loaded[field], list) or len(loaded[field]) != len(sites):
            raise ValueError(
                f"K-FAC factors file {data!r}: entry {field} must be a list of {len(sites)} "
                "tensors (one per layer)"
            )
    for field in _FIELDS:  # qa (checked before values) gives values' columns
        for site, value, qa in zip(sites, loaded[field], loaded["qa"]):
            shape = _shapes(site, _basis_size(qa, site))[field]
            if not isinstance(value, torch.Tensor) or tuple(value.shape) != shape:
                got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value)
                raise ValueError(
                    f"K-FAC factors file {data!r}: entry {field} of layer {site.name!r} is "
                    f"{got}, not a tensor of shape {shape}"
                )
            if value.dtype != dtype or not torch.isfinite(value).all():
                raise ValueError(
                    f"K-FAC factors file {data!r}: entry {field} of layer {site.name!r} must "
                    f"be finite {dtype}"
                )
    return loaded


def _save(
    directory: str,
    prefix: str,
    manifest_path: str,
    fp: dict[str, Any],
    curvature: KroneckerCurvature,
) -> None:
    """Write the data file, then the manifest, atomically, under the directory's lock."""
    with DirectoryLock(directory, "a K-FAC factors cache"):
        name = f"{prefix}-{uuid.uuid4().hex[:12]}.pt"
        data = os.path.join(directory, name)
        payload = {
            "s": [f.s for f in curvature.factors],
            "count": [f.count for f in curvature.factors],
            "qs": curvature.qs,
            "qa": curvature.qa,
            "values": curvature.values,
        }
        payload = {k: [t.detach().cpu().contiguous() for t in v] for k, v in payload.items()}
        atomic_write(data, lambda f: torch.save(payload, f))
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "fingerprint": fp,
            "file": name,
            "sha256": sha256_file(data),
            "dtype": str(payload["values"][0].dtype),
            "sites": fp["sites"],
        }
        atomic_write(manifest_path, lambda f: f.write(json.dumps(manifest, indent=1).encode()))
        pattern = re.compile(re.escape(prefix) + r"-[0-9a-f]{12}\.pt")
        for old in os.listdir(directory):  # the previous save's file, now unused
            if pattern.fullmatch(old) and old != name:
                os.remove(os.path.join(directory, old))
        remove_stale_temporaries(directory)


def cached_fit(
    factors_dir: str | os.PathLike[str],
    est: Any,
    key: str,
    sites: Sequence[KroneckerSite],
    fit: Callable[[], KroneckerCurvature],
) -> KroneckerCurvature:
    """The curvature at ``key`` from ``factors_dir``, or fitted (``fit()``) and saved there.

    Args:
        factors_dir: The cache directory (created if needed).
        est: The estimator (for the fingerprint).
        key: ``"perturbed"`` or ``"params"``.
        sites: The layers, in the curvature's order.
        fit: Fits the curvature (called on every rank when there is no cache).

    Raises:
        ValueError: A malformed manifest (naming the field), a stale cache (naming what
            differs), a data file that fails its SHA-256 or holds the wrong tensors
            (naming the file), or another process writing the directory.
    """
    if not isinstance(factors_dir, (str, os.PathLike)):
        raise TypeError(f"`factors_dir` must be a path or None, got {factors_dir!r}")
    directory = os.fspath(factors_dir)
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise ValueError(f"`factors_dir` {directory!r} exists and is not a directory")
    prefix = f"{est.curvature}-{key}"
    path = os.path.join(directory, f"{prefix}.json")
    fp = fingerprint(est, key, sites)
    require_same(fp, f"the fingerprint of the K-FAC factors {path!r}")  # (one data set)
    exists = [os.path.isfile(path)]
    if is_distributed():  # every rank takes rank 0's view of the directory
        dist.broadcast_object_list(exists, src=0)
    if not exists[0]:
        curvature = fit()

        def save() -> None:
            os.makedirs(directory, exist_ok=True)
            _save(directory, prefix, path, fp, curvature)

        on_rank_zero(save)  # a failed save fails every rank (none waits at a barrier)
        return curvature
    manifest = read_json(path, "K-FAC factors manifest")
    _check_manifest(manifest, path, prefix)
    diff = _differences(manifest["fingerprint"], fp)
    if diff:
        raise ValueError(
            f"stale K-FAC factors in {path!r}: they were fitted with different "
            f"{', '.join(diff)} (field fingerprint); use another `factors_dir` or remove "
            "these files to refit"
        )
    loaded = _load(directory, manifest, sites, path)
    like = dict(est.operator.params)
    ref = next(iter(like.values()))
    move = [[t.to(ref.device) for t in loaded[f]] for f in _FIELDS]
    factors = [KroneckerFactors(None, s, c) for s, c in zip(*move[:2])]
    return KroneckerCurvature(est.curvature, list(sites), like, factors, *move[2:])
