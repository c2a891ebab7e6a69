r"""Metrics of attribution quality, in plain numpy (no scipy needed at run time).

Conventions: a *score* array holds one number per training example; higher means
"more suspicious" for detection metrics. Correlations return ``nan`` when an input
is constant or holds a NaN (as scipy's); detection metrics and LDS refuse NaN or
infinite scores and losses with a ``ValueError`` (a failed estimator or retraining
must not be ranked). "The top fraction f" of ``n`` examples is the first
:math:`\lceil f n \rceil`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "accuracy",
    "rankdata",
    "pearson",
    "spearman",
    "loo_correlation",
    "detection_auc",
    "recall_at",
    "recall_curve",
    "lds",
    "top_count",
    "EditingMetrics",
    "editing_metrics",
]


def _array(x: Any, name: str, finite: bool = False) -> np.ndarray:
    a = np.asarray(x.detach().cpu() if hasattr(x, "detach") else x, dtype=np.float64)
    if a.ndim != 1:
        raise ValueError(f"`{name}` must be 1-D, got shape {a.shape}")
    if finite:
        _require_finite(a, name)
    return a


def _require_finite(a: np.ndarray, name: str) -> None:
    if not np.isfinite(a).all():
        bad = np.argwhere(~np.isfinite(a))[:3].tolist()
        raise ValueError(f"`{name}` holds NaN or infinite values (at {bad}...)")


def _boolean(values: Any, message: str) -> np.ndarray:
    """``values`` (booleans or 0/1, array or tensor) as a boolean array; else ``message``."""
    raw = np.asarray(values.cpu() if hasattr(values, "cpu") else values)
    if raw.dtype != bool and not np.isin(raw, (0, 1)).all():
        raise ValueError(message)
    return raw.astype(bool)


def _mask(positives: Any, like: np.ndarray) -> np.ndarray:
    """``positives`` as a boolean mask of ``like``'s shape (``ValueError`` otherwise)."""
    raw = np.asarray(positives.cpu() if hasattr(positives, "cpu") else positives)
    if raw.shape != like.shape:
        raise ValueError(f"`positives` shape {raw.shape} differs from `scores` {like.shape}")
    return _boolean(raw, "`positives` must be a boolean mask (or 0/1), not indices")


def top_count(fraction: float, n: int) -> int:
    r"""How many of ``n`` examples "the top ``fraction``" is: :math:`\lceil f n \rceil`."""
    return min(n, math.ceil(fraction * n - 1e-9))


def accuracy(model: Any, batch: Sequence[Any]) -> float:
    """Classification accuracy of ``model`` on ``(features..., labels)`` held in memory.

    The model is evaluated in eval mode and every sub-module's train/eval flag restored.
    """
    import torch

    from captum_sam.core.params import eval_mode

    with eval_mode(model), torch.no_grad():
        out = model(*batch[:-1])
    predicted, labels = out.argmax(dim=1), batch[-1]
    if tuple(labels.shape) != tuple(predicted.shape):
        raise ValueError(
            f"labels have shape {tuple(labels.shape)}, the predictions {tuple(predicted.shape)}: "
            "pass one class index per example"
        )
    return float((predicted == labels).double().mean())


def rankdata(values: Any) -> np.ndarray:
    """Ranks starting at 1, ties given their average rank (like scipy's default)."""
    a = _array(values, "values")
    order = np.argsort(a, kind="mergesort")
    ranks = np.empty(len(a), dtype=np.float64)
    ranks[order] = np.arange(1, len(a) + 1)
    sorted_a = a[order]
    start = 0
    for i in range(1, len(a) + 1):  # average over runs of equal values
        if i == len(a) or sorted_a[i] != sorted_a[start]:
            if i - start > 1:
                ranks[order[start:i]] = (start + 1 + i) / 2.0
            start = i
    return ranks


def pearson(x: Any, y: Any) -> float:
    """Pearson correlation of two equal-length 1-D arrays."""
    a, b = _array(x, "x"), _array(y, "y")
    if a.shape != b.shape or len(a) < 2:
        raise ValueError(f"need two arrays of equal length >= 2, got {a.shape} and {b.shape}")
    if np.isnan(a).any() or np.isnan(b).any() or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")  # (a constant's centred values are rounding residues)
    a, b = a - a.mean(), b - b.mean()
    denom = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / denom) if denom > 0 else float("nan")


def spearman(x: Any, y: Any) -> float:
    """Spearman rank correlation (Pearson of average ranks); ``nan`` if a value is NaN."""
    a, b = _array(x, "x"), _array(y, "y")
    if np.isnan(a).any() or np.isnan(b).any():
        return float("nan")
    return pearson(rankdata(a), rankdata(b))


def loo_correlation(predicted: Any, actual: Any) -> tuple[float, float]:
    """``(pearson, spearman)`` between predicted and actual changes of a loss."""
    return pearson(predicted, actual), spearman(predicted, actual)


def detection_auc(scores: Any, positives: Any) -> float:
    """Area under the ROC curve of ``scores`` for the boolean ``positives``.

    Args:
        scores: Higher means more likely positive (e.g. minus the validation
            influence score, or self influence), ``(n,)``.
        positives: Boolean ``(n,)`` (e.g. the planted noisy labels).

    Returns:
        The Mann-Whitney estimate with average ranks for ties; 0.5 is random.
    """
    s = _array(scores, "scores", finite=True)
    pos = _mask(positives, s)
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("`positives` must contain both positive and negative examples")
    ranks = rankdata(s)
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def recall_curve(scores: Any, positives: Any) -> tuple[np.ndarray, np.ndarray]:
    """Fraction of positives found against the fraction of data examined.

    Examples are examined from the highest score down (ties in index order).

    Returns:
        ``(fraction_examined, fraction_found)``, each ``(n + 1,)`` starting at 0.
    """
    s = _array(scores, "scores", finite=True)
    pos = _mask(positives, s)
    if pos.sum() == 0:
        raise ValueError("`positives` has no positive example")
    order = np.argsort(-s, kind="mergesort")
    found = np.concatenate([[0], np.cumsum(pos[order])]) / pos.sum()
    examined = np.arange(len(s) + 1) / len(s)
    return examined, found


def recall_at(scores: Any, positives: Any, fraction: float) -> float:
    """Fraction of positives among the top ``fraction`` (:func:`top_count`) by score."""
    if not 0 < fraction <= 1:
        raise ValueError(f"`fraction` must be in (0, 1], got {fraction}")
    examined, found = recall_curve(scores, positives)
    return float(found[top_count(fraction, len(examined) - 1)])


def lds(
    scores: Any, subsets: Any, losses: Any, base_losses: Any | None = None
) -> tuple[float, np.ndarray]:
    r"""Linear datamodeling score (LDS) from retraining on random subsets.

    For each test example :math:`z` the prediction for a subset :math:`S` is the
    first-order change of its loss when the complement is removed,
    :math:`\sum_{k \notin S} \mathrm{score}(z, k)`; LDS is the Spearman correlation
    across subsets between prediction and the loss of the model retrained on
    :math:`S`, averaged over test examples. Since the total attribution is fixed
    per :math:`z`, this is minus the Spearman correlation of the subset's summed
    attribution with the loss, so higher is better for both conventions.

    Args:
        scores: Attributions ``(n_test, n_train)`` (positive = helpful).
        subsets: Boolean masks ``(M, n_train)`` of the kept examples.
        losses: Test losses ``(M, n_test)`` of the retrained models.
        base_losses: Unused by the rank statistic; accepted for symmetry with
            reports that show the changes.

    Returns:
        ``(mean LDS, per-test-example LDS (n_test,))``; test examples whose actual
        losses do not vary are skipped (``nan``).
    """
    s = np.asarray(scores.detach().cpu() if hasattr(scores, "detach") else scores, dtype=np.float64)
    keep = _boolean(subsets, "`subsets` must be boolean masks (or 0/1) of the kept examples")
    loss = np.asarray(
        losses.detach().cpu() if hasattr(losses, "detach") else losses, dtype=np.float64
    )
    if s.ndim != 2 or keep.ndim != 2 or loss.ndim != 2:
        raise ValueError("`scores`, `subsets` and `losses` must be 2-D")
    _require_finite(s, "scores")
    _require_finite(loss, "losses")
    if keep.shape[1] != s.shape[1] or loss.shape != (keep.shape[0], s.shape[0]):
        raise ValueError(
            f"shapes disagree: scores {s.shape}, subsets {keep.shape}, losses {loss.shape}"
        )
    if keep.shape[0] < 3:
        raise ValueError("LDS needs at least 3 subsets")
    predicted = (~keep).astype(np.float64) @ s.T  # (M, n_test)
    per_example = np.array(
        [
            spearman(predicted[:, j], loss[:, j]) if np.ptp(loss[:, j]) > 0 else np.nan
            for j in range(s.shape[0])
        ]
    )
    return float(np.nanmean(per_example)), per_example


@dataclass(frozen=True)
class EditingMetrics:
    """An edited model against the retrained one."""

    edited_accuracy: float
    retrained_accuracy: float
    original_accuracy: float
    relative_distance: float  # ||w_edit - w_retrain|| / ||w_retrain - w_original||


def editing_metrics(
    edited_params: Sequence[Any],
    retrained_params: Sequence[Any],
    original_params: Sequence[Any],
    accuracies: tuple[float, float, float],
) -> EditingMetrics:
    """Parameter distance and accuracies of an approximate edit.

    Args:
        edited_params: Parameters of the edited model.
        retrained_params: Parameters of the model retrained without the set.
        original_params: Parameters of the original model.
        accuracies: ``(edited, retrained, original)`` test accuracies.

    Returns:
        The metrics; ``relative_distance`` 0 is a perfect edit, 1 is no better than
        not editing at all.
    """

    def flat(ps: Sequence[Any]) -> np.ndarray:
        return np.concatenate(
            [
                np.asarray(
                    p.detach().cpu() if hasattr(p, "detach") else p, dtype=np.float64
                ).ravel()
                for p in ps
            ]
        )

    e, r, o = flat(edited_params), flat(retrained_params), flat(original_params)
    if not e.shape == r.shape == o.shape:
        raise ValueError(
            f"the parameter lists hold {e.size}, {r.size} and {o.size} numbers: pass the "
            "same model's parameters three times (edited, retrained, original)"
        )
    moved = np.linalg.norm(r - o)
    distance = float(np.linalg.norm(e - r) / moved) if moved > 0 else float("nan")
    return EditingMetrics(
        edited_accuracy=float(accuracies[0]),
        retrained_accuracy=float(accuracies[1]),
        original_accuracy=float(accuracies[2]),
        relative_distance=distance,
    )
