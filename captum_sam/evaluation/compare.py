"""The side-by-side comparison behind ``captum-sam compare``.

One SAM-trained model with a recorded trajectory; every estimator (SAM-aware and
Captum's standard ones) attributes the same model; real retraining gives the
ground truth. :func:`run_compare` returns the results and writes ``report.md``,
``results.json`` and PNG plots; the report and the plots are written by
:mod:`captum_sam.evaluation.report`.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from dataclasses import asdict
from typing import Any

import torch
from torch import Tensor

from captum_sam.applications import detect_mislabeled, harmful_removal_curve
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
from captum_sam.evaluation.setup import (
    METHODS,
    CompareConfig,
    Context,
    build_estimator,
    load_data,
)
from captum_sam.models import build_model
from captum_sam.training import train_sam
from captum_sam.trajectory import load_trajectory

__all__ = ["METHODS", "CompareConfig", "run_compare", "format_table"]


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
    data = load_data(cfg)
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
    ctx = Context(
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
            est = build_estimator(ctx, method, curvature)
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
