r"""The coefficient schedule of SAM-GIF: which weights, with which weight, on which examples.

SAM-GIF is a sum of *terms*. In checkpoint form (Captum's ``TracInCP``) there is one
term per checkpoint :math:`c`, with coefficient :math:`\eta_c` and every training
example; in trajectory form one term per recorded step :math:`t`, with coefficient
:math:`\eta_t / |B_t|` and the examples of the batch :math:`B_t`, evaluated at the
latest checkpoint saved at or before the step (the TracIn-CP approximation).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from captum_sam.trajectory import Trajectory

__all__ = ["Term", "checkpoint_terms", "trajectory_terms", "check_finite_terms"]


@dataclass(frozen=True)
class Term:
    """One summand: a checkpoint, a coefficient and the examples it applies to."""

    checkpoint: str
    coefficient: float
    indices: tuple[int, ...] | None  # None: every training example
    rho: float
    adaptive: bool


def checkpoint_terms(
    checkpoints: Sequence[str], learning_rates: Sequence[float], rho: float, adaptive: bool
) -> list[Term]:
    """One term per checkpoint with its learning rate as coefficient (every example)."""
    return [Term(c, lr, None, rho, adaptive) for c, lr in zip(checkpoints, learning_rates)]


def trajectory_terms(traj: Trajectory) -> list[Term]:
    """One term per recorded step, at the latest checkpoint saved at or before it."""
    terms = []
    for ckpt, steps in traj.segments():
        for t in steps:
            s = traj.steps[t]
            terms.append(Term(ckpt.path, s.lr / len(s.indices), s.indices, s.rho, s.adaptive))
    return terms


def check_finite_terms(x: Any, what: str, terms: Sequence[Term]) -> Any:
    """Return ``x``, or raise ``ValueError`` if it holds NaN/inf, naming the checkpoints."""
    values = x.values() if isinstance(x, dict) else x if isinstance(x, list) else [x]
    if not all(bool(torch.isfinite(v).all()) for v in values):
        where = sorted({os.path.basename(t.checkpoint) for t in terms})
        raise ValueError(
            f"{what} at checkpoint(s) {where} contain NaN or inf: check the inputs, the "
            "loss function and the checkpoint weights"
        )
    return x


def coefficient_vector(terms: Sequence[Term], like: Tensor) -> Tensor:
    """The terms' coefficients as a ``(K,)`` tensor of ``like``'s dtype and device."""
    return torch.tensor([t.coefficient for t in terms], dtype=like.dtype, device=like.device)
