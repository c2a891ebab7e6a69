"""What ``captum-sam compare`` runs: its settings, its data and how each estimator is built.

:class:`CompareConfig` holds the settings, :class:`Context` the trained model and data
the estimators share, and :func:`build_estimator` constructs each method, SAM-aware
or Captum's, on the same model. :mod:`captum_sam.evaluation.compare` runs them;
:mod:`captum_sam.evaluation.report` writes what they found.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from captum_sam._captum import ArnoldiInfluenceFunction, TracInCP
from captum_sam.core.checkpoints import checkpoints_load_func
from captum_sam.data import SplitData, load_digits_data, load_torchvision
from captum_sam.gif.tracincp import SAMTracInCP
from captum_sam.hif.influence import SAMInfluenceFunction
from captum_sam.models import MODELS

__all__ = ["METHODS", "HESSIAN_FAMILY", "CompareConfig", "Context", "load_data", "build_estimator"]

METHODS: dict[str, str] = {
    "sam-gif": "SAM-GIF, trajectory form: real batch membership and learning rates",
    "sam-gif-ckpt": "SAM-GIF, checkpoint form on the epoch checkpoints (eta_c/|B| each)",
    "sam-hif-fast": "SAM-HIF(Fast), Theorem 4.3",
    "sam-hif": "SAM-HIF, Theorem 4.5 (non-symmetric)",
    "sam-hif-exact": "SAM-HIF(exact), the full first-order derivative (MATH.md)",
    "if": "plain influence function at the same weights (Koh & Liang)",
    "captum-tracincp": "Captum TracInCP on the same epoch checkpoints",
    "captum-arnoldi": "Captum ArnoldiInfluenceFunction at the same weights",
}
HESSIAN_FAMILY = {
    "sam-hif-fast": "fast",
    "sam-hif": "full",
    "sam-hif-exact": "exact",
    "if": "plain",
}
GROUND_TRUTHS = ("auto", "fixed_point", "schedule")
DATASETS = ("digits", "mnist", "cifar10")


@dataclass(frozen=True)
class CompareConfig:
    """Settings of one comparison (validated on construction)."""

    model: str = "logreg"
    dataset: str = "digits"
    data_dir: str | None = None
    n_train: int = 1000
    n_val: int = 300
    n_test: int | None = None
    noise: float = 0.1
    rho: float = 0.05
    adaptive: bool = False
    epochs: int = 30
    lr: float = 0.5
    batch_size: int = 64
    weight_decay: float = 1e-3
    damping: float = 0.0
    curvature: str = "hessian"
    ground_truth: str = "auto"
    n_loo: int = 40
    lds_subsets: int = 20
    lds_fraction: float = 0.5
    removal_fractions: tuple[float, ...] = (0.0, 0.05, 0.1, 0.15, 0.2, 0.25)
    mislabel_by: str = "influence"
    methods: tuple[str, ...] = tuple(METHODS)
    seed: int = 0
    trace_examples: int = 4
    trace_k: int = 4

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise ValueError(f"`model` must be one of {MODELS}, got {self.model!r}")
        if self.dataset not in DATASETS:
            raise ValueError(f"`dataset` must be one of {DATASETS}, got {self.dataset!r}")
        if self.dataset != "digits" and self.data_dir is None:
            raise ValueError(f"dataset {self.dataset!r} needs --data-dir with its files")
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise ValueError(
                f"unknown method(s) {unknown}; valid methods are: {', '.join(METHODS)}"
            )
        if self.curvature not in ("hessian", "ggn", "both"):
            raise ValueError(f"`curvature` must be hessian, ggn or both, got {self.curvature!r}")
        if self.ground_truth not in GROUND_TRUTHS:
            raise ValueError(f"`ground_truth` must be one of {GROUND_TRUTHS}")
        if self.ground_truth == "fixed_point" and self.model != "logreg":
            warnings.warn(
                "the fixed-point ground truth assumes a convex model (logreg)", stacklevel=2
            )
        for name in ("rho", "damping", "weight_decay", "noise"):
            if getattr(self, name) < 0:
                raise ValueError(f"`{name}` must be >= 0")
        if self.mislabel_by not in ("influence", "self"):
            raise ValueError("`mislabel_by` must be 'influence' or 'self'")
        if self.lds_subsets < 3:
            raise ValueError("`lds_subsets` must be >= 3")
        if self.n_loo < 3:
            raise ValueError("`n_loo` must be >= 3")

    @property
    def resolved_ground_truth(self) -> str:
        """``fixed_point`` for the convex logistic regression, else ``schedule``."""
        if self.ground_truth != "auto":
            return self.ground_truth
        return "fixed_point" if self.model == "logreg" else "schedule"

    def rows(self) -> list[tuple[str, str, str | None]]:
        """``(row label, method, curvature)`` for every table row."""
        curvatures = ["hessian", "ggn"] if self.curvature == "both" else [self.curvature]
        out: list[tuple[str, str, str | None]] = []
        for m in self.methods:
            if m in HESSIAN_FAMILY or m == "captum-arnoldi":
                if m == "captum-arnoldi":
                    out.append((m, m, None))
                    continue
                for c in curvatures:
                    label = m if len(curvatures) == 1 else f"{m} [{c}]"
                    out.append((label, m, c))
            else:
                out.append((m, m, None))
        return out


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
    """The bundled digits, or a torchvision dataset read from ``cfg.data_dir``."""
    if cfg.dataset == "digits":
        return load_digits_data(cfg.n_train, cfg.n_val, cfg.n_test, cfg.noise, cfg.seed)
    return load_torchvision(
        cfg.dataset,
        cfg.data_dir,
        cfg.n_train,
        cfg.n_val,  # type: ignore[arg-type]
        cfg.n_test or 1000,
        cfg.noise,
        cfg.seed,
    )


def build_estimator(ctx: Context, method: str, curvature: str | None) -> Any:
    """The estimator ``method`` of :data:`METHODS` on the run's model (Captum's on a copy)."""
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
    return ArnoldiInfluenceFunction(
        copy.deepcopy(ctx.base),
        train,
        ctx.base_ckpt,
        checkpoints_load_func,
        loss_fn=ctx.loss,
        batch_size=bs,
        hessian_reg=n * (cfg.weight_decay + cfg.damping),
        seed=cfg.seed,
    )
