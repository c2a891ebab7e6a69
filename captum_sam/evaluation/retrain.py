r"""Ground truth: real SAM retraining without some training examples.

Removing a set :math:`S` means training on the kept examples (docs/math.rst); the
protocols (:data:`~captum_sam.evaluation.config.PROTOCOLS`, :data:`RETRAIN_MODES`):

* ``"fixed_point"`` (convex models): solve the full-batch SAM fixed-point equation
  :math:`F(w) = \nabla L_{-S}(w + \epsilon(w)) + \lambda w = 0`, with
  :math:`L_{-S} = \frac{1}{n - |S|}\sum_{i \notin S} l_i` and :math:`\epsilon` from
  :math:`\nabla L_{-S}(w)`, by Newton's method (dense Jacobian from ``torch.func.jacfwd``,
  backtracking on :math:`\lVert F\rVert`) started from the trained weights, to a residual
  below ``tol``. The first-order SAM-HIF estimates are derivatives of this point.
* ``"schedule"``: re-run the recorded SAM schedule (same initial weights, batches,
  learning rates), each batch the mean over its kept examples, an empty batch skipped
  (:func:`captum_sam.replay_trajectory`).
* ``"fixed_point_zero_weight"``, ``"schedule_zero_weight"``: the same with the removed
  examples weighted 0 and the :math:`1/n` or :math:`1/|B_t|` normalisation kept (what
  first-order estimators differentiate; SAM-GIF approximates the zero-weight replay).
* ``"fresh"``: retrain from the recorded initial weights on the kept examples with a new
  seeded batch order (:func:`captum_sam.retrain_fresh`), one model per seed.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import grad, jacfwd
from torch.utils.data import Dataset

from captum_sam.core import check_per_example_loss, eval_mode, sam_perturbation
from captum_sam.core.data import check_indices, fetch_batch
from captum_sam.core.errors import check_number, user_stacklevel
from captum_sam.core.losses import call_model, checked_losses
from captum_sam.evaluation.config import PROTOCOLS
from captum_sam.replay import replay_trajectory, retrain_fresh
from captum_sam.trajectory import Trajectory

__all__ = [
    "FixedPointResult",
    "sam_fixed_point",
    "retrain_once",
    "retrain_loo",
    "check_mode",
    "RETRAIN_MODES",
    "SCHEDULE_MODES",
]

RETRAIN_MODES = tuple(PROTOCOLS)
"""Every ground-truth protocol (the keys of :data:`~captum_sam.evaluation.config.PROTOCOLS`)."""
SCHEDULE_MODES = ("schedule", "schedule_zero_weight", "fresh")
"""The protocols that retrain from the recorded trajectory (the others: the fixed point)."""


@dataclass
class FixedPointResult:
    """A model at the SAM fixed point and how well the equation is solved."""

    model: nn.Module
    residual: float
    iterations: int


def _flat_setup(model: nn.Module) -> tuple[list[str], list[torch.Size], dict[str, Tensor], Tensor]:
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    shapes = [dict(model.named_parameters())[n].shape for n in names]
    frozen = {n: p.detach() for n, p in model.named_parameters() if n not in names}
    frozen.update({n: b.detach() for n, b in model.named_buffers()})
    w = torch.cat([dict(model.named_parameters())[n].detach().reshape(-1) for n in names])
    return names, shapes, frozen, w


DEGENERATE_GRADIENT = 1e-9
"""Below this loss-gradient norm a SAM fixed point is flagged as degenerate."""


def sam_fixed_point(
    model: nn.Module,
    dataset: Dataset,
    loss_fn: Callable[[Any, Any], Tensor],
    rho: float,
    weight_decay: float,
    adaptive: bool = False,
    remove: Sequence[int] | Tensor | None = None,
    tol: float = 1e-10,
    max_iter: int = 50,
    renormalise: bool = True,
) -> FixedPointResult:
    r"""Solve the full-batch SAM fixed point from ``model``'s weights (Newton).

    The objective is evaluated with every module in eval mode (dropout off,
    BatchNorm on its running statistics); afterwards every module of ``model`` gets
    back its own train/eval flag (also after an error), and the returned copy has the
    same flags.

    Args:
        model: Start point and architecture (not modified).
        dataset: Training set (held in memory as one batch).
        loss_fn: Per-example loss: shape ``(n,)`` or ``(n, ...)`` for ``n`` examples
            (trailing dimensions summed), checked as in
            :func:`~captum_sam.training.checked_losses`.
        rho: SAM radius.
        weight_decay: :math:`\lambda`.
        adaptive: ASAM.
        remove: Training indices to leave out.
        tol: Target :math:`\lVert F(w)\rVert_2`.
        max_iter: Newton iterations.
        renormalise: The loss is the mean over the kept examples,
            :math:`\frac{1}{n - |S|}\sum_{i \notin S} l_i` (``True``, "trained
            without"), or the removed examples get weight 0 and the :math:`1/n` stays
            (``False``).

    Returns:
        A new model at the fixed point, the final residual and the iterations.
        Warns when ``tol`` is not reached.

    Raises:
        ValueError: ``loss_fn`` does not return one loss per example, ``remove``
            leaves no example, or the residual :math:`F(w)` is NaN or infinite (the
            message names the Newton iteration).
    """
    check_per_example_loss(loss_fn)
    rho, weight_decay = check_number("rho", rho), check_number("weight_decay", weight_decay)
    n = len(dataset)  # type: ignore[arg-type]
    batch = fetch_batch(dataset, list(range(n)))
    names, shapes, frozen, w0 = _flat_setup(model)
    device = w0.device
    batch = tuple(x.to(device) if isinstance(x, Tensor) else x for x in batch)
    weights = torch.ones(n, dtype=w0.dtype, device=device)
    if remove is not None:
        weights[check_indices(remove, n, "remove", allow_empty=True)] = 0.0
    kept = int(weights.sum())
    if kept == 0:
        raise ValueError("`remove` leaves no training example")
    scale = kept if renormalise else n

    def unflat(w: Tensor) -> dict[str, Tensor]:
        out, i = {}, 0
        for name, shape in zip(names, shapes):
            out[name] = w[i : i + shape.numel()].reshape(shape)
            i += shape.numel()
        return out

    def objective(p: dict[str, Tensor]) -> Tensor:
        out = call_model(model, p, frozen, batch[:-1])
        return (weights * checked_losses(loss_fn, out, batch[-1], n)).sum() / scale

    def check_finite(norm: float, it: int) -> None:
        if not math.isfinite(norm):
            raise ValueError(
                f"sam_fixed_point: the residual F(w) is {norm} at Newton iteration {it}: "
                "check the training data for NaN/inf and the loss function"
            )

    def residual(w: Tensor) -> Tensor:
        p = unflat(w)
        eps = sam_perturbation(p, grad(objective)(p), rho, adaptive)
        g = grad(objective)({k: p[k] + eps[k] for k in p})
        return torch.cat([g[k].reshape(-1) for k in names]) + weight_decay * w

    with eval_mode(model):
        w = w0.clone()
        r = residual(w)
        norm, it = float(r.norm()), 0
        check_finite(norm, it)
        while norm > tol and it < max_iter:
            jac = jacfwd(residual)(w)
            step = torch.linalg.lstsq(jac, r.unsqueeze(1)).solution.squeeze(1)
            t = 1.0
            while True:  # backtracking on ||F||
                trial = w - t * step
                r_trial = residual(trial)
                if float(r_trial.norm()) < norm or t < 1e-6:
                    break
                t *= 0.5
            w, r, norm, it = trial, r_trial, float(r_trial.norm()), it + 1
            check_finite(norm, it)
    if norm > tol:
        warnings.warn(
            f"SAM fixed point not reached: residual {norm:.3e} > tol {tol:.1e} after {it} "
            "Newton iterations",
            stacklevel=user_stacklevel(),
        )
    if rho > 0:
        with eval_mode(model):
            g = grad(objective)(unflat(w))
        gnorm = float(torch.linalg.vector_norm(torch.cat([v.reshape(-1) for v in g.values()])))
    if rho > 0 and gnorm < DEGENERATE_GRADIENT:
        warnings.warn(
            f"the SAM fixed point found has a vanishing loss gradient ({gnorm:.1e}): the "
            "perturbation's direction g/(||g|| + 1e-12) is undefined there, so this point "
            "is an artifact of the 1e-12 (and SAM-HIF's d eps/dw, which scales with "
            "1/||g||, is meaningless at it). Start Newton from trained weights instead",
            stacklevel=user_stacklevel(),
        )
    result = copy.deepcopy(model)
    with torch.no_grad():
        params = dict(result.named_parameters())
        for name, value in unflat(w).items():
            params[name].copy_(value)
    return FixedPointResult(model=result, residual=norm, iterations=it)


def retrain_once(
    model: nn.Module,
    dataset: Dataset,
    loss_fn: Callable[[Any, Any], Tensor],
    removed: Sequence[int],
    mode: str,
    *,
    rho: float | None = None,
    weight_decay: float | None = None,
    adaptive: bool = False,
    trajectory: str | Trajectory | None = None,
    tol: float = 1e-10,
    seed: int = 0,
) -> nn.Module:
    r"""One model retrained without ``removed`` under the protocol ``mode``.

    Args:
        model: The start point (fixed-point protocols) or the architecture template
            (the others). Not modified.
        dataset: The training set.
        loss_fn: Per-example loss.
        removed: Training indices to leave out.
        mode: One of :data:`RETRAIN_MODES`.
        rho: SAM radius (fixed point).
        weight_decay: :math:`\lambda` (fixed point).
        adaptive: ASAM (fixed point).
        trajectory: Record directory or loaded trajectory (the other protocols).
        tol: Fixed-point residual target.
        seed: Batch-order seed (``"fresh"``).

    Returns:
        A new model.
    """
    check_mode(mode, rho, weight_decay, trajectory)
    removed = check_indices(removed, len(dataset), "removed", allow_empty=True)  # type: ignore[arg-type]
    if mode in SCHEDULE_MODES:
        if mode == "fresh":
            return retrain_fresh(model, dataset, loss_fn, trajectory, removed, seed=seed)  # type: ignore[arg-type]
        renormalise = mode == "schedule"
        return replay_trajectory(
            model,
            dataset,
            loss_fn,
            trajectory,
            removed,
            renormalise=renormalise,  # type: ignore[arg-type]
        )
    return sam_fixed_point(
        model,
        dataset,
        loss_fn,
        rho,  # type: ignore[arg-type]
        weight_decay,  # type: ignore[arg-type]
        adaptive,
        remove=removed,
        tol=tol,
        renormalise=mode == "fixed_point",
    ).model


def check_mode(mode: str, rho: float | None, weight_decay: float | None, trajectory: Any) -> None:
    """Refuse an unknown protocol or one whose inputs are missing (``ValueError``)."""
    if mode not in RETRAIN_MODES:
        raise ValueError(f"`mode` must be one of {RETRAIN_MODES}, got {mode!r}")
    if mode not in SCHEDULE_MODES and (rho is None or weight_decay is None):
        raise ValueError(f"mode {mode!r} needs `rho` and `weight_decay`")
    for name, value in (("rho", rho), ("weight_decay", weight_decay)):
        if value is not None:
            check_number(name, value)
    if mode in SCHEDULE_MODES and trajectory is None:
        raise ValueError(f"mode {mode!r} needs the `trajectory` (record directory) to replay")


def retrain_loo(
    model: nn.Module,
    dataset: Dataset,
    loss_fn: Callable[[Any, Any], Tensor],
    removals: Sequence[int] | Sequence[Sequence[int]],
    mode: str = "fixed_point",
    *,
    rho: float | None = None,
    weight_decay: float | None = None,
    adaptive: bool = False,
    trajectory: str | Trajectory | None = None,
    tol: float = 1e-10,
    show_progress: bool = False,
    seed: int = 0,
) -> list[nn.Module]:
    r"""Retrain once per removal: leave-one-out (an index) or leave-set-out (a list).

    Args:
        model: The trained model (fixed point: the start point) or the architecture
            template (the other protocols). Not modified.
        dataset: The training set.
        loss_fn: Per-example loss.
        removals: Indices (one retraining each) or index lists (one per set).
        mode: One of :data:`RETRAIN_MODES` (see the module's docstring).
        rho: SAM radius (fixed point).
        weight_decay: :math:`\lambda` (fixed point).
        adaptive: ASAM (fixed point).
        trajectory: Record directory of the run to replay (the other protocols).
        tol: Fixed-point residual target.
        show_progress: Progress bar over retrainings.
        seed: Batch-order seed of ``"fresh"``.

    Returns:
        One retrained model per removal.
    """
    from tqdm.auto import tqdm

    check_mode(mode, rho, weight_decay, trajectory)
    sets = [
        [int(r)]
        if isinstance(r, (int,)) or (isinstance(r, Tensor) and r.dim() == 0)
        else [int(i) for i in r]
        for r in removals
    ]
    settings = dict(
        rho=rho, weight_decay=weight_decay, adaptive=adaptive, trajectory=trajectory, tol=tol
    )
    return [
        retrain_once(model, dataset, loss_fn, removed, mode, seed=seed, **settings)  # type: ignore[arg-type]
        for removed in tqdm(sets, desc=f"retraining ({mode})", disable=not show_progress)
    ]
