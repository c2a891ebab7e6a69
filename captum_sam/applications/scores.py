"""Influence scores on a validation set, mislabel detection and model editing."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

__all__ = ["influence_scores", "detect_mislabeled", "edit_model", "Ranking", "DETECT_BY"]

DETECT_BY = ("influence", "self")


def influence_scores(
    estimator: Any, val_data: tuple[Any, ...] | DataLoader, show_progress: bool = False
) -> Tensor:
    r"""Influence score of every training example on a validation set (Theorem 4.8).

    :math:`IS_k = \sum_{z \in D_{val}} \mathrm{score}(z, z_k)`: the first-order
    increase of the summed validation loss when :math:`z_k` is removed. Positive:
    valuable; negative: harmful.

    Args:
        estimator: A ``captum_sam`` estimator or a Captum ``TracInCP`` /
            ``NaiveInfluenceFunction`` / ``ArnoldiInfluenceFunction``.
        val_data: Validation batch ``(features..., labels)`` or a DataLoader.
        show_progress: Progress bars.

    Returns:
        ``(n_train,)`` scores.
    """
    try:
        out = estimator.influence(val_data, show_progress=show_progress, aggregate=True)
        return out.reshape(-1)
    except TypeError as err:  # Captum's influence functions have no `aggregate`
        if "aggregate" not in str(err):
            raise
    batches = val_data if isinstance(val_data, DataLoader) else [val_data]
    total = None
    for batch in batches:
        part = estimator.influence(tuple(batch), show_progress=show_progress).sum(dim=0)
        total = part if total is None else total + part
    if total is None:
        raise ValueError("`val_data` is empty")
    return total


@dataclass
class Ranking:
    """Training examples ranked from most to least suspicious.

    Attributes:
        indices: Training indices, most suspicious first ``(n_train,)``.
        suspicion: Suspicion per training index ``(n_train,)`` (higher = more
            suspicious): minus the validation influence score, or self influence.
        by: ``"influence"`` or ``"self"``.
    """

    indices: Tensor
    suspicion: Tensor
    by: str

    def top(self, fraction: float) -> Tensor:
        """The most suspicious ``fraction`` of the training set (the first ceil(f n))."""
        if not 0 <= fraction <= 1:
            raise ValueError(f"`fraction` must be in [0, 1], got {fraction}")
        from captum_sam.evaluation.metrics import top_count

        return self.indices[: top_count(fraction, len(self.indices))]


def detect_mislabeled(
    estimator: Any,
    val_data: tuple[Any, ...] | DataLoader | None = None,
    by: str = "influence",
    show_progress: bool = False,
) -> Ranking:
    """Rank training examples by how likely their label is wrong.

    Args:
        estimator: An influence estimator (see :func:`influence_scores`).
        val_data: Clean validation data, needed for ``by="influence"``.
        by: ``"influence"``: most negative validation influence score first (the
            paper's harmful data); ``"self"``: highest self influence first.
        show_progress: Progress bars.

    Returns:
        A :class:`Ranking`.
    """
    if by not in DETECT_BY:
        raise ValueError(f"`by` must be one of {DETECT_BY}, got {by!r}")
    if by == "influence":
        if val_data is None:
            raise ValueError("`val_data` is required with by='influence'")
        suspicion = -influence_scores(estimator, val_data, show_progress)
    else:
        suspicion = estimator.self_influence(show_progress=show_progress).reshape(-1)
    if not torch.isfinite(suspicion).all():
        raise ValueError("the scores contain NaN or inf")
    order = torch.argsort(suspicion, descending=True, stable=True)
    return Ranking(indices=order, suspicion=suspicion, by=by)


def edit_model(estimator: Any, remove_indices: Sequence[int] | Tensor, **options: Any) -> nn.Module:
    """The approximately retrained model without ``remove_indices`` (a new model).

    Args:
        estimator: :class:`~captum_sam.SAMTracInCP` (GIF edit) or
            :class:`~captum_sam.SAMInfluenceFunction` (HIF edit).
        remove_indices: Training indices to forget.
        **options: Passed to the estimator's ``edited_model``, e.g.
            ``method="segment"`` for a checkpoint-form ``SAMTracInCP``.

    Returns:
        A copy of the model with the estimated parameter change applied.
    """
    if not hasattr(estimator, "edited_model"):
        raise TypeError(
            f"{type(estimator).__name__} cannot edit a model; use SAMTracInCP or "
            "SAMInfluenceFunction"
        )
    return estimator.edited_model(remove_indices, **options)
