r"""Ground-truth retraining runs, cached on disk, for LOO, LDS and editing.

:class:`GroundTruth` retrains without given examples (to the SAM fixed point or by
replaying the recorded schedule) and evaluates on a test set; results are cached in a
verified directory per set of inputs (:mod:`captum_sam.evaluation.truth_cache`
describes the layout and what is checked).
"""

from __future__ import annotations

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
from captum_sam.core.files import (
    sha256_file,
)
from captum_sam.core.losses import checked_losses
from captum_sam.evaluation.retrain import RETRAIN_MODES, sam_fixed_point
from captum_sam.evaluation.truth_cache import (
    LEGACY_ROW,
    CacheDirectory,
    dataset_identity,
    loss_identity,
    model_identity,
    sha,
    trajectory_identity,
)
from captum_sam.training import replay_trajectory
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


def random_subsets(n: int, fraction: float, count: int, seed: int = 0) -> Tensor:
    """``count`` random subsets of ``round(fraction * n)`` examples, as masks ``(count, n)``."""
    if not 0 < fraction < 1:
        raise ValueError(f"`fraction` must be in (0, 1), got {fraction}")
    if count < 1:
        raise ValueError(f"`count` must be >= 1, got {count}")
    g = torch.Generator().manual_seed(seed)
    keep = int(round(fraction * n))
    masks = torch.zeros(count, n, dtype=torch.bool)
    for m in range(count):
        masks[m, torch.randperm(n, generator=g)[:keep]] = True
    return masks


# --------------------------------------------------------------------------- key fields


@dataclass
class GroundTruth:
    r"""Real SAM retraining without given examples, evaluated on a test set.

    Args:
        model: ``"fixed_point"``: the full-data fixed point (start of Newton);
            ``"schedule"``: a model with the recorded architecture.
        dataset: The training set.
        loss_fn: Per-example loss, shape ``(B,)`` or ``(B, ...)``.
        mode: ``"fixed_point"`` or ``"schedule"`` (see :mod:`captum_sam.evaluation.retrain`).
        rho: SAM radius (``"fixed_point"``).
        weight_decay: :math:`\lambda` (``"fixed_point"``).
        adaptive: ASAM (``"fixed_point"``).
        trajectory: Record directory to replay (``"schedule"``).
        tol: Fixed-point residual target.
        cache_dir: Directory where each retraining's results are stored, keyed by a
            hash of everything that determines them and verified on reading (see the
            module's docstring); ``None`` disables caching.
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
    _inputs: dict[str, Any] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.mode not in RETRAIN_MODES:
            raise ValueError(f"`mode` must be one of {RETRAIN_MODES}, got {self.mode!r}")
        if self.mode == "schedule":
            if self.trajectory is None:
                raise ValueError("mode 'schedule' needs the `trajectory` to replay")
            if not isinstance(self.trajectory, Trajectory):
                self.trajectory = load_trajectory(self.trajectory)
        # the slow parts of the key, once; the weights and files are hashed per evaluate()
        self._inputs = {
            "dataset": dataset_identity(self.dataset),
            "trajectory": trajectory_identity(self.trajectory)  # type: ignore[arg-type]
            if self.mode == "schedule"
            else None,
        }

    def retrain(self, removed: Sequence[int]) -> nn.Module:
        """A new model retrained without ``removed``."""
        if self.mode == "fixed_point":
            return sam_fixed_point(
                self.model,
                self.dataset,
                self.loss_fn,
                self.rho,
                self.weight_decay,
                self.adaptive,
                remove=list(removed),
                tol=self.tol,
            ).model
        return replay_trajectory(
            self.model,
            self.dataset,
            self.loss_fn,
            self.trajectory,  # type: ignore[arg-type]
            remove=list(removed),
        )

    def cache_fields(self, test_data: tuple[Tensor, ...]) -> dict[str, Any]:
        """What the cached results depend on (their key is the SHA-256 of this dict).

        The settings, the loss's identity, the starting weights (``"fixed_point"``) or
        the architecture (``"schedule"``: the replay loads the initial checkpoint), the
        training data, the replayed schedule and the SHA-256 of the initial checkpoint
        file the replay reads, and the test data.
        """
        schedule = self.mode == "schedule"
        traj: Trajectory | None = self.trajectory if schedule else None  # type: ignore[assignment]
        return {
            "mode": self.mode,
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
        for removed in tqdm(list(removals), desc=desc, disable=not show_progress):
            removed = sorted(int(i) for i in removed)
            row = cache.read(removed) if cache is not None else None
            if row is None:
                start = time.perf_counter()
                model = self.retrain(removed)
                seconds = time.perf_counter() - start
                row = {
                    **self._test(model, test_data),
                    "seconds": torch.tensor(seconds, dtype=torch.float64),
                    "params": torch.cat([p.detach().reshape(-1).cpu() for p in model.parameters()]),
                }
                if cache is not None:
                    cache.write(removed, row)
            rows.append(row)
        return RetrainResults(
            losses=torch.stack([r["losses"] for r in rows]),
            accuracies=torch.stack([r["accuracy"] for r in rows]),
            seconds=torch.stack([r["seconds"] for r in rows]),
            params=torch.stack([r["params"] for r in rows]),
        )

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
                stacklevel=3,
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

    base = ground_truth.evaluate([[]], test_data, False).losses[0].sum()
    res = ground_truth.evaluate(
        [[int(k)] for k in removed], test_data, show_progress, "LOO retraining"
    )
    predicted = scores.sum(dim=0)[list(removed)].detach().cpu()
    return loo_correlation(predicted, res.losses.sum(dim=1) - base)


def lds_scores(
    scores: Tensor,
    ground_truth: GroundTruth,
    test_data: tuple[Tensor, ...],
    fraction: float = 0.5,
    count: int = 20,
    seed: int = 0,
    show_progress: bool = False,
) -> float:
    """Linear datamodeling score of ``scores`` against retraining on random subsets.

    Draws ``count`` subsets of ``fraction`` of the training set, retrains on each
    (results cached on disk by ``ground_truth``, so a second call reuses them) and
    returns :func:`captum_sam.evaluation.metrics.lds`.

    Args:
        scores: Influence scores ``(n_test, n_train)`` on ``test_data``.
        ground_truth: How to retrain.
        test_data: ``(features..., labels)``.
        fraction: Fraction of the training set kept in each subset.
        count: Number of subsets (at least 3).
        seed: Seed of the subsets.
        show_progress: Progress bar.

    Returns:
        The mean LDS over test examples.
    """
    from captum_sam.evaluation.metrics import lds

    masks = random_subsets(scores.shape[1], fraction, count, seed)
    res = ground_truth.evaluate(
        [torch.nonzero(~m).flatten().tolist() for m in masks],
        test_data,
        show_progress,
        "LDS subset retraining",
    )
    return lds(scores.detach().cpu(), masks, res.losses)[0]
