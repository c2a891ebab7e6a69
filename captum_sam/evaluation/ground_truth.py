"""Ground-truth retraining runs with an on-disk cache, for LOO, LDS and editing."""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset, TensorDataset

from captum_sam.core.checkpoints import atomic_write as _atomic_write
from captum_sam.evaluation.retrain import RETRAIN_MODES, sam_fixed_point
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


def _digest(h: Any, obj: Any) -> None:
    if isinstance(obj, Tensor):
        h.update(obj.detach().cpu().contiguous().numpy().tobytes())
    elif isinstance(obj, dict):
        for k in sorted(obj):
            h.update(str(k).encode())
            _digest(h, obj[k])
    else:
        h.update(json.dumps(obj, sort_keys=True, default=str).encode())


@dataclass
class GroundTruth:
    r"""Real SAM retraining without given examples, evaluated on a test set.

    Args:
        model: ``"fixed_point"``: the full-data fixed point (start of Newton);
            ``"schedule"``: a model with the recorded architecture.
        dataset: The training set.
        loss_fn: Per-example loss.
        mode: ``"fixed_point"`` or ``"schedule"`` (see :mod:`captum_sam.evaluation.retrain`).
        rho: SAM radius (``"fixed_point"``).
        weight_decay: :math:`\lambda` (``"fixed_point"``).
        adaptive: ASAM (``"fixed_point"``).
        trajectory: Record directory to replay (``"schedule"``).
        tol: Fixed-point residual target.
        cache_dir: Directory where each retraining's results are stored, keyed by a
            hash of everything that determines them; ``None`` disables caching.
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
    _key: str = field(default="", init=False, repr=False)

    def __post_init__(self) -> None:
        if self.mode not in RETRAIN_MODES:
            raise ValueError(f"`mode` must be one of {RETRAIN_MODES}, got {self.mode!r}")
        if self.mode == "schedule":
            if self.trajectory is None:
                raise ValueError("mode 'schedule' needs the `trajectory` to replay")
            if not isinstance(self.trajectory, Trajectory):
                self.trajectory = load_trajectory(self.trajectory)
        h = hashlib.sha256()
        _digest(
            h,
            {
                "mode": self.mode,
                "rho": self.rho,
                "wd": self.weight_decay,
                "adaptive": self.adaptive,
                "tol": self.tol,
                "loss": repr(self.loss_fn),
            },
        )
        _digest(h, dict(self.model.state_dict()))
        if isinstance(self.dataset, TensorDataset):
            _digest(h, {str(i): t for i, t in enumerate(self.dataset.tensors)})
        else:
            _digest(h, {"n": len(self.dataset), "type": type(self.dataset).__name__})  # type: ignore[arg-type]
        if isinstance(self.trajectory, Trajectory):
            with open(os.path.join(self.trajectory.directory, "manifest.json"), "rb") as f:
                h.update(f.read())
        self._key = h.hexdigest()[:20]

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
        """
        from tqdm.auto import tqdm

        h = hashlib.sha256()
        _digest(h, {str(i): t for i, t in enumerate(test_data)})
        test_key = h.hexdigest()[:12]
        rows = []
        for removed in tqdm(list(removals), desc=desc, disable=not show_progress):
            removed = sorted(int(i) for i in removed)
            rkey = hashlib.sha256(json.dumps(removed).encode()).hexdigest()[:16]
            path = None
            if self.cache_dir is not None:
                path = os.path.join(self.cache_dir, f"{self.mode}-{self._key}-{test_key}-{rkey}.pt")
                if os.path.isfile(path):
                    rows.append(torch.load(path, weights_only=True))
                    continue
            start = time.perf_counter()
            model = self.retrain(removed)
            seconds = time.perf_counter() - start
            row = {
                **self._test(model, test_data),
                "seconds": torch.tensor(seconds),
                "params": torch.cat([p.detach().reshape(-1).cpu() for p in model.parameters()]),
            }
            if path is not None:
                os.makedirs(self.cache_dir, exist_ok=True)  # type: ignore[arg-type]
                _atomic_write(path, lambda f, row=row: torch.save(row, f))
            rows.append(row)
        return RetrainResults(
            losses=torch.stack([r["losses"] for r in rows]),
            accuracies=torch.stack([r["accuracy"] for r in rows]),
            seconds=torch.stack([r["seconds"] for r in rows]),
            params=torch.stack([r["params"] for r in rows]),
        )

    def _test(self, model: nn.Module, test_data: tuple[Tensor, ...]) -> dict[str, Tensor]:
        device = next(model.parameters()).device
        batch = tuple(t.to(device) for t in test_data)
        model.eval()
        with torch.no_grad():
            out = model(*batch[:-1])
            losses = self.loss_fn(out, batch[-1])
        return {
            "losses": losses.detach().cpu(),
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
