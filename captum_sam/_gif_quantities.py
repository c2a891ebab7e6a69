"""SAM-GIF intermediate quantities, their cache, and model editing.

A mixin of :class:`~captum_sam.SAMTracInCP`: the per-example vectors whose inner
products are the scores (``compute_intermediate_quantities``), saving them with a
fingerprint of everything they depend on, and the parameter change that removing
training examples would cause (``parameter_change``, ``edited_model``).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from captum_sam import functional as F
from captum_sam._gif_gradients import _cat, _finite, _Term
from captum_sam._utils import as_loader, check_indices, edited_copy, local_batches, progress
from captum_sam.cache import data_digest, file_digest, projection_setting, save_quantities
from captum_sam.distributed import all_reduce_sum, contiguous, gather_ordered, rank_and_world


class GIFQuantitiesMixin:
    """Intermediate quantities, caching and editing for :class:`~captum_sam.SAMTracInCP`."""

    def compute_intermediate_quantities(
        self,
        inputs: tuple[Any, ...] | DataLoader | None = None,
        aggregate: bool = False,
        side: str = "train",
    ) -> Tensor:
        """Per-example vectors whose inner products give the influence scores.

        ``compute_intermediate_quantities(test, side="test") @
        compute_intermediate_quantities(side="train").T == influence(test)``.

        Args:
            inputs: Examples; default the training set. The trajectory form needs
                batch membership for ``side="train"``, so only ``None`` is accepted
                there.
            aggregate: Sum over the examples (``(1, D)``).
            side: ``"train"``: coefficient-weighted gradients at the perturbed
                weights; ``"test"``: raw test-side gradients (``test_loss_fn``).

        Returns:
            ``(n_examples, n_checkpoints * D)``: one block of ``D`` per distinct
            checkpoint, in order of first use; ``D = P``, or ``projection_dim``.
        """
        if side not in ("train", "test"):
            raise ValueError(f"`side` must be 'train' or 'test', got {side!r}")
        ckpts = list(dict.fromkeys(t.checkpoint for t in self._terms))
        first = {c: next(t for t in self._terms if t.checkpoint == c) for c in ckpts}
        with F.eval_mode(self.model):
            self._prepare()
            if side == "test":
                if self.test_at_perturbed and self.perturbation == "batch":
                    raise ValueError(
                        "with test_at_perturbed and the recorded-batch perturbation the test "
                        "side changes at every step: it has no fixed intermediate quantity"
                    )
                data = as_loader(
                    self.train_dataloader if inputs is None else inputs, self.batch_size, "inputs"
                )
                t = self._test_matrix([first[c] for c in ckpts], data, aggregate)
                return torch.cat(list(t.values()), dim=2).transpose(0, 1).flatten(1)
            if self.trajectory is not None and inputs is not None:
                raise ValueError(
                    "the trajectory form defines training-side quantities for the "
                    "training set only: pass inputs=None"
                )
            result = (
                self._trajectory_train_quantities(ckpts)
                if self.trajectory is not None
                else self._checkpoint_train_quantities(ckpts, inputs)
            )
            result = _finite(result, "training gradients", self._terms)
            return result.sum(dim=0, keepdim=True) if aggregate else result

    def _width(self) -> int:
        if self.projector is not None:
            return self.projector.dim
        return sum(self._loader(self._terms[0].checkpoint).params[n].numel() for n in self.names)

    def _dtype(self) -> torch.dtype:
        return self._loader(self._terms[0].checkpoint).params[self.names[0]].dtype

    def _weighted(self, terms: Sequence[_Term], batch: tuple[Any, ...], ckpts: list[str]) -> Tensor:
        """Coefficient-weighted train-side rows, one block per checkpoint ``(B, C * D)``."""
        g = self._grads(terms, batch, self._loss, False, True)[1]
        weighted = self._coefficients(terms).view(-1, 1, 1) * _cat(g, list(g), 2)  # type: ignore[arg-type]
        size = self._width()
        out = weighted.new_zeros(weighted.shape[1], len(ckpts) * size)
        for k, term in enumerate(terms):
            j = ckpts.index(term.checkpoint) * size
            out[:, j : j + size] += weighted[k]
        return out

    def _checkpoint_train_quantities(self, ckpts: list[str], inputs: Any) -> Tensor:
        data = (
            self.train_dataloader
            if inputs is None
            else as_loader(inputs, self.batch_size, "inputs")
        )
        rows = gather_ordered(
            [
                (i, self._weighted(self._terms, b, ckpts))
                for i, b in local_batches(data, self.device)
            ]
        )
        if not rows:
            raise ValueError("`inputs` is empty")
        return torch.cat(rows)

    def _trajectory_train_quantities(self, ckpts: list[str]) -> Tensor:
        out = torch.zeros(
            self.n_train, len(ckpts) * self._width(), dtype=self._dtype(), device=self.device
        )
        for _, term in contiguous(self._terms):
            rows = self._weighted([term], self._fetch(term.indices), ckpts)
            out.index_add_(0, self._index(term), rows)
        return all_reduce_sum(out)

    # ------------------------------------------------------------------ caching

    def _fingerprint(self) -> dict[str, Any]:
        ckpts = list(dict.fromkeys(t.checkpoint for t in self._terms))
        terms = hashlib.sha256(
            json.dumps(
                [
                    [ckpts.index(t.checkpoint), t.coefficient, t.indices, t.rho, t.adaptive]
                    for t in self._terms
                ]
            ).encode()
        ).hexdigest()
        custom = self.perturbation_dataloader is not self.train_dataloader
        return {
            "estimator": type(self).__name__,
            "form": "trajectory" if self.trajectory is not None else "checkpoint",
            "checkpoints": [file_digest(c) for c in ckpts],
            "terms": terms,
            "perturbation": self.perturbation,
            "perturbation_data": data_digest(self.perturbation_dataloader.dataset)  # type: ignore[attr-defined]
            if custom and isinstance(self.perturbation_dataloader, DataLoader)
            else "train",
            "parameters": self.names,
            "projection": projection_setting(self.projector),
            "loss": repr(self._loss.loss_fn),
            "data": data_digest(self.train_data),
            "dtype": str(self._dtype()),
        }

    def save_intermediate_quantities(self, directory: str | os.PathLike[str]) -> str:
        """Compute the training side (``side="train"``) and store it in ``directory``.

        One torch file per training batch plus a manifest with a fingerprint of the
        checkpoints (SHA-256), the settings, the loss and the training data.

        Returns:
            The directory.
        """
        ckpts = list(dict.fromkeys(t.checkpoint for t in self._terms))
        with F.eval_mode(self.model):
            self._prepare()
            if self.trajectory is not None:  # accumulated over steps: held whole
                full = self._trajectory_train_quantities(ckpts)
                size = self.batch_size or 64
                chunks = full.split(size) if rank_and_world()[0] == 0 else []
                parts: Iterable[tuple[int, Tensor]] = list(enumerate(chunks))
            else:
                parts = (
                    (i, self._weighted(self._terms, b, ckpts))
                    for i, b in local_batches(self.train_dataloader, self.device)
                )
            return save_quantities(directory, self._fingerprint(), parts)

    # ------------------------------------------------------------------ editing

    def parameter_change(
        self, indices: Sequence[int] | Tensor, flat: bool = False, show_progress: bool = False
    ) -> F.Params | Tensor:
        r"""GIF estimate of :math:`w_{-S} - w_T` for removing the examples ``indices``.

        :math:`\sum_{\text{terms}} c \sum_{k \in S \cap B} \nabla l_k(w + \epsilon)`:
        the descent steps the removed examples contributed, added back. In trajectory
        form :math:`c = \eta_t/|B_t|` and :math:`B = B_t`; in checkpoint form
        :math:`c = \eta_c` and every example counts at every checkpoint, so the scale
        is whatever the checkpoints' learning rates encode.

        Args:
            indices: Training indices of the set :math:`S`.
            flat: Return one flat vector ``(P,)`` instead of a dict.
            show_progress: Progress bar.

        Returns:
            A dict (attributed parameter name -> tensor of the parameter's shape), or
            a flat ``(P,)`` tensor in ``named_parameters`` order.
        """
        removed = set(check_indices(indices, self.n_train))
        chunk = self.batch_size or 64
        if self.trajectory is None:
            members = sorted(removed)
            work = [(self._terms, members[i : i + chunk]) for i in range(0, len(members), chunk)]
        else:
            work = [([t], sorted(removed & set(t.indices))) for t in self._terms]  # type: ignore[arg-type]
            work = [w for w in work if w[1]]
        ref = self._loader(self._terms[0].checkpoint).params
        total = torch.zeros(
            sum(ref[n].numel() for n in self.names),
            dtype=ref[self.names[0]].dtype,
            device=self.device,
        )
        with F.eval_mode(self.model):
            self._prepare()
            for _, (terms, members) in progress(
                contiguous(work), show_progress, "GIF parameter change"
            ):
                g = self._grads(
                    terms, self._fetch(members), self._loss, False, True, project=False
                )[1]
                total += self._coefficients(terms) @ _cat(g, self.names, 2).sum(dim=1)  # type: ignore[arg-type]
        all_reduce_sum(total)
        _finite(total, "training gradients", self._terms)
        return total if flat else F.unflatten(total, {n: ref[n] for n in self.names})

    def edited_model(
        self, indices: Sequence[int] | Tensor, show_progress: bool = False
    ) -> nn.Module:
        """A new model: the final weights plus :meth:`parameter_change` (user's model untouched).

        The final weights are the trajectory's final checkpoint, or in checkpoint form
        the last checkpoint.
        """
        delta = self.parameter_change(indices, show_progress=show_progress)
        return edited_copy(self.model, self._loader.load_func, self._final_checkpoint, delta)  # type: ignore[arg-type]
