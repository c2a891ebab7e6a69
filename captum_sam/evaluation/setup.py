"""What ``captum-sam compare`` runs: its settings, its data and how each estimator is built.

:class:`~captum_sam.evaluation.config.CompareConfig` holds the settings (re-exported
here), :class:`Context` the trained model and data the estimators share, and
:func:`build_estimator` constructs each method, SAM-aware or Captum's, on the same
model. :mod:`captum_sam.evaluation.compare` runs them;
:mod:`captum_sam.evaluation.report` writes what they found.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from captum_sam._captum import ArnoldiInfluenceFunction, TracInCP
from captum_sam.core.checkpoints import checkpoints_load_func
from captum_sam.data import SplitData, load_dataset
from captum_sam.evaluation.config import HESSIAN_FAMILY, METHODS, CompareConfig
from captum_sam.gif.tracincp import SAMTracInCP
from captum_sam.hif.influence import SAMInfluenceFunction
from captum_sam.models import training_dtype

__all__ = ["METHODS", "HESSIAN_FAMILY", "CompareConfig", "Context", "load_data", "build_estimator"]


@dataclass
class Context:
    """The trained model, its checkpoints and the data every estimator of a run shares."""

    config: CompareConfig
    data: SplitData
    model: nn.Module  # the trained model (w_T)
    base: nn.Module  # the attribution point of Hessian methods (w* or w_T)
    base_ckpt: str
    record_dir: str
    loss: Callable[[Any, Any], Tensor]
    test: tuple[Tensor, Tensor]
    val: tuple[Tensor, Tensor]
    epoch_ckpts: list[str] = field(default_factory=list)


def load_data(cfg: CompareConfig) -> SplitData:
    """The run's data (:func:`~captum_sam.data.load_dataset`), in the model's dtype."""
    return load_dataset(
        cfg.dataset,
        cfg.data_dir,
        cfg.n_train,
        cfg.n_val,
        cfg.resolved_n_test,
        cfg.noise,
        cfg.seed,
        training_dtype(cfg.model),
    )


def build_estimator(
    ctx: Context, method: str, curvature: str | None, show_progress: bool = False
) -> Any:
    """The estimator ``method`` of :data:`METHODS` on the run's model (Captum's on a copy).

    ``show_progress`` shows the set-up's progress bars where the constructor does work
    (the Hessian family's curvature and Captum's Arnoldi iteration).
    """
    cfg, train = ctx.config, ctx.data.train
    bs = max(cfg.batch_size, 128)
    if method == "sam-gif":
        return SAMTracInCP.from_trajectory(
            ctx.model, train, ctx.record_dir, loss_fn=ctx.loss, batch_size=bs
        )
    if method == "sam-gif-ckpt":
        # one epoch between checkpoints uses every example once with weight eta/|B|,
        # so eta_c/|B| makes parameter_change an estimate of w_{-S} - w_T
        def load(m: nn.Module, path: str) -> float:
            return checkpoints_load_func(m, path) / cfg.batch_size

        return SAMTracInCP(
            ctx.model,
            train,
            ctx.epoch_ckpts,
            checkpoints_load_func=load,
            loss_fn=ctx.loss,
            batch_size=bs,
            rho=cfg.rho,
            adaptive=cfg.adaptive,
        )
    if method in HESSIAN_FAMILY:
        return SAMInfluenceFunction(
            ctx.base,
            train,
            ctx.base_ckpt,
            loss_fn=ctx.loss,
            batch_size=bs,
            rho=cfg.rho,
            adaptive=cfg.adaptive,
            weight_decay=cfg.weight_decay,
            damping=cfg.damping,
            variant=HESSIAN_FAMILY[method],
            projection_dim=None,  # the exact inverse: no rank cap,
            hessian_reg=0.0,  # no added regulariser,
            hessian_inverse_tol=None,  # no eigenvalue dropped
            curvature=curvature or "hessian",
            show_progress=show_progress,
            training_horizon=horizon(ctx, curvature or "hessian"),
        )
    if method == "captum-tracincp":
        return TracInCP(
            copy.deepcopy(ctx.model),
            train,
            ctx.epoch_ckpts,
            checkpoints_load_func=checkpoints_load_func,
            loss_fn=torch.nn.CrossEntropyLoss(reduction="sum"),
            batch_size=bs,
            sample_wise_grads_per_batch=True,
        )
    n = len(train)
    damping = captum_damping(ctx) if cfg.damping == "auto" else float(cfg.damping)
    est = ArnoldiInfluenceFunction(
        copy.deepcopy(ctx.base),
        train,
        ctx.base_ckpt,
        checkpoints_load_func,
        loss_fn=ctx.loss,
        batch_size=bs,
        hessian_reg=n * (cfg.weight_decay + damping),
        seed=cfg.seed,
        show_progress=show_progress,
    )
    est.damping_used, est.damping_auto = damping, cfg.damping == "auto"  # for the report
    return est


def horizon(ctx: Context, curvature: str) -> float | None:
    r"""The training horizon :math:`\sum_t \eta_t` for ``damping="auto"``, or ``None``.

    Given when the attribution point is the recorded run's last iterate (not a fixed
    point) and the curvature is the Hessian or the GGN (see :mod:`captum_sam.hif.damping`).
    """
    from captum_sam.hif.damping import training_horizon

    if ctx.config.damping != "auto" or curvature not in ("hessian", "ggn"):
        return None
    return None if ctx.base is not ctx.model else training_horizon(ctx.record_dir)


def captum_damping(ctx: Context) -> float:
    """``damping="auto"``'s d for Captum's row: the rule on the Hessian it inverts (at ``base``)."""
    probe = SAMInfluenceFunction(
        ctx.base, ctx.data.train, ctx.base_ckpt, loss_fn=ctx.loss,
        batch_size=max(ctx.config.batch_size, 128), rho=0.0, variant="plain",
        curvature="hessian", solver="cg", projection_dim=None, hessian_reg=0.0,
        hessian_inverse_tol=None, damping="auto", training_horizon=horizon(ctx, "hessian"),
    )  # fmt: skip
    return probe.damping_used  # type: ignore[return-value]
