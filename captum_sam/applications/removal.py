"""Harmful-data removal: retrain without the most harmful examples vs at random."""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from captum_sam.evaluation.metrics import top_count

__all__ = ["RemovalCurve", "harmful_removal_curve"]


@dataclass
class RemovalCurve:
    """Test accuracy after removing the top fraction by suspicion vs at random.

    Attributes:
        fractions: Fractions of the training set removed.
        accuracy_top: Accuracy after removing the most suspicious examples.
        accuracy_random: Mean accuracy after removing random examples.
        noisy_found: Fraction of the planted noisy labels among the removed (top)
            examples' share of all noisy labels (recall), if a mask was given.
    """

    fractions: list[float]
    accuracy_top: list[float]
    accuracy_random: list[float]
    noisy_found: list[float] = field(default_factory=list)


def harmful_removal_curve(
    suspicion: Tensor,
    retrain_accuracy: Callable[[list[int]], float],
    fractions: Sequence[float] = (0.0, 0.05, 0.1, 0.15, 0.2, 0.25),
    noisy: Tensor | None = None,
    random_repeats: int = 1,
    seed: int = 0,
    show_progress: bool = False,
) -> RemovalCurve:
    """The paper's Figure 2: remove the top x% by suspicion vs x% at random.

    Args:
        suspicion: ``(n_train,)``, higher = more harmful (e.g. minus the validation
            influence score from :func:`~captum_sam.applications.detect_mislabeled`).
        retrain_accuracy: Retrains without the given indices and returns the test
            accuracy (for instance with
            :func:`captum_sam.evaluation.retrain_loo`).
        fractions: Fractions to remove, each in ``[0, 1)``.
        noisy: Boolean mask of planted noisy labels, to report how many are found.
        random_repeats: Random removals averaged per fraction.
        seed: Seed of the random removals.
        show_progress: A progress bar over the fractions (each retrains
            ``1 + random_repeats`` times).

    Returns:
        A :class:`RemovalCurve`.

    Raises:
        ValueError / TypeError: A bad argument, before the first (slow) retraining.
    """
    noisy, random_repeats = _check_arguments(suspicion, fractions, noisy, random_repeats)
    n = suspicion.shape[0]
    order = torch.argsort(suspicion, descending=True, stable=True)
    g = torch.Generator().manual_seed(seed)
    curve = RemovalCurve([], [], [], [])
    cache: dict[tuple[int, ...], float] = {}

    def acc(idx: list[int]) -> float:
        key = tuple(sorted(idx))
        if key not in cache:
            cache[key] = float(retrain_accuracy(list(key)))
        return cache[key]

    from tqdm.auto import tqdm

    bar = tqdm(list(fractions), desc="harmful-data removal (retraining)", disable=not show_progress)
    for f in bar:
        m = top_count(f, n) if f > 0 else 0  # the top fraction f: ceil(f n), as recall_at
        top = order[:m].tolist()
        curve.fractions.append(float(f))
        curve.accuracy_top.append(acc(top))
        rand = [acc(torch.randperm(n, generator=g)[:m].tolist()) for _ in range(random_repeats)]
        curve.accuracy_random.append(sum(rand) / len(rand))
        if noisy is not None and int(noisy.sum()) > 0:
            curve.noisy_found.append(float(noisy[order[:m]].sum()) / float(noisy.sum()))
    return curve


def _check_arguments(
    suspicion: object, fractions: Sequence[float], noisy: object, random_repeats: object
) -> tuple[Tensor | None, int]:
    """Refuse what would fail (or mislead) only after retraining started.

    Returns:
        ``noisy`` as a boolean tensor (or ``None``) and ``random_repeats`` as an int.
    """
    if not isinstance(suspicion, Tensor) or suspicion.dim() != 1 or suspicion.numel() == 0:
        raise ValueError(
            "`suspicion` must be a non-empty 1-D tensor (one score per training example), "
            f"got {getattr(suspicion, 'shape', type(suspicion).__name__)}"
        )
    if not torch.isfinite(suspicion).all():
        bad = torch.nonzero(~torch.isfinite(suspicion)).flatten()[:5].tolist()
        raise ValueError(f"`suspicion` has NaN or infinite scores (examples {bad}...)")
    for f in fractions:
        if not 0 <= f < 1:
            raise ValueError(f"`fractions` must be in [0, 1), got {f}")
    try:
        repeats = operator.index(random_repeats)  # type: ignore[arg-type]
    except TypeError:
        repeats = None
    if isinstance(random_repeats, bool) or repeats is None:
        raise TypeError(f"`random_repeats` must be an int >= 1, got {random_repeats!r}")
    if repeats < 1:
        raise ValueError(f"`random_repeats` must be an int >= 1, got {random_repeats}")
    if noisy is not None:
        mask = torch.as_tensor(noisy)
        if tuple(mask.shape) != tuple(suspicion.shape):
            raise ValueError(
                f"`noisy` has shape {tuple(mask.shape)}, `suspicion` {tuple(suspicion.shape)}: "
                "both hold one entry per training example"
            )
        if mask.dtype != torch.bool and not bool(((mask == 0) | (mask == 1)).all()):
            raise TypeError("`noisy` must be a boolean (or 0/1) mask of the training set")
        return mask.to(torch.bool), repeats
    return None, repeats
