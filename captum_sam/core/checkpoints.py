r"""Checkpoint files: safe reading, Captum's loader contract, and private weight copies.

A checkpoint is untrusted input: it is always read with ``torch.load(...,
weights_only=True)`` (no pickled code runs). Two layouts are accepted by
:func:`checkpoints_load_func`, the default loader of every estimator:

* a plain ``state_dict`` (what Captum users save with
  ``torch.save(model.state_dict(), path)``), optionally with a ``"learning_rate"``
  entry; keys saved from ``nn.DataParallel`` (``"module."`` prefix) are matched to a
  plain model and the other way round, and the learning rate defaults to 1, all as
  Captum's own default loader does;
* a :class:`~captum_sam.TrajectoryRecorder` checkpoint ``{"model_state": ...,
  "learning_rate": ..., ...}``.

Estimators load checkpoints into a private copy of the user's model
(:class:`CheckpointLoader`), never into the model itself.
"""

from __future__ import annotations

import copy
import math
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from captum_sam.core.errors import user_stacklevel
from captum_sam.core.files import atomic_write, torch_load
from captum_sam.core.params import Params, detached_params

__all__ = [
    "atomic_write",
    "expected_bytes",
    "read_checkpoint",
    "load_checkpoint",
    "checkpoints_load_func",
    "CheckpointState",
    "CheckpointLoader",
    "model_device",
    "edited_copy",
]

LEARNING_RATE = "learning_rate"


def _learning_rate(value: Any, path: str) -> float:
    if isinstance(value, Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(
            f"checkpoint {path!r}: field 'learning_rate' must be a number, got {value!r}"
        )
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(
            f"checkpoint {path!r}: field 'learning_rate' is {value}; expected a finite number >= 0"
        )
    return value


def _torch_load(path: str, map_location: Any, max_bytes: int | None = None) -> Any:
    return torch_load(path, map_location, "checkpoint", max_bytes)


def load_checkpoint(
    path: str | os.PathLike[str], map_location: Any = "cpu", max_bytes: int | None = None
) -> dict[str, Any]:
    """Read a :class:`~captum_sam.TrajectoryRecorder` checkpoint safely and check its fields.

    Returns:
        ``{"model_state": state_dict, "learning_rate": float, ...}``.

    Raises:
        FileNotFoundError: The file does not exist.
        ValueError: The file cannot be read safely or lacks a field.
    """
    path = os.fspath(path)
    return _recorder_fields(_torch_load(path, map_location, max_bytes), path)


def _recorder_fields(ckpt: Any, path: str) -> dict[str, Any]:
    """Check a loaded :class:`~captum_sam.TrajectoryRecorder` checkpoint's fields."""
    if not isinstance(ckpt, dict):
        raise ValueError(f"checkpoint {path!r} is not a dict")
    for key in ("model_state", LEARNING_RATE):
        if key not in ckpt:
            raise ValueError(f"checkpoint {path!r} has no {key!r} field")
    ckpt[LEARNING_RATE] = _learning_rate(ckpt[LEARNING_RATE], path)
    _state_dict(ckpt["model_state"], path, "field 'model_state'")
    step = ckpt.get("step")
    if step is not None and (isinstance(step, bool) or not isinstance(step, int) or step < 0):
        raise ValueError(f"checkpoint {path!r}: field 'step' is {step!r}; expected an integer >= 0")
    return ckpt


def _state_dict(state: Any, path: str, what: str) -> dict[str, Tensor]:
    """``state`` if it is a non-empty ``name -> tensor`` dict, else a ``ValueError``."""
    if not isinstance(state, dict) or not state:
        raise ValueError(f"checkpoint {path!r}: {what} holds no parameters")
    bad = [k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, Tensor)]
    if bad:
        raise ValueError(
            f"checkpoint {path!r}: {what} is not a state dict: entries {bad[:5]} are not "
            "name -> tensor"
        )
    return state


def read_checkpoint(
    path: str | os.PathLike[str], map_location: Any = "cpu", max_bytes: int | None = None
) -> tuple[dict[str, Tensor], float]:
    """The state dict and learning rate of a checkpoint in either accepted layout.

    Returns:
        ``(state_dict, learning_rate)``; the learning rate is 1 when a plain state
        dict does not store one (Captum's default).

    Raises:
        FileNotFoundError: The file does not exist.
        ValueError: The file cannot be read safely, or is neither layout.
    """
    path = os.fspath(path)
    ckpt = _torch_load(path, map_location, max_bytes)
    if not isinstance(ckpt, dict):
        raise ValueError(f"checkpoint {path!r} holds a {type(ckpt).__name__}, not a state dict")
    if "model_state" in ckpt:
        full = _recorder_fields(ckpt, path)
        return full["model_state"], full[LEARNING_RATE]
    lr = _learning_rate(ckpt.get(LEARNING_RATE, 1.0), path)
    state = {k: v for k, v in ckpt.items() if k != LEARNING_RATE}
    return _state_dict(state, path, "the file"), lr


def _match_data_parallel(model: nn.Module, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Add or strip the ``"module."`` prefix of ``nn.DataParallel`` keys to fit ``model``."""
    wrapped = isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel))
    prefixed = next(iter(state)).startswith("module.")
    if prefixed and not wrapped:
        return {k[len("module.") :] if k.startswith("module.") else k: v for k, v in state.items()}
    if wrapped and not prefixed:
        return {f"module.{k}": v for k, v in state.items()}
    return state


def checkpoints_load_func(model: nn.Module, path: str) -> float:
    """Load a checkpoint into ``model`` and return its learning rate (Captum's contract).

    The default ``checkpoints_load_func`` of every estimator; it also works with
    Captum's own classes. Reads either layout described in this module, safely.

    Args:
        model: Model whose ``state_dict`` matches the checkpoint.
        path: Checkpoint file.

    Returns:
        The learning rate stored with the checkpoint (1 when none is stored).
    """
    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    state, lr = read_checkpoint(path, map_location=device, max_bytes=expected_bytes(model))
    state = _match_data_parallel(model, state)
    _check_fits(model, state, path)
    _warn_on_cast(model, state, path)
    model.load_state_dict(state)
    return lr


class CheckpointMismatchError(ValueError, RuntimeError):
    """A checkpoint whose names or shapes do not fit the model.

    A ``ValueError`` naming the file; also a ``RuntimeError``, what
    ``load_state_dict`` (and so Captum's default loader) raises for the same file.
    """


def _check_fits(model: nn.Module, state: dict[str, Tensor], path: str) -> None:
    """Refuse a state dict that ``load_state_dict`` would load only in part.

    ``load_state_dict`` copies the tensors that fit before it raises on the others,
    leaving ``model`` half loaded; this checks names and shapes first, so a refused
    checkpoint changes nothing.
    """
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k}: {tuple(state[k].shape)} vs the model's {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and state[k].shape != v.shape
    ]
    for problem, names in (
        ("lacks the model's entries", missing),
        ("has entries the model does not have", unexpected),
        ("has tensors of other shapes", shapes),
    ):
        if names:
            raise CheckpointMismatchError(
                f"checkpoint {path!r} does not fit the model: it {problem} {names[:5]}"
                + (f" (and {len(names) - 5} more)" if len(names) > 5 else "")
            )


def expected_bytes(model: nn.Module) -> int:
    """The largest archive a checkpoint of ``model`` may declare.

    Twice its state (so a float64 file for a float32 model still loads) plus 1 MiB of
    metadata.
    """
    state = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    return 2 * state + (1 << 20)


def _warn_on_cast(model: nn.Module, state: dict[str, Tensor], path: str) -> None:
    """Say when ``load_state_dict`` would cast a checkpoint's tensors to other dtypes."""
    own = model.state_dict()
    cast = sorted(
        {
            (str(v.dtype), str(own[k].dtype))
            for k, v in state.items()
            if k in own and v.dtype != own[k].dtype
        }
    )
    if cast:
        warnings.warn(
            f"checkpoint {path!r} holds {', '.join(a for a, _ in cast)} tensors that are cast "
            f"to the model's {', '.join(b for _, b in cast)} on loading: scores are computed "
            "in the model's precision",
            stacklevel=user_stacklevel(),
        )


@dataclass
class CheckpointState:
    """Weights of one checkpoint as detached parameter dicts."""

    path: str
    params: Params
    frozen: Params
    learning_rate: float


class CheckpointLoader:
    """Load checkpoints into a private copy of the model, never into the user's.

    Args:
        model: The user's model (copied once; the original is never touched).
        names: Attributed parameter names.
        load_func: Captum-style ``load_func(model, path) -> learning_rate``.
    """

    def __init__(
        self, model: nn.Module, names: list[str], load_func: Callable[[nn.Module, str], Any]
    ) -> None:
        if not callable(load_func):
            raise TypeError("`checkpoints_load_func` must be callable (model, path) -> lr")
        self.scratch = copy.deepcopy(model)
        self.names = names
        self.load_func = load_func
        self._cache: dict[str, CheckpointState] = {}

    def scratch_params(self, names: list[str]) -> list[Tensor]:
        """The private copy's parameters of the given names (for shapes)."""
        named = dict(self.scratch.named_parameters())
        return [named[n] for n in names]

    def __call__(self, path: str) -> CheckpointState:
        """The (cached) state of the checkpoint at ``path``."""
        if path not in self._cache:
            try:
                lr = self.load_func(self.scratch, path)
            except Exception as err:  # the loader's own exception type, as in Captum
                if hasattr(err, "add_note"):  # Python >= 3.11
                    err.add_note(f"(while `checkpoints_load_func` loaded {path!r})")
                raise
            if lr is None:
                raise ValueError(
                    f"`checkpoints_load_func` returned no learning rate for {path!r}: it "
                    "must return the learning rate stored with the checkpoint"
                )
            lr = float(lr)
            if not lr >= 0 or lr == float("inf"):
                raise ValueError(f"checkpoint {path!r} has learning rate {lr}; expected >= 0")
            params, frozen = detached_params(self.scratch, self.names)
            self._cache[path] = CheckpointState(
                path=path,
                params={k: v.clone() for k, v in params.items()},
                frozen={k: v.clone() for k, v in frozen.items()},
                learning_rate=lr,
            )
        return self._cache[path]


def model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter."""
    try:
        return next(model.parameters()).device
    except StopIteration as err:
        raise ValueError("`model` has no parameters") from err


def edited_copy(
    model: nn.Module,
    load_func: Callable[[nn.Module, str], Any],
    checkpoint: str,
    delta: Params,
) -> nn.Module:
    """A copy of ``model`` with ``checkpoint`` loaded and ``delta`` added (name -> tensor).

    The user's model is never touched.
    """
    edited = copy.deepcopy(model)
    load_func(edited, checkpoint)
    with torch.no_grad():
        named = dict(edited.named_parameters())
        for name, d in delta.items():
            named[name].add_(d.to(named[name]))
    return edited
