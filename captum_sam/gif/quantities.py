r"""SAM-GIF's intermediate quantities, their on-disk cache, and model editing.

The intermediate quantities are per-example vectors whose inner products are the
scores: the training side is the coefficient-weighted gradient at the perturbed
weights, :math:`\eta_c \nabla l_k(w_c + \epsilon_c)` per checkpoint (Captum's
``TracInCP`` quantity at ``rho = 0``), the test side the raw gradient
:math:`\nabla l(z; w_c)`, so ``test_side @ train_side.T == influence``.
The parameter change of removing examples is the GIF estimate
:math:`\sum c \sum_{k \in S \cap B} \nabla l_k(w + \epsilon)`.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from captum_sam import core as F
from captum_sam.core.data import as_loader, check_indices, local_batches, progress
from captum_sam.core.distributed import all_reduce_sum, contiguous, gather_ordered, rank_and_world
from captum_sam.core.projection import LayerProjection, RandomProjection
from captum_sam.core.store import (
    data_digest,
    file_digest,
    function_digest,
    model_digest,
    projection_setting,
    save_quantities,
)
from captum_sam.gif.points import WeightPoints
from captum_sam.gif.terms import Term, check_finite_terms
from captum_sam.gif.vmap_grads import VmapGradients, concat

__all__ = ["GIFQuantities"]


@dataclass
class GIFQuantities:
    """Intermediate quantities, caching and parameter changes of one estimator.

    Args:
        terms: The estimator's terms.
        points: Stacked weights and perturbations.
        vmap: The gradient source.
        trajectory: Whether the terms are recorded steps (membership matters).
        train_loss: The training loss.
        test_loss: The test loss.
        train_dataloader: The training batches, in order.
        train_data: The map-style training set.
        batch_size: Batch size for Datasets given as inputs.
        projector: Random projection of every gradient, or ``None``.
        n_train: Training set size.
    """

    terms: list[Term]
    points: WeightPoints
    vmap: VmapGradients
    trajectory: bool
    train_loss: F.FunctionalLoss
    test_loss: F.FunctionalLoss
    train_dataloader: Any
    train_data: Dataset
    batch_size: int | None
    projector: RandomProjection | LayerProjection | None
    n_train: int

    @property
    def checkpoints(self) -> list[str]:
        """Distinct checkpoints in order of first use."""
        return list(dict.fromkeys(t.checkpoint for t in self.terms))

    def width(self) -> int:
        """Columns per checkpoint: ``P``, or the projection's dimension."""
        return self.projector.dim if self.projector is not None else self.points.width()

    def dtype(self) -> torch.dtype:
        """Dtype of the attributed parameters."""
        return self.points.reference(self.terms[0].checkpoint).dtype

    def compute(self, inputs: Any, aggregate: bool, side: str) -> Tensor:
        """``(n_examples, n_checkpoints * D)`` quantities of one side (see the facade)."""
        if side not in ("train", "test"):
            raise ValueError(f"`side` must be 'train' or 'test', got {side!r}")
        ckpts = self.checkpoints
        first = {c: next(t for t in self.terms if t.checkpoint == c) for c in ckpts}
        if side == "test":
            if self.vmap.test_at_perturbed and self.points.perturbation == "batch":
                raise ValueError(
                    "with test_at_perturbed and the recorded-batch perturbation the test "
                    "side changes at every step: it has no fixed intermediate quantity"
                )
            data = as_loader(
                self.train_dataloader if inputs is None else inputs,
                self.batch_size,
                "inputs",
                ordered=not aggregate,
            )
            t = self.vmap.test_matrix([first[c] for c in ckpts], data, self.test_loss, aggregate)
            return torch.cat(list(t.values()), dim=2).transpose(0, 1).flatten(1)
        if self.trajectory and inputs is not None:
            raise ValueError(
                "the trajectory form defines training-side quantities for the "
                "training set only: pass inputs=None"
            )
        result = (
            self._trajectory_train(ckpts)
            if self.trajectory
            else self._checkpoint_train(ckpts, inputs, aggregate)
        )
        result = check_finite_terms(result, "training gradients", self.terms)
        return result.sum(dim=0, keepdim=True) if aggregate and self.trajectory else result

    def weighted(self, terms: Sequence[Term], batch: tuple[Any, ...], ckpts: list[str]) -> Tensor:
        """Coefficient-weighted train-side rows, one block per checkpoint ``(B, C * D)``."""
        g = self.vmap.grads(terms, batch, self.train_loss, False, True)[1]
        weighted = self.points.coefficients(terms).view(-1, 1, 1) * concat(g, list(g), 2)  # type: ignore[arg-type]
        size = self.width()
        out = weighted.new_zeros(weighted.shape[1], len(ckpts) * size)
        for k, term in enumerate(terms):
            j = ckpts.index(term.checkpoint) * size
            out[:, j : j + size] += weighted[k]
        return out

    def _checkpoint_train(self, ckpts: list[str], inputs: Any, aggregate: bool) -> Tensor:
        data = (
            self.train_dataloader
            if inputs is None
            else as_loader(inputs, self.batch_size, "inputs")
        )
        rows = []
        for i, b in local_batches(data, self.points.device):
            part = self.weighted(self.terms, b, ckpts)
            rows.append((i, part.sum(dim=0, keepdim=True) if aggregate else part))
        rows = gather_ordered(rows)
        if not rows:
            raise ValueError("`inputs` is empty")
        out = torch.cat(rows)
        return out.sum(dim=0, keepdim=True) if aggregate else out

    def _trajectory_train(self, ckpts: list[str]) -> Tensor:
        out = torch.zeros(
            self.n_train, len(ckpts) * self.width(), dtype=self.dtype(), device=self.points.device
        )
        for _, term in contiguous(self.terms):
            rows = self.weighted([term], self.points.fetch(term.indices), ckpts)
            out.index_add_(0, self.points.index(term), rows)
        return all_reduce_sum(out)

    # ------------------------------------------------------------------ caching

    def fingerprint(self, estimator: str, model: nn.Module) -> dict[str, Any]:
        """Everything the training-side quantities of ``model`` depend on."""
        ckpts = self.checkpoints
        terms = hashlib.sha256(
            json.dumps(
                [
                    [ckpts.index(t.checkpoint), t.coefficient, t.indices, t.rho, t.adaptive]
                    for t in self.terms
                ]
            ).encode()
        ).hexdigest()
        pdata = self.points.perturbation_data
        custom = pdata is not self.train_dataloader
        extra = {} if self.vmap.batch_stats is None else {"batchnorm": "batch"}
        return {
            **extra,
            "estimator": estimator,
            "model": model_digest(model),
            "form": "trajectory" if self.trajectory else "checkpoint",
            "checkpoints": [file_digest(c) for c in ckpts],
            "terms": terms,
            "perturbation": self.points.perturbation,
            "perturbation_scope": self.points.scope,
            "perturbation_data": data_digest(pdata) if custom else "train",
            "parameters": self.points.names,
            "projection": projection_setting(self.projector),
            "loss": [*function_digest(self.train_loss.loss_fn), self.train_loss.reduction],
            "data": data_digest(self.train_dataloader),
            "dtype": str(self.dtype()),
        }

    def save(self, directory: str | os.PathLike[str], estimator: str, model: nn.Module) -> str:
        """Store the training side, one part per training batch, with a fingerprint."""
        ckpts = self.checkpoints
        if self.trajectory:  # accumulated over steps: held whole
            full = self._trajectory_train(ckpts)
            size = self.batch_size or 64
            chunks = full.split(size) if rank_and_world()[0] == 0 else []
            parts: Iterable[tuple[int, Tensor]] = list(enumerate(chunks))
        else:
            parts = (
                (i, self.weighted(self.terms, b, ckpts))
                for i, b in local_batches(self.train_dataloader, self.points.device)
            )
        return save_quantities(directory, self.fingerprint(estimator, model), parts)

    # ------------------------------------------------------------------ editing

    def parameter_change(self, indices: Sequence[int] | Tensor, show_progress: bool) -> Tensor:
        """Flat ``(P,)`` GIF estimate of :math:`w_{-S} - w_T` (attributed parameters)."""
        removed = set(check_indices(indices, self.n_train))
        chunk = self.batch_size or 64
        if not self.trajectory:
            members = sorted(removed)
            work = [(self.terms, members[i : i + chunk]) for i in range(0, len(members), chunk)]
        else:
            work = [([t], sorted(removed & set(t.indices))) for t in self.terms]  # type: ignore[arg-type]
            work = [w for w in work if w[1]]
        names = self.points.names
        ref = self.points.reference(self.terms[0].checkpoint)
        total = torch.zeros(self.points.width(), dtype=ref.dtype, device=self.points.device)
        for _, (terms, members) in progress(
            contiguous(work), show_progress, "GIF parameter change"
        ):
            g = self.vmap.grads(
                terms, self.points.fetch(members), self.train_loss, False, True, project=False
            )[1]
            total += self.points.coefficients(terms) @ concat(g, names, 2).sum(dim=1)  # type: ignore[arg-type]
        all_reduce_sum(total)
        return check_finite_terms(total, "training gradients", self.terms)
