r"""The schema of a trajectory manifest: every field's type, value and consistency.

:func:`check_manifest` turns the parsed JSON of ``manifest.json`` into plain values or
raises ``ValueError`` naming the file and the field (``steps[3].lr``,
``checkpoints[1].step``...). It never lets a wrong type through as another value
(``adaptive: "false"`` is not ``True``; ``steps[0] = 5`` is not a step), and checks
what the fields mean together: checkpoint steps start at 0, increase strictly and lie
within the recorded steps; a complete run's last checkpoint is at its last step.

What is accepted, by design: learning rates :math:`\ge 0` (a schedule may end at 0,
e.g. cosine annealing to ``eta_min=0``; such a step contributes nothing), ``rho``
:math:`\ge 0`, and the three known format versions (1: no checkpoint hashes; 2: a
SHA-256 per checkpoint file; 3: also a SHA-256 of the manifest itself, field
``sha256``, and optionally a fingerprint of the training data, field ``data``).

The base optimizer's ``hyperparameters`` are checked by type (numbers finite, flags
``true``/``false``); for SGD, every setting the replay reads must be present.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from typing import Any

__all__ = ["check_manifest", "manifest_digest", "FORMAT", "VERSIONS", "CURRENT_VERSION"]

FORMAT = "captum_sam.trajectory"
VERSIONS = (1, 2, 3)
CURRENT_VERSION = 3
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
SELF_HASH = "sha256"
"""The manifest field holding :func:`manifest_digest` of the rest (version 3)."""

_NUMBERS = ("lr", "momentum", "dampening", "weight_decay", "rho", "eps", "alpha")
_FLAGS = ("nesterov", "maximize", "adaptive", "differentiable", "amsgrad", "capturable")
_FLAGS_OR_NONE = ("foreach", "fused")
_SGD_REQUIRED = ("momentum", "dampening", "weight_decay", "nesterov", "maximize")


def manifest_digest(manifest: dict[str, Any]) -> str:
    """SHA-256 of a manifest's canonical JSON, without its own ``sha256`` field."""
    body = {k: v for k, v in manifest.items() if k != SELF_HASH}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"))  # NaN: the schema refuses it
    return hashlib.sha256(text.encode()).hexdigest()


class _Fields:
    """Checks that raise ``ValueError`` naming ``path`` and the field."""

    def __init__(self, path: str) -> None:
        self.path = path

    def fail(self, field: str, expected: str, value: Any) -> ValueError:
        shown = repr(value)
        shown = shown if len(shown) <= 80 else shown[:77] + "..."
        return ValueError(
            f"trajectory manifest {self.path!r}: field {field} must be {expected}, got {shown}"
        )

    def integer(self, value: Any, field: str, low: int = 0) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise self.fail(field, f"an integer >= {low}", value)
        return value

    def number(self, value: Any, field: str) -> float:
        ok = not isinstance(value, bool) and isinstance(value, (int, float))
        if not ok or not math.isfinite(value) or value < 0:
            raise self.fail(field, "a finite number >= 0", value)
        return float(value)

    def flag(self, value: Any, field: str) -> bool:
        if not isinstance(value, bool):
            raise self.fail(field, "true or false", value)
        return value

    def obj(self, value: Any, field: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(field, "an object", value)
        return value

    def has(self, entry: dict[str, Any], keys: tuple[str, ...], field: str) -> None:
        for key in keys:
            if key not in entry:
                raise ValueError(f"trajectory manifest {self.path!r}: field {field} lacks {key!r}")


def _checkpoint(f: _Fields, entry: Any, field: str, version: int) -> dict[str, Any]:
    entry = f.obj(entry, field)
    f.has(entry, ("file", "step", "learning_rate") + (("sha256",) if version >= 2 else ()), field)
    if not isinstance(entry["file"], str) or not entry["file"]:
        raise f.fail(f"{field}.file", "a file name", entry["file"])
    epoch = entry.get("epoch")
    if epoch is not None:
        f.integer(epoch, f"{field}.epoch")
    digest = entry.get("sha256")
    if version >= 2 and (not isinstance(digest, str) or not _HEX64.match(digest)):
        raise f.fail(f"{field}.sha256", "64 hex digits", digest)
    return {
        "file": entry["file"],
        "step": f.integer(entry["step"], f"{field}.step"),
        "learning_rate": f.number(entry["learning_rate"], f"{field}.learning_rate"),
        "epoch": epoch,
        "sha256": digest,
    }


def _step(f: _Fields, entry: Any, field: str, n_train: int) -> dict[str, Any]:
    entry = f.obj(entry, field)
    f.has(entry, ("lr", "rho", "adaptive", "indices"), field)
    indices = entry["indices"]
    ok = (
        isinstance(indices, list)
        and indices
        and all(
            isinstance(i, int) and not isinstance(i, bool) and 0 <= i < n_train for i in indices
        )
    )
    if not ok:
        raise f.fail(f"{field}.indices", f"a non-empty list of integers in [0, {n_train})", indices)
    return {
        "lr": f.number(entry["lr"], f"{field}.lr"),
        "rho": f.number(entry["rho"], f"{field}.rho"),
        "adaptive": f.flag(entry["adaptive"], f"{field}.adaptive"),
        "indices": tuple(indices),
        "epoch": f.integer(entry.get("epoch", 0), f"{field}.epoch"),
    }


def _optimizer(f: _Fields, raw: Any) -> dict[str, Any]:
    """The ``optimizer`` field: base class name and its hyperparameters, by type."""
    optimizer = f.obj(raw, "optimizer")
    f.has(optimizer, ("base", "hyperparameters"), "optimizer")
    base = optimizer["base"]
    if not isinstance(base, str) or not base:
        raise f.fail("optimizer.base", "a class name", base)
    hyper = f.obj(optimizer["hyperparameters"], "optimizer.hyperparameters")
    for key, value in hyper.items():
        field = f"optimizer.hyperparameters.{key}"
        if key in _NUMBERS:
            f.number(value, field)
        elif key in _FLAGS:
            f.flag(value, field)
        elif key in _FLAGS_OR_NONE:
            if value is not None:
                f.flag(value, field)
        elif not (value is None or isinstance(value, (bool, int, float, str))):
            raise f.fail(field, "a number, string, true/false or null", value)
        elif isinstance(value, float) and not math.isfinite(value):
            raise f.fail(field, "finite", value)
    if base == "torch.optim.sgd.SGD":
        f.has(hyper, _SGD_REQUIRED, "optimizer.hyperparameters")
    return optimizer


def _data(f: _Fields, raw: Any, n_train: int) -> dict[str, Any] | None:
    """The optional ``data`` field: the training set's fingerprint (type, n, sha256)."""
    if raw is None:
        return None
    data = f.obj(raw, "data")
    f.has(data, ("type", "n", "sha256"), "data")
    if not isinstance(data["type"], str):
        raise f.fail("data.type", "a class name", data["type"])
    if f.integer(data["n"], "data.n") != n_train:
        raise f.fail("data.n", f"n_train ({n_train})", data["n"])
    if not isinstance(data["sha256"], str) or not _HEX64.match(data["sha256"]):
        raise f.fail("data.sha256", "64 hex digits", data["sha256"])
    return {"type": data["type"], "n": data["n"], "sha256": data["sha256"]}


def check_manifest(raw: Any, path: str) -> dict[str, Any]:
    """Validate a parsed trajectory manifest; return its fields as checked plain values.

    Raises:
        ValueError: Naming ``path`` and the first field that is wrong.
    """
    f = _Fields(path)
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise ValueError(f"{path!r} is not a captum_sam trajectory manifest (field format)")
    version = raw.get("version")
    if isinstance(version, bool) or version not in VERSIONS:
        raise f.fail("version", f"one of {VERSIONS} (a newer captum_sam wrote it?)", version)
    f.has(raw, ("n_train", "initial", "checkpoints", "steps", "optimizer", "complete"), "(top)")
    if version >= 3:
        f.has(raw, (SELF_HASH, "seed"), "(top)")
        digest = raw[SELF_HASH]
        if not isinstance(digest, str) or not _HEX64.match(digest):
            raise f.fail(SELF_HASH, "64 hex digits", digest)
        if manifest_digest(raw) != digest:
            raise ValueError(
                f"trajectory manifest {path!r}: its content does not match field "
                f"{SELF_HASH}: it was edited or corrupted after it was written"
            )
    n_train = f.integer(raw["n_train"], "n_train", low=1)
    complete = f.flag(raw["complete"], "complete")
    seed = raw.get("seed")
    if seed is not None:
        f.integer(seed, "seed", low=-(2**63))
    optimizer = _optimizer(f, raw["optimizer"])
    data = _data(f, raw.get("data"), n_train)
    if not isinstance(raw["steps"], list):
        raise f.fail("steps", "a list", raw["steps"])
    if not isinstance(raw["checkpoints"], list):
        raise f.fail("checkpoints", "a list", raw["checkpoints"])
    steps = [_step(f, s, f"steps[{t}]", n_train) for t, s in enumerate(raw["steps"])]
    initial = _checkpoint(f, raw["initial"], "initial", version)
    checkpoints = [
        _checkpoint(f, c, f"checkpoints[{i}]", version) for i, c in enumerate(raw["checkpoints"])
    ]
    if initial["step"] != 0:
        raise f.fail("initial.step", "0", initial["step"])
    previous = 0
    for i, c in enumerate(checkpoints):
        if i > 0 and c["step"] <= previous:
            raise f.fail(
                f"checkpoints[{i}].step", f"greater than the previous checkpoint's {previous}",
                c["step"],
            )  # fmt: skip
        if c["step"] > len(steps):
            raise f.fail(
                f"checkpoints[{i}].step", f"at most the {len(steps)} recorded steps", c["step"]
            )
        previous = c["step"]
    if complete and steps and (not checkpoints or checkpoints[-1]["step"] != len(steps)):
        last = checkpoints[-1]["step"] if checkpoints else None
        raise f.fail(
            "checkpoints", f"a list ending with the final weights at step {len(steps)}", last
        )
    files = [initial["file"], *(c["file"] for c in checkpoints)]
    if len(set(files)) != len(files):
        raise f.fail("checkpoints", "distinct files", files)
    return {
        "version": version,
        "n_train": n_train,
        "complete": complete,
        "seed": seed,
        "optimizer": optimizer,
        "data": data,
        "steps": steps,
        "initial": initial,
        "checkpoints": checkpoints,
    }
