"""The side-by-side comparison behind ``captum-sam compare``.

One SAM-trained model with a recorded trajectory; every estimator (SAM-aware and
Captum's standard ones) attributes the same model; real retraining gives the
ground truth. :func:`run_compare` returns the results and writes ``report.md``,
``results.json`` and PNG plots; the report and the plots are written by
:mod:`captum_sam.evaluation.report`.
"""

from __future__ import annotations

import copy
import json
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from captum_sam._captum import ArnoldiInfluenceFunction, TracInCP
from captum_sam.applications import detect_mislabeled, harmful_removal_curve
from captum_sam.core.checkpoints import checkpoints_load_func
from captum_sam.data import SplitData, load_digits_data, load_torchvision
from captum_sam.evaluation.ground_truth import GroundTruth, random_subsets
from captum_sam.evaluation.metrics import (
    accuracy,
    detection_auc,
    editing_metrics,
    lds,
    loo_correlation,
    recall_at,
)
from captum_sam.evaluation.report import COLUMNS as COLUMNS  # re-exported, defined there
from captum_sam.evaluation.report import _plots, _report, format_table
from captum_sam.evaluation.retrain import sam_fixed_point
from captum_sam.gif.tracincp import SAMTracInCP
from captum_sam.hif.influence import SAMInfluenceFunction
from captum_sam.models import MODELS, build_model
from captum_sam.training import train_sam
from captum_sam.trajectory import load_trajectory

__all__ = ["METHODS", "CompareConfig", "run_compare", "format_table"]

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
class _Context:
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


def _load_data(cfg: CompareConfig) -> SplitData:
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


def _build(ctx: _Context, method: str, curvature: str | None) -> Any:
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


def _say(show: bool, text: str) -> None:
    if show:
        print(text, flush=True)


def run_compare(
    config: CompareConfig,
    out: str | os.PathLike[str],
    show_progress: bool = True,
    cache_dir: str | None = None,
) -> dict[str, Any]:
    """Run the whole comparison and write its report into ``out``.

    Args:
        config: The settings.
        out: Output directory (created).
        show_progress: Progress bars and step messages.
        cache_dir: Where ground-truth retrainings are cached (default
            ``out/cache``); a second run with the same settings reuses them.

    Returns:
        The content of ``results.json``.
    """
    cfg = config
    out = os.fspath(out)
    os.makedirs(out, exist_ok=True)
    cache_dir = cache_dir or os.path.join(out, "cache")
    torch.manual_seed(cfg.seed)
    loss = torch.nn.CrossEntropyLoss(reduction="none")
    started = time.perf_counter()

    # ------------------------------------------------------------- model
    data = _load_data(cfg)
    model = build_model(cfg.model, data.image_shape, data.num_classes, seed=cfg.seed)
    record_dir = os.path.join(out, "trajectory")
    _say(
        show_progress,
        f"[1/5] SAM training {cfg.model} on {data.name} "
        f"({len(data.train)} examples, {int(data.noisy.sum())} planted noisy labels)",
    )
    train_sam(
        model,
        data.train,
        loss,
        epochs=cfg.epochs,
        lr=cfg.lr,
        rho=cfg.rho,
        batch_size=cfg.batch_size,
        weight_decay=cfg.weight_decay,
        record_dir=record_dir,
        seed=cfg.seed,
        adaptive=cfg.adaptive,
        show_progress=show_progress,
        overwrite=True,
    )
    traj = load_trajectory(record_dir)
    mode = cfg.resolved_ground_truth
    if mode == "fixed_point":
        fp = sam_fixed_point(model, data.train, loss, cfg.rho, cfg.weight_decay, cfg.adaptive)
        base, base_ckpt = fp.model, os.path.join(out, "fixed_point.pt")
        torch.save({"model_state": base.state_dict(), "learning_rate": 1.0}, base_ckpt)
        fixed_point_residual: float | None = fp.residual
    else:
        base, base_ckpt, fixed_point_residual = model, traj.final.path, None
    ctx = _Context(
        cfg,
        data,
        model,
        base,
        base_ckpt,
        record_dir,
        loss,
        data.test.tensors,
        data.val.tensors,
        [c.path for c in traj.checkpoints],
    )

    # ------------------------------------------------------------- ground truth
    _say(show_progress, f"[2/5] ground truth: retraining ({mode})")
    n = len(data.train)
    gt = GroundTruth(
        base,
        data.train,
        loss,
        mode,
        rho=cfg.rho,
        weight_decay=cfg.weight_decay,
        adaptive=cfg.adaptive,
        trajectory=traj,
        cache_dir=cache_dir,
    )
    g = torch.Generator().manual_seed(cfg.seed + 7)
    loo_idx = torch.randperm(n, generator=g)[: min(cfg.n_loo, n)].tolist()
    base_losses = loss(base.eval()(ctx.test[0]), ctx.test[1]).detach()
    loo = gt.evaluate([[k] for k in loo_idx], ctx.test, show_progress, "LOO retraining")
    loo_actual = loo.losses.sum(dim=1) - base_losses.sum()
    masks = random_subsets(n, cfg.lds_fraction, cfg.lds_subsets, cfg.seed + 11)
    lds_gt = gt.evaluate(
        [torch.nonzero(~m).flatten().tolist() for m in masks],
        ctx.test,
        show_progress,
        "LDS subset retraining",
    )
    edit_set = (
        torch.nonzero(data.noisy).flatten().tolist()
        if int(data.noisy.sum())
        else torch.randperm(n, generator=g)[: max(1, n // 20)].tolist()
    )
    edit_gt = gt.evaluate([edit_set], ctx.test, False)
    schedule_gt = (
        gt
        if mode == "schedule"
        else GroundTruth(model, data.train, loss, "schedule", trajectory=traj, cache_dir=cache_dir)
    )
    edit_gt_schedule = schedule_gt.evaluate([edit_set], ctx.test, False)
    retrain_seconds = float(loo.seconds.mean())

    # ------------------------------------------------------------- estimators
    _say(show_progress, f"[3/5] attribution with {len(cfg.rows())} estimators")
    rows: list[dict[str, Any]] = []
    scores: dict[str, dict[str, Any]] = {}
    for label, method, curvature in cfg.rows():
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            est = _build(ctx, method, curvature)
            s_test = est.influence(ctx.test, show_progress=False).detach()
        runtime = time.perf_counter() - start
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            ranking = detect_mislabeled(est, ctx.val, by="influence")
            self_scores = est.self_influence().detach().reshape(-1)
        row = _row_metrics(
            cfg,
            label,
            method,
            curvature,
            s_test,
            ranking.suspicion,
            self_scores,
            data.noisy,
            loo_idx,
            loo_actual,
            masks,
            lds_gt.losses,
        )
        row["runtime_s"] = runtime
        row["speedup_vs_retraining"] = retrain_seconds * n / runtime
        if hasattr(est, "edited_model"):
            edited = est.edited_model(edit_set)
            ref = edit_gt_schedule if method.startswith("sam-gif") else edit_gt
            origin = model if method.startswith("sam-gif") else base
            em = editing_metrics(
                list(edited.parameters()),
                [ref.params[0]],
                list(origin.parameters()),
                (
                    accuracy(edited, ctx.test),
                    float(ref.accuracies[0]),
                    accuracy(origin, ctx.test),
                ),
            )
            row.update(
                {
                    "edit_accuracy": em.edited_accuracy,
                    "retrained_accuracy": em.retrained_accuracy,
                    "original_accuracy": em.original_accuracy,
                    "edit_relative_distance": em.relative_distance,
                }
            )
        rows.append(row)
        scores[label] = {
            "test": s_test,
            "suspicion": ranking.suspicion,
            "self": self_scores,
            "estimator": est,
        }
        _say(
            show_progress,
            f"      {label:<26} {runtime:7.2f} s  LOO pearson "
            f"{row['loo_pearson']:+.3f}  LDS {row['lds']:+.3f}  AUC {row['mislabel_auc']:.3f}",
        )

    # ------------------------------------------------------------- applications
    primary = rows[0]["method"] if rows else None
    removal = None
    if int(data.noisy.sum()) and primary is not None:
        _say(show_progress, f"[4/5] harmful-data removal curve with {rows[0]['label']}")

        def retrain_acc(idx: list[int]) -> float:
            return float(gt.evaluate([idx], ctx.test, False).accuracies[0])

        key = "suspicion" if cfg.mislabel_by == "influence" else "self"
        removal = harmful_removal_curve(
            scores[rows[0]["label"]][key],
            retrain_acc,
            cfg.removal_fractions,
            data.noisy,
            seed=cfg.seed,
        )
    _say(show_progress, "[5/5] writing the report")
    results = {
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()},
        "ground_truth": {
            "mode": mode,
            "fixed_point_residual": fixed_point_residual,
            "retrain_seconds_mean": retrain_seconds,
            "n_loo": len(loo_idx),
            "lds_subsets": int(masks.shape[0]),
            "edit_set_size": len(edit_set),
            "retrained_accuracy": float(edit_gt.accuracies[0]),
        },
        "data": {
            "name": data.name,
            "n_train": n,
            "n_val": len(data.val),
            "n_test": len(data.test),
            "noisy": int(data.noisy.sum()),
        },
        "accuracy": {
            "trained": accuracy(model, ctx.test),
            "attribution_point": accuracy(base, ctx.test),
        },
        "methods": rows,
        "removal_curve": asdict(removal) if removal is not None else None,
        "seconds_total": time.perf_counter() - started,
    }
    _plots(out, ctx, rows, scores, loo_idx, loo_actual, removal, base)
    with open(os.path.join(out, "results.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2, default=float)
    with open(os.path.join(out, "report.md"), "w", encoding="utf-8") as f:
        f.write(_report(results))
    return results


def _row_metrics(
    cfg: CompareConfig,
    label: str,
    method: str,
    curvature: str | None,
    s_test: Tensor,
    suspicion: Tensor,
    self_scores: Tensor,
    noisy: Tensor,
    loo_idx: list[int],
    loo_actual: Tensor,
    masks: Tensor,
    lds_losses: Tensor,
) -> dict[str, Any]:
    predicted = s_test.sum(dim=0)[loo_idx]
    pearson, spear = loo_correlation(predicted, loo_actual)
    lds_mean, _ = lds(s_test, masks, lds_losses)
    row: dict[str, Any] = {
        "label": label,
        "method": method,
        "curvature": curvature,
        "description": METHODS[method],
        "loo_pearson": pearson,
        "loo_spearman": spear,
        "lds": lds_mean,
    }
    if int(noisy.sum()) and int((~noisy).sum()):
        by = suspicion if cfg.mislabel_by == "influence" else self_scores
        row.update(
            {
                "mislabel_auc": detection_auc(by, noisy),
                "recall_at_10": recall_at(by, noisy, 0.1),
                "recall_at_40": recall_at(by, noisy, 0.4),
                "mislabel_auc_influence": detection_auc(suspicion, noisy),
                "mislabel_auc_self": detection_auc(self_scores, noisy),
            }
        )
    else:
        row.update(
            {
                "mislabel_auc": float("nan"),
                "recall_at_10": float("nan"),
                "recall_at_40": float("nan"),
            }
        )
    return row
