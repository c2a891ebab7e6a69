r"""Ground-truth retraining runs, cached on disk, for LOO, LDS and editing.

:class:`GroundTruth` retrains without given examples under one of the protocols of
:data:`~captum_sam.evaluation.config.PROTOCOLS` (the SAM fixed point, the replayed
schedule, fresh seeded retraining; renormalised over the kept examples or, explicitly
named, with zero weights) and evaluates on a test set; results are cached in a verified
directory per set of inputs (:mod:`captum_sam.evaluation.truth_cache` describes the
layout and what is checked).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from captum_sam.core import eval_mode
from captum_sam.core.data import check_indices
from captum_sam.core.errors import user_stacklevel
from captum_sam.core.files import (
    sha256_file,
)
from captum_sam.core.losses import checked_losses
from captum_sam.evaluation.retrain import SCHEDULE_MODES, check_mode, retrain_once
from captum_sam.evaluation.subsets import check_masks, random_subsets
from captum_sam.evaluation.truth_cache import (
    LEGACY_ROW,
    CacheDirectory,
    dataset_identity,
    loss_identity,
    model_identity,
    sha,
    trajectory_identity,
)
from captum_sam.trajectory import Trajectory, load_trajectory

__all__ = ["GroundTruth", "RetrainResults", "random_subsets", "loo_scores", "lds_scores"]


@dataclass
class RetrainResults:
    """Test-set results of one retraining per removal.

    Attributes:
        losses: Per-example test losses ``(R, n_test)``.
        accuracies: Test accuracies ``(R,)``.
        seconds: Wall time of each retraining ``(R,)`` (as measured when computed,
            also when read back from the cache).
        params: Flat parameters of each retrained model ``(R, P)``.
    """

    losses: Tensor
    accuracies: Tensor
    seconds: Tensor
    params: Tensor


# --------------------------------------------------------------------------- key fields


@dataclass
class GroundTruth:
    r"""Real SAM retraining without given examples, evaluated on a test set.

    Args:
        model: ``"fixed_point"``: the full-data fixed point (start of Newton);
            ``"schedule"``: a model with the recorded architecture.
        dataset: The training set.
        loss_fn: Per-example loss, shape ``(B,)`` or ``(B, ...)``.
        mode: A protocol of :data:`~captum_sam.evaluation.config.PROTOCOLS`:
            ``"fixed_point"``, ``"schedule"`` (the kept examples renormalised, "trained
            without"), ``"fixed_point_zero_weight"``, ``"schedule_zero_weight"`` (removed
            examples weighted 0) or ``"fresh"`` (see :mod:`captum_sam.evaluation.retrain`).
        rho: SAM radius (fixed point).
        weight_decay: :math:`\lambda` (fixed point).
        adaptive: ASAM (fixed point).
        trajectory: Record directory to replay (the other protocols).
        tol: Fixed-point residual target.
        cache_dir: Directory where each retraining's results are stored, keyed by a
            hash of everything that determines them and verified on reading (see the
            module's docstring); ``None`` disables caching.
        seeds: Batch-order seeds of ``"fresh"``: one retraining per seed, the test
            losses, accuracies and parameters averaged over them.
    """

    model: nn.Module
    dataset: Dataset
    loss_fn: Callable[[Any, Any], Tensor]
    mode: str
    rho: float = 0.0
    weight_decay: float = 0.0
    adaptive: bool = False
    trajectory: str | Trajectory | None = None
    tol: float = 1e-10
    cache_dir: str | None = None
    seeds: tuple[int, ...] = (0, 1, 2)
    _inputs: dict[str, Any] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        check_mode(self.mode, self.rho, self.weight_decay, self.trajectory)
        if isinstance(self.seeds, int) or not self.seeds:
            raise ValueError(f"`seeds` must be a non-empty sequence of ints, got {self.seeds!r}")
        self.seeds = tuple(int(s) for s in self.seeds)
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"`seeds` must be distinct, got {self.seeds}")
        if self.mode in SCHEDULE_MODES and not isinstance(self.trajectory, Trajectory):
            self.trajectory = load_trajectory(self.trajectory)  # type: ignore[arg-type]
        # the slow parts of the key, once; the weights and files are hashed per evaluate()
        self._inputs = {
            "dataset": dataset_identity(self.dataset),
            "trajectory": trajectory_identity(self.trajectory)  # type: ignore[arg-type]
            if self.mode in SCHEDULE_MODES
            else None,
        }

    @property
    def removal(self) -> str:
        """``"zero_weight"`` or ``"renormalised"`` (the mean over the kept examples)."""
        return "zero_weight" if self.mode.endswith("_zero_weight") else "renormalised"

    def retrain(self, removed: Sequence[int], seed: int | None = None) -> nn.Module:
        """A new model retrained without ``removed`` (``"fresh"``: batch-order ``seed``)."""
        return retrain_once(
            self.model,
            self.dataset,
            self.loss_fn,
            list(removed),
            self.mode,
            rho=self.rho,
            weight_decay=self.weight_decay,
            adaptive=self.adaptive,
            trajectory=self.trajectory,
            tol=self.tol,
            seed=self.seeds[0] if seed is None else seed,
        )

    def cache_fields(self, test_data: tuple[Tensor, ...]) -> dict[str, Any]:
        """What the cached results depend on (their key is the SHA-256 of this dict).

        The protocol, its removal convention (``"renormalised"`` or ``"zero_weight"``)
        and seeds (``"fresh"``), the settings, the loss's identity, the starting weights
        (fixed point) or the architecture (the others load the initial checkpoint), the
        training data, the replayed schedule and the SHA-256 of the initial checkpoint
        file the replay reads, and the test data.
        """
        schedule = self.mode in SCHEDULE_MODES
        traj: Trajectory | None = self.trajectory if schedule else None  # type: ignore[assignment]
        return {
            "mode": self.mode,
            "removal": self.removal,
            "seeds": list(self.seeds) if self.mode == "fresh" else None,
            "rho": None if schedule else float(self.rho),
            "weight_decay": None if schedule else float(self.weight_decay),
            "adaptive": None if schedule else bool(self.adaptive),
            "tol": None if schedule else float(self.tol),
            "loss": loss_identity(self.loss_fn),
            "model": model_identity(self.model, weights=not schedule),
            **self._inputs,
            "initial_checkpoint_sha256": sha256_file(traj.initial.path) if traj else None,
            "test_data": sha(list(test_data)),
        }

    def evaluate(
        self,
        removals: Sequence[Sequence[int]],
        test_data: tuple[Tensor, ...],
        show_progress: bool = False,
        desc: str = "retraining",
    ) -> RetrainResults:
        """Retrain once per removal (cached) and evaluate on ``test_data``.

        Args:
            removals: Index lists, one retraining each.
            test_data: ``(features..., labels)`` in memory.
            show_progress: Progress bar.
            desc: Its label.

        Returns:
            Losses ``(R, n_test)``, accuracies, seconds ``(R,)`` and parameters ``(R, P)``.

        Raises:
            ValueError: A cache file was changed after it was written, or does not
                have the expected fields, shapes or dtypes (the message names the
                file and the field); another writer holds the cache directory for more
                than :data:`LOCK_TIMEOUT` seconds. Unreadable or unlisted cache files
                are recomputed with a warning instead.
        """
        from tqdm.auto import tqdm

        test_data = tuple(test_data)
        cache = self._open_cache(test_data) if self.cache_dir is not None else None
        rows = []
        n = len(self.dataset)  # type: ignore[arg-type]
        sets = [check_indices(r, n, "removals", allow_empty=True) for r in removals]  # (first)
        for removed in tqdm(sets, desc=desc, disable=not show_progress):
            row = cache.read(removed) if cache is not None else None
            if row is None:
                row = self._retrain_row(removed, test_data)
                if cache is not None:
                    cache.write(removed, row)
            rows.append(row)
        return RetrainResults(
            losses=torch.stack([r["losses"] for r in rows]),
            accuracies=torch.stack([r["accuracy"] for r in rows]),
            seconds=torch.stack([r["seconds"] for r in rows]),
            params=torch.stack([r["params"] for r in rows]),
        )

    def _retrain_row(self, removed: list[int], test_data: tuple[Tensor, ...]) -> dict[str, Tensor]:
        """One row; ``"fresh"``: each field the mean over the seeds (seconds: their total)."""
        seeds = self.seeds if self.mode == "fresh" else self.seeds[:1]
        start, rows = time.perf_counter(), []
        for seed in seeds:
            model = self.retrain(removed, seed) if self.mode == "fresh" else self.retrain(removed)
            params = torch.cat([p.detach().reshape(-1).cpu() for p in model.parameters()])
            rows.append({**self._test(model, test_data), "params": params})
        row = {k: torch.stack([r[k] for r in rows]).mean(dim=0) for k in rows[0]}
        row["seconds"] = torch.tensor(time.perf_counter() - start, dtype=torch.float64)
        return row

    def _open_cache(self, test_data: tuple[Tensor, ...]) -> CacheDirectory:
        cache_dir = os.fspath(self.cache_dir)  # type: ignore[arg-type]
        legacy = sorted(
            name
            for name in (os.listdir(cache_dir) if os.path.isdir(cache_dir) else [])
            if LEGACY_ROW.fullmatch(name) and name.startswith(self.mode + "-")
        )
        if legacy:
            warnings.warn(
                f"`cache_dir` {cache_dir!r} holds {len(legacy)} ground-truth files written by "
                f"an older version without a manifest (e.g. {legacy[0]!r}): they are not "
                "trusted and never served, the rows are recomputed; the old files are left "
                "in place (delete them to silence this warning)",
                stacklevel=user_stacklevel(),
            )
        fields = self.cache_fields(test_data)
        key = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()
        params = [p.detach().reshape(-1)[:0].cpu() for p in self.model.parameters()]
        n_params = sum(p.numel() for p in self.model.parameters())
        shapes = {
            "losses": ((int(test_data[-1].shape[0]),), None),
            "accuracy": ((), torch.float64),
            "seconds": ((), torch.float64),
            "params": ((n_params,), torch.cat(params).dtype),
        }
        directory = os.path.join(cache_dir, f"{self.mode}-{key[:24]}")
        return CacheDirectory(directory, key, fields, shapes)

    def _test(self, model: nn.Module, test_data: tuple[Tensor, ...]) -> dict[str, Tensor]:
        device = next(model.parameters()).device
        batch = tuple(t.to(device) for t in test_data)
        with eval_mode(model), torch.no_grad():
            out = model(*batch[:-1])
            losses = checked_losses(self.loss_fn, out, batch[-1], batch[-1].shape[0])
        return {
            "losses": losses.detach().cpu().clone(),
            "accuracy": (out.argmax(dim=1) == batch[-1]).double().mean().cpu(),
        }


def loo_scores(
    scores: Tensor,
    ground_truth: GroundTruth,
    test_data: tuple[Tensor, ...],
    removed: Sequence[int],
    show_progress: bool = False,
) -> tuple[float, float]:
    """LOO Pearson and Spearman of an estimator against real retraining.

    The prediction for removing :math:`z_k` is the sum of its influence scores over
    the test set (the first-order change of the summed test loss); the truth is the
    change after retraining without it (cached by ``ground_truth``).

    Args:
        scores: Influence scores ``(n_test, n_train)`` on ``test_data``.
        ground_truth: How to retrain.
        test_data: ``(features..., labels)``.
        removed: Training indices, one retraining each.
        show_progress: Progress bar.

    Returns:
        ``(pearson, spearman)``.
    """
    from captum_sam.evaluation.metrics import loo_correlation

    _check_scores(scores, ground_truth, test_data)
    base = ground_truth.evaluate([[]], test_data, False).losses[0].sum()
    res = ground_truth.evaluate(
        [[int(k)] for k in removed], test_data, show_progress, "LOO retraining"
    )
    predicted = scores.sum(dim=0)[list(removed)].detach().cpu()
    return loo_correlation(predicted, res.losses.sum(dim=1) - base)


def _check_scores(scores: Any, ground_truth: GroundTruth, test_data: tuple[Any, ...]) -> None:
    """Refuse ``scores`` that are not ``(n_test, n_train)`` for this test set and truth."""
    want = (len(test_data[-1]), len(ground_truth.dataset))  # type: ignore[arg-type]
    got = tuple(getattr(scores, "shape", ()))
    if got != want:
        raise ValueError(
            f"`scores` has shape {got}; expected (n_test, n_train) = {want} for this "
            "`test_data` and the ground truth's training set"
        )


def lds_scores(
    scores: Tensor,
    ground_truth: GroundTruth,
    test_data: tuple[Tensor, ...],
    fraction: float = 0.5,
    count: int = 20,
    seed: int = 0,
    show_progress: bool = False,
    *,
    masks: Tensor | None = None,
    sampler: str = "fraction",
    seeds: Sequence[int] | None = None,
) -> float:
    """Linear datamodeling score of ``scores`` against retraining on subsets.

    Retrains on each subset (results cached on disk by ``ground_truth``, so a second call
    reuses them) and returns :func:`captum_sam.evaluation.metrics.lds`. The subsets are
    ``masks`` when given, else ``count`` draws of
    :func:`~captum_sam.evaluation.subsets.random_subsets` with ``sampler``, ``fraction``
    and ``seed``.

    Args:
        scores: Influence scores ``(n_test, n_train)`` on ``test_data``.
        ground_truth: How to retrain (its protocol; see
            :data:`~captum_sam.evaluation.config.PROTOCOLS`).
        test_data: ``(features..., labels)``.
        fraction: Kept fraction (or keep probability with ``"bernoulli"``).
        count: Number of subsets (at least 3).
        seed: Seed of the subsets.
        show_progress: Progress bar.
        masks: User subsets, boolean ``(M, n_train)`` with ``True`` = kept (``M >= 3``);
            ``fraction``, ``count``, ``seed`` and ``sampler`` are then unused.
        sampler: ``"fraction"`` (exactly ``round(fraction * n)`` kept) or
            ``"bernoulli"`` (each example kept with probability ``fraction``).
        seeds: Retraining seeds, averaged per subset: only with the ``"fresh"``
            protocol (``None``: the ground truth's own ``seeds``).

    Returns:
        The mean LDS over test examples.

    Raises:
        ValueError: Bad ``masks`` (:func:`~captum_sam.evaluation.subsets.check_masks`),
            or ``seeds`` with a protocol other than ``"fresh"``.
    """
    from captum_sam.evaluation.metrics import lds

    _check_scores(scores, ground_truth, test_data)
    n = scores.shape[1]
    if masks is None:
        masks = random_subsets(n, count, sampler=sampler, fraction=fraction, seed=seed)
    masks = check_masks(masks, n)
    if seeds is not None:
        if ground_truth.mode != "fresh":
            raise ValueError(
                f"`seeds` are batch-order seeds of the 'fresh' ground truth; this one is "
                f"{ground_truth.mode!r}"
            )
        ground_truth = dataclasses.replace(ground_truth, seeds=tuple(seeds))
    res = ground_truth.evaluate(
        [torch.nonzero(~m).flatten().tolist() for m in masks],
        test_data,
        show_progress,
        "LDS subset retraining",
    )
    return lds(scores.detach().cpu(), masks, res.losses)[0]
