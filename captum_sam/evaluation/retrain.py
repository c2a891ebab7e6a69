r"""Ground truth: real SAM retraining without some training examples.

Two modes, both keeping the leave-out convention of docs/math.rst (the removed examples get
weight 0, the :math:`1/n` or :math:`1/|B_t|` normalisation stays):

* ``"fixed_point"`` (convex models): solve the full-batch SAM fixed-point equation
  :math:`F(w) = \nabla L_c(w + \epsilon(w)) + \lambda w = 0`, with
  :math:`L_c = \frac1n\sum_i c_i l_i` and :math:`\epsilon` from :math:`\nabla L_c(w)`,
  by Newton's method (dense Jacobian from ``torch.func.jacfwd``, backtracking on
  :math:`\lVert F\rVert`) started from the trained weights, to a residual below
  ``tol``. The first-order SAM-HIF estimates are derivatives of exactly this point.
* ``"schedule"``: re-run the recorded SAM schedule (same initial weights, batches,
  learning rates) without the removed examples
  (:func:`captum_sam.training.replay_trajectory`); what SAM-GIF approximates.
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
from torch.func import functional_call, grad, jacfwd
from torch.utils.data import Dataset

from captum_sam.core import check_per_example_loss, eval_mode, sam_perturbation
from captum_sam.core.data import fetch_batch
from captum_sam.core.losses import checked_losses
from captum_sam.training import replay_trajectory
from captum_sam.trajectory import Trajectory

__all__ = ["FixedPointResult", "sam_fixed_point", "retrain_loo", "RETRAIN_MODES"]

RETRAIN_MODES = ("fixed_point", "schedule")


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
        remove: Training indices with weight 0.
        tol: Target :math:`\lVert F(w)\rVert_2`.
        max_iter: Newton iterations.

    Returns:
        A new model at the fixed point, the final residual and the iterations.
        Warns when ``tol`` is not reached.

    Raises:
        ValueError: ``loss_fn`` does not return one loss per example, or the residual
            :math:`F(w)` is NaN or infinite (the message names the Newton iteration).
    """
    check_per_example_loss(loss_fn)
    n = len(dataset)  # type: ignore[arg-type]
    batch = fetch_batch(dataset, list(range(n)))
    names, shapes, frozen, w0 = _flat_setup(model)
    device = w0.device
    batch = tuple(x.to(device) if isinstance(x, Tensor) else x for x in batch)
    weights = torch.ones(n, dtype=w0.dtype, device=device)
    if remove is not None:
        weights[torch.as_tensor(remove, dtype=torch.long, device=device)] = 0.0

    def unflat(w: Tensor) -> dict[str, Tensor]:
        out, i = {}, 0
        for name, shape in zip(names, shapes):
            out[name] = w[i : i + shape.numel()].reshape(shape)
            i += shape.numel()
        return out

    def objective(p: dict[str, Tensor]) -> Tensor:
        out = functional_call(model, (p, frozen), tuple(batch[:-1]))
        return (weights * checked_losses(loss_fn, out, batch[-1], n)).sum() / n

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
            stacklevel=2,
        )
    result = copy.deepcopy(model)
    with torch.no_grad():
        params = dict(result.named_parameters())
        for name, value in unflat(w).items():
            params[name].copy_(value)
    return FixedPointResult(model=result, residual=norm, iterations=it)


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
) -> list[nn.Module]:
    r"""Retrain once per removal: leave-one-out (an index) or leave-set-out (a list).

    Args:
        model: The trained model (``"fixed_point"``: the start point) or the
            architecture template (``"schedule"``). Not modified.
        dataset: The training set.
        loss_fn: Per-example loss.
        removals: Indices (one retraining each) or index lists (one per set).
        mode: ``"fixed_point"`` or ``"schedule"``.
        rho: SAM radius (``"fixed_point"``).
        weight_decay: :math:`\lambda` (``"fixed_point"``).
        adaptive: ASAM (``"fixed_point"``).
        trajectory: Record directory of the run to replay (``"schedule"``).
        tol: Fixed-point residual target.
        show_progress: Progress bar over retrainings.

    Returns:
        One retrained model per removal.
    """
    from tqdm.auto import tqdm

    if mode not in RETRAIN_MODES:
        raise ValueError(f"`mode` must be one of {RETRAIN_MODES}, got {mode!r}")
    sets = [
        [int(r)]
        if isinstance(r, (int,)) or (isinstance(r, Tensor) and r.dim() == 0)
        else [int(i) for i in r]
        for r in removals
    ]
    if mode == "fixed_point" and (rho is None or weight_decay is None):
        raise ValueError("mode 'fixed_point' needs `rho` and `weight_decay`")
    if mode == "schedule" and trajectory is None:
        raise ValueError("mode 'schedule' needs the `trajectory` (record directory) to replay")
    out = []
    for removed in tqdm(sets, desc=f"retraining ({mode})", disable=not show_progress):
        if mode == "fixed_point":
            res = sam_fixed_point(
                model,
                dataset,
                loss_fn,
                rho,
                weight_decay,
                adaptive,  # type: ignore[arg-type]
                remove=removed,
                tol=tol,
            )
            out.append(res.model)
        else:
            out.append(replay_trajectory(model, dataset, loss_fn, trajectory, remove=removed))  # type: ignore[arg-type]
    return out
