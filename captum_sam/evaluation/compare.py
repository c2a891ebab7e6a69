"""The side-by-side comparison behind ``captum-sam compare``.

One SAM-trained model with a recorded trajectory; every estimator (SAM-aware and
Captum's standard ones) attributes the same model; real retraining gives the
ground truth. :func:`run_compare` returns the results and writes ``report.md``,
``results.json`` and PNG plots; the report and the plots are written by
:mod:`captum_sam.evaluation.report`.
"""

from __future__ import annotations

import json
import math
import os
import time
import traceback
import warnings
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from captum_sam.applications import detect_mislabeled, harmful_removal_curve
from captum_sam.applications.removal import RemovalCurve
from captum_sam.core.files import atomic_write
from captum_sam.evaluation.config import PROTOCOLS
from captum_sam.evaluation.ground_truth import GroundTruth, RetrainResults
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
from captum_sam.evaluation.subsets import random_subsets
from captum_sam.models import build_model, training_dtype
from captum_sam.training import train_sam
from captum_sam.trajectory import Trajectory, load_trajectory

# SAM-GIF's linearised and segment edits take the removal convention of the schedule
# replay they are judged against: zero weight (batches still divided by |B_t|) only under
# --ground-truth schedule_zero_weight, else renormalised over the kept examples
SCHEDULE_REMOVAL = {"schedule_zero_weight": "zero_weight", "schedule": "renormalise"}

__all__ = ["run_compare", "format_table"]  # the settings: evaluation.config


def _say(show: bool, text: str) -> None:
    if show:
        print(text, flush=True)


def _fmt(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.3f}"


@dataclass
class _Truth:
    """What real retraining gave, shared by every estimator's metrics."""

    loo_idx: list[int]
    loo_actual: Tensor  # change of the summed test loss per removed example
    masks: Tensor  # LDS subsets, True = kept
    lds_losses: Tensor
    edit_set: list[int]
    edit: RetrainResults  # the edit set retrained away under the run's ground truth
    edit_schedule: RetrainResults  # ... and by replaying the recorded schedule
    schedule_mode: str  # "schedule" or "schedule_zero_weight": the replay edit_schedule used
    retrain_seconds: float


def run_compare(
    config: CompareConfig,
    out: str | os.PathLike[str],
    show_progress: bool = True,
    cache_dir: str | None = None,
    verbose: bool = True,
) -> dict[str, Any]:
    """Run the whole comparison and write its report into ``out``.

    An estimator that raises is reported in its row (``"error"``: the exception's type
    and message; ``"traceback"`` in ``results.json``) and the run goes on with the
    others; the report lists it. The warnings an estimator emits are kept in its row
    (``"warnings"``) instead of being printed between progress bars.

    Args:
        config: The settings.
        out: Output directory (created).
        show_progress: Progress bars (tqdm) inside every step.
        cache_dir: Where ground-truth retrainings are cached (default
            ``out/cache``); a second run with the same settings reuses them.
        verbose: The step lines (``[1/5] ...``) and one line per estimator, printed
            whatever ``show_progress`` says.

    Returns:
        The content of ``results.json``.
    """
    cfg = config
    out = os.fspath(out)
    os.makedirs(out, exist_ok=True)
    cache_dir = cache_dir or os.path.join(out, "cache")
    torch.manual_seed(cfg.seed)
    started = time.perf_counter()
    ctx, traj, fixed_point_residual = _train(cfg, out, show_progress, verbose)
    _say(verbose, f"[2/5] ground truth: retraining ({cfg.resolved_ground_truth})")
    gt, truth = _ground_truth(ctx, traj, cache_dir, show_progress)

    rows_to_run = cfg.rows()
    _say(verbose, f"[3/5] attribution with {len(rows_to_run)} estimators")
    rows: list[dict[str, Any]] = []
    scores: dict[str, dict[str, Any]] = {}
    for i, (label, method, curvature) in enumerate(rows_to_run, 1):
        _say(verbose, f"      ({i}/{len(rows_to_run)}) {label}: {METHODS[method]}")
        start = time.perf_counter()
        try:
            row, scores[label] = _attribute(ctx, truth, label, method, curvature, show_progress)
        except Exception as err:  # one estimator's failure must not lose the others' rows
            row = _failed_row(label, method, curvature, err, time.perf_counter() - start)
            _say(
                verbose, f"      {label:<26} FAILED after {row['runtime_s']:.1f} s: {row['error']}"
            )
        else:
            _say(
                verbose,
                f"      {label:<26} {row['runtime_s']:7.2f} s  LOO pearson "
                f"{row['loo_pearson']:+.3f}  LDS {row['lds']:+.3f}  "
                f"AUC {_fmt(row['mislabel_auc'])}",
            )
        rows.append(row)

    removal = _removal(ctx, gt, rows, scores, show_progress, verbose)
    _say(verbose, "[5/5] writing the report")
    results = _results(ctx, truth, rows, removal, fixed_point_residual)
    results["seconds_total"] = time.perf_counter() - started
    ok = [r for r in rows if "error" not in r]
    _plots(out, ctx, ok, scores, truth.loo_idx, truth.loo_actual, removal, ctx.base)
    text = json.dumps(_strict_json(results), indent=2, allow_nan=False).encode("utf-8")
    atomic_write(os.path.join(out, "results.json"), lambda f: f.write(text))
    report = _report(results).encode("utf-8")
    atomic_write(os.path.join(out, "report.md"), lambda f: f.write(report))  # written last
    return results


def _strict_json(value: Any) -> Any:
    """``value`` as standard JSON: NaN and infinities (a metric without data) become null."""
    if isinstance(value, dict):
        return {k: _strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict_json(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    number = float(value)  # floats, numpy and one-element torch scalars
    return number if math.isfinite(number) else None


def _train(
    cfg: CompareConfig, out: str, show_progress: bool, verbose: bool
) -> tuple[Context, Trajectory, float | None]:
    """Step 1: SAM training (recorded) and, for ``fixed_point``, the SAM fixed point."""
    loss = torch.nn.CrossEntropyLoss(reduction="none")
    data = load_data(cfg)
    model = build_model(
        cfg.model,
        data.image_shape,
        data.num_classes,
        seed=cfg.seed,
        dtype=training_dtype(cfg.model),
    )
    record_dir = os.path.join(out, "trajectory")
    _say(
        verbose,
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
    residual: float | None = None
    if cfg.resolved_ground_truth.startswith("fixed_point"):
        _say(verbose, "      Newton to the full-batch SAM fixed point (the attribution point)")
        fp = sam_fixed_point(model, data.train, loss, cfg.rho, cfg.weight_decay, cfg.adaptive)
        base, base_ckpt = fp.model, os.path.join(out, "fixed_point.pt")
        state = {"model_state": base.state_dict(), "learning_rate": 1.0}
        atomic_write(base_ckpt, lambda f: torch.save(state, f))
        residual = fp.residual
    else:
        base, base_ckpt = model, traj.final.path
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
    return ctx, traj, residual


def _ground_truth(
    ctx: Context, traj: Trajectory, cache_dir: str, show_progress: bool
) -> tuple[GroundTruth, _Truth]:
    """Step 2: leave-one-out, LDS-subset and edit-set retraining."""
    cfg, data, loss = ctx.config, ctx.data, ctx.loss
    mode = cfg.resolved_ground_truth
    n = len(data.train)
    gt = GroundTruth(
        ctx.base,
        data.train,
        loss,
        mode,
        rho=cfg.rho,
        weight_decay=cfg.weight_decay,
        adaptive=cfg.adaptive,
        trajectory=traj,
        cache_dir=cache_dir,
        seeds=cfg.gt_seeds,
    )
    g = torch.Generator().manual_seed(cfg.seed + 7)
    loo_idx = torch.randperm(n, generator=g)[: cfg.n_loo].tolist()
    base_losses = loss(ctx.base.eval()(ctx.test[0]), ctx.test[1]).detach()
    loo = gt.evaluate([[k] for k in loo_idx], ctx.test, show_progress, "LOO retraining")
    masks = random_subsets(
        n, cfg.lds_subsets, sampler=cfg.lds_sampler, fraction=cfg.lds_fraction, seed=cfg.seed + 11
    )
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
    edit = gt.evaluate([edit_set], ctx.test, show_progress, "edit-set retraining")
    schedule_gt = (
        gt
        if mode.startswith("schedule")  # SAM-GIF's edits: against the run's replay convention
        else GroundTruth(
            ctx.model, data.train, loss, "schedule", trajectory=traj, cache_dir=cache_dir
        )
    )
    edit_schedule = schedule_gt.evaluate(
        [edit_set], ctx.test, show_progress, "edit-set retraining (schedule)"
    )
    truth = _Truth(
        loo_idx=loo_idx,
        loo_actual=loo.losses.sum(dim=1) - base_losses.sum(),
        masks=masks,
        lds_losses=lds_gt.losses,
        edit_set=edit_set,
        edit=edit,
        edit_schedule=edit_schedule,
        schedule_mode=schedule_gt.mode,
        retrain_seconds=float(loo.seconds.mean()),
    )
    return gt, truth


def _attribute(
    ctx: Context,
    truth: _Truth,
    label: str,
    method: str,
    curvature: str | None,
    show_progress: bool,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Step 3 for one estimator: its row of metrics and its scores."""
    cfg = ctx.config
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        est = build_estimator(ctx, method, curvature, show_progress=show_progress)
        s_test = est.influence(ctx.test, show_progress=show_progress).detach()
        runtime = time.perf_counter() - start
        ranking = detect_mislabeled(est, ctx.val, by="influence", show_progress=show_progress)
        self_scores = est.self_influence(show_progress=show_progress).detach().reshape(-1)
        row = _row_metrics(
            cfg,
            label,
            method,
            curvature,
            s_test,
            ranking.suspicion,
            self_scores,
            ctx.data.noisy,
            truth.loo_idx,
            truth.loo_actual,
            truth.masks,
            truth.lds_losses,
        )
        row["runtime_s"] = runtime
        row["damping"] = damping_label(getattr(est, "damping_used", None), est)
        row["speedup_vs_retraining"] = truth.retrain_seconds * len(ctx.data.train) / runtime
        if hasattr(est, "edited_model"):
            row.update(_edit_metrics(ctx, truth, est, method))
    row["warnings"] = sorted({f"{w.category.__name__}: {w.message}" for w in caught})
    entry = {"test": s_test, "suspicion": ranking.suspicion, "self": self_scores, "estimator": est}
    return row, entry


def damping_label(used: float | dict[str, float] | None, est: Any) -> str | None:
    """The report's damping cell: ``"0.0123 (auto)"``, ``"0.01"``, per-layer range, ``None``."""
    if used is None:
        return None
    if isinstance(used, dict):  # K-FAC: d per layer
        low, high = min(used.values()), max(used.values())
        text = f"per layer {low:.3g}-{high:.3g}"
    else:
        text = f"{used:.3g}"
    return f"{text} (auto)" if getattr(est, "damping_auto", False) else text


def _edit_metrics(ctx: Context, truth: _Truth, est: Any, method: str) -> dict[str, float]:
    """Edit the model to forget the edit set; compare with really retraining without it."""
    trajectory_form = method.startswith("sam-gif")
    # the gradient rows edit by the linearised replay (trajectory form) or by segments
    # (checkpoint form), under the removal convention of the schedule ground truth they
    # are compared with
    removal = SCHEDULE_REMOVAL[truth.schedule_mode]
    if method == "sam-gif":
        edited = est.edited_model(truth.edit_set, method="linearised", removal=removal)
    elif method == "sam-gif-ckpt":  # no batch record: SOURCE-style segments per epoch
        cfg = ctx.config
        edited = est.edited_model(
            truth.edit_set,
            method="segment",
            removal=removal,
            steps_per_checkpoint=-(-len(ctx.data.train) // cfg.batch_size),
            weight_decay=cfg.weight_decay,
        )
    else:
        edited = est.edited_model(truth.edit_set)
    ref = truth.edit_schedule if trajectory_form else truth.edit
    origin = ctx.model if trajectory_form else ctx.base
    em = editing_metrics(
        list(edited.parameters()),
        [ref.params[0]],
        list(origin.parameters()),
        (accuracy(edited, ctx.test), float(ref.accuracies[0]), accuracy(origin, ctx.test)),
    )
    return {
        "edit_accuracy": em.edited_accuracy,
        "retrained_accuracy": em.retrained_accuracy,
        "original_accuracy": em.original_accuracy,
        "edit_relative_distance": em.relative_distance,
    }


def _failed_row(
    label: str, method: str, curvature: str | None, err: Exception, seconds: float
) -> dict[str, Any]:
    """The row of an estimator that raised: its reason instead of metrics."""
    reason = " ".join(str(err).split()) or "(no message)"
    return {
        "label": label,
        "method": method,
        "curvature": curvature,
        "description": METHODS[method],
        "error": f"{type(err).__name__}: {reason}",
        "traceback": "".join(traceback.format_exception(err)),
        "runtime_s": seconds,
    }


def _removal(
    ctx: Context,
    gt: GroundTruth,
    rows: list[dict[str, Any]],
    scores: dict[str, dict[str, Any]],
    show_progress: bool,
    verbose: bool,
) -> RemovalCurve | None:
    """Step 4: retrain without the top-ranked "harmful" examples vs random ones."""
    cfg, noisy = ctx.config, ctx.data.noisy
    first = next((r for r in rows if "error" not in r), None)
    if not int(noisy.sum()) or first is None:
        reason = "no planted noisy labels (--noise 0)" if first else "every estimator failed"
        _say(verbose, f"[4/5] harmful-data removal curve skipped: {reason}")
        return None
    _say(verbose, f"[4/5] harmful-data removal curve with {first['label']}")

    def retrain_acc(idx: list[int]) -> float:
        return float(gt.evaluate([idx], ctx.test, False).accuracies[0])

    key = "suspicion" if cfg.mislabel_by == "influence" else "self"
    return harmful_removal_curve(
        scores[first["label"]][key],
        retrain_acc,
        cfg.removal_fractions,
        noisy,
        random_repeats=cfg.removal_repeats,
        seed=cfg.seed,
        show_progress=show_progress,
    )


def _results(
    ctx: Context,
    truth: _Truth,
    rows: list[dict[str, Any]],
    removal: RemovalCurve | None,
    fixed_point_residual: float | None,
) -> dict[str, Any]:
    """The content of ``results.json`` (without the total time)."""
    cfg, data = ctx.config, ctx.data
    first = next((r for r in rows if "error" not in r), None)
    return {
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()},
        "ground_truth": {
            "mode": cfg.resolved_ground_truth,
            "protocol": PROTOCOLS[cfg.resolved_ground_truth],
            "seeds": list(cfg.gt_seeds) if cfg.resolved_ground_truth == "fresh" else None,
            "lds_sampler": cfg.lds_sampler,
            "fixed_point_residual": fixed_point_residual,
            "retrain_seconds_mean": truth.retrain_seconds,
            "n_loo": len(truth.loo_idx),
            "lds_subsets": int(truth.masks.shape[0]),
            "edit_set_size": len(truth.edit_set),
            "retrained_accuracy": float(truth.edit.accuracies[0]),
        },
        "data": {
            "name": data.name,
            "n_train": len(data.train),
            "n_val": len(data.val),
            "n_test": len(data.test),
            "noisy": int(data.noisy.sum()),
        },
        "accuracy": {
            "trained": accuracy(ctx.model, ctx.test),
            "attribution_point": accuracy(ctx.base, ctx.test),
        },
        "methods": rows,
        "removal_curve": asdict(removal) if removal is not None else None,
        "removal_ranked_by": first["label"] if removal is not None and first else None,
    }


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
