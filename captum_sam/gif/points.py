r"""The weights SAM-GIF evaluates each term at: the checkpoint :math:`w` and :math:`w + \epsilon`.

:class:`WeightPoints` stacks the checkpoints of a group of terms (so one ``vmap``
call serves all of them) and computes their SAM perturbations:

* ``"dataset"``: one :math:`\epsilon_c` per checkpoint from the mean gradient over the
  perturbation set (cached);
* ``"batch"`` (trajectory form): from the mean gradient of the recorded batch, the
  perturbation training used;
* ``"example"``: from each example's own gradient (computed by the gradient engines).

The perturbation is the training's: its gradient and norm run over the *scope* (by
default every trainable parameter, whatever ``layers=`` attributes) and it moves all
of them; derivatives are then taken with respect to the attributed parameters, the
others held at their perturbed values. ``perturbation_scope="attributed"`` perturbs
the attributed parameters alone, an approximation for a large frozen backbone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.func import vmap
from torch.utils.data import DataLoader, Dataset

from captum_sam import core as F
from captum_sam.core.checkpoints import CheckpointLoader
from captum_sam.core.data import fetch_batch, local_batches
from captum_sam.core.distributed import all_reduce_sum, all_reduce_tree
from captum_sam.gif.terms import Term, check_finite_terms, coefficient_vector

__all__ = ["WeightPoints", "PERTURBATIONS", "TRAJECTORY_PERTURBATIONS"]

PERTURBATIONS = ("dataset", "example")
TRAJECTORY_PERTURBATIONS = ("batch", "dataset", "example")


@dataclass
class WeightPoints:
    """Stacked checkpoint weights and SAM perturbations for groups of terms.

    Args:
        loader: Checkpoints loaded into a private copy of the model.
        names: Attributed parameter names.
        scope: Names the perturbation runs over (a superset of ``names``).
        loss: The training loss bound to the model (its frozen part is rebound).
        perturbation: ``"dataset"``, ``"batch"`` or ``"example"``.
        perturbation_data: Batches of the ``"dataset"`` perturbation.
        train_data: The map-style training set (recorded batches are fetched from it).
        device: Where the model lives.
    """

    loader: CheckpointLoader
    names: list[str]
    scope: list[str]
    loss: F.FunctionalLoss
    perturbation: str
    perturbation_data: DataLoader | Any
    train_data: Dataset
    device: torch.device
    perturbation_name: str = "perturbation_dataset"  # named when one of its batches fails
    _stacks: dict[tuple[str, ...], tuple[F.Params, F.Params]] = field(default_factory=dict)
    _dataset_eps: dict[tuple[Any, ...], F.Params] = field(default_factory=dict)
    _last_batch: tuple[tuple[int, ...], tuple[Any, ...]] | None = None

    @property
    def extra(self) -> list[str]:
        """Perturbed but not attributed parameter names."""
        attributed = set(self.names)
        return [n for n in self.scope if n not in attributed]

    def state(self, checkpoint: str) -> Any:
        """The loaded checkpoint (params, frozen, learning rate)."""
        return self.loader(checkpoint)

    def reference(self, checkpoint: str) -> Tensor:
        """The first attributed parameter of a checkpoint (for dtype and device)."""
        return self.state(checkpoint).params[self.names[0]]

    def width(self) -> int:
        """Number of attributed coordinates ``P``."""
        return sum(v.numel() for v in self.loader.scratch_params(self.names))

    def stack(self, terms: Sequence[Term]) -> tuple[F.Params, F.Params]:
        """``(params, frozen)`` of the terms' checkpoints, each with a leading ``K``."""
        key = tuple(t.checkpoint for t in terms)
        if key not in self._stacks:
            states = [self.loader(c) for c in key]
            params = {n: torch.stack([s.params[n] for s in states]) for n in self.names}
            frozen = {n: torch.stack([s.frozen[n] for s in states]) for n in states[0].frozen}
            self._stacks[key] = (params, frozen)
        return self._stacks[key]

    def coefficients(self, terms: Sequence[Term]) -> Tensor:
        """``(K,)`` coefficients in the attributed parameters' dtype and device."""
        return coefficient_vector(terms, self.reference(terms[0].checkpoint))

    # ------------------------------------------------------------------ perturbations

    def scoped_stack(self, terms: Sequence[Term]) -> tuple[F.Params, F.Params]:
        """:meth:`stack` split into ``(scope, rest)`` instead of ``(attributed, rest)``."""
        params, frozen = self.stack(terms)
        extra = self.extra
        if not extra:
            return params, frozen
        full = {**params, **{n: frozen[n] for n in extra}}
        rest = {n: v for n, v in frozen.items() if n not in set(extra)}
        return full, rest

    def sam(self, terms: Sequence[Term]) -> Any:
        """``(w, g) -> eps`` with the terms' shared ``rho`` and ``adaptive``."""
        rho, adaptive = terms[0].rho, terms[0].adaptive
        if any((t.rho, t.adaptive) != (rho, adaptive) for t in terms):
            raise ValueError("terms evaluated together must share rho and adaptive")
        return lambda p, g: F.sam_perturbation(p, g, rho, adaptive)

    def eps_key(self, terms: Sequence[Term]) -> tuple[Any, ...]:
        """Cache key of the dataset perturbation of a group of terms."""
        return (tuple(t.checkpoint for t in terms), terms[0].rho, terms[0].adaptive)

    def has_dataset_eps(self, terms: Sequence[Term]) -> bool:
        """Whether the dataset perturbation of these terms is already known."""
        return self._known_eps(terms) is not None

    def _known_eps(self, terms: Sequence[Term]) -> F.Params | None:
        """The cached dataset perturbation of ``terms``, stacked from single terms' if needed.

        (Self influence computes them one checkpoint at a time; ``influence`` then asks
        for all of them together.)
        """
        key = self.eps_key(terms)
        if key not in self._dataset_eps and len(terms) > 1:
            singles = [self._dataset_eps.get(self.eps_key([t])) for t in terms]
            if all(e is not None for e in singles):
                self._dataset_eps[key] = {
                    n: torch.cat([e[n] for e in singles])  # type: ignore[index]
                    for n in singles[0]  # type: ignore[union-attr]
                }
                for t in terms:  # the single ones become views: held once
                    self._dataset_eps.pop(self.eps_key([t]), None)
                self.share_dataset_eps(terms)
        return self._dataset_eps.get(key)

    def eps(self, terms: Sequence[Term]) -> F.Params | None:
        """Shared perturbations ``(K, ...)`` over the scope; ``None`` when per example."""
        if self.perturbation == "example":
            return None
        key = self.eps_key(terms)
        known = self._known_eps(terms) if self.perturbation == "dataset" else None
        if known is not None:
            return known
        full, rest = self.scoped_stack(terms)
        if self.perturbation == "dataset" and all(t.rho == 0 for t in terms):
            # rho = 0 moves nothing: no pass over the perturbation data
            self._dataset_eps[key] = {n: torch.zeros_like(v) for n, v in full.items()}
            return self._dataset_eps[key]
        if self.perturbation == "dataset":
            local = (b for _, b in local_batches(self.perturbation_data, self.device))
            g, count = F.stacked_grad_sum(self.loss, full, rest, local, self.perturbation_name)
            return self.store_dataset_eps(terms, g, count, "perturbation_dataset")
        # "batch": the mean gradient of the recorded batch
        g, _ = F.stacked_mean_grad(self.loss, full, rest, [self.fetch(terms[0].indices)])
        g = check_finite_terms(g, "gradients of a recorded batch", terms)
        return vmap(self.sam(terms))(full, g)

    def store_dataset_eps(
        self, terms: Sequence[Term], local_sum: F.Params, count: int, data_name: str
    ) -> F.Params:
        """Dataset perturbations from this rank's gradient sum: all-reduce, mean, cache.

        ``local_sum`` covers the scope (or the attributed parameters when they are
        the scope).
        """
        all_reduce_tree(local_sum)
        count = int(all_reduce_sum(torch.tensor([count], dtype=torch.float64))[0])
        if count == 0:
            raise ValueError(f"`{data_name}` is empty")
        mean = check_finite_terms(
            F.tree_scale(local_sum, 1.0 / count), "perturbation gradients", terms
        )
        full, _ = self.scoped_stack(terms)
        eps = vmap(self.sam(terms))(full, mean)
        self._dataset_eps[self.eps_key(terms)] = eps
        return eps

    def share_dataset_eps(self, terms: Sequence[Term]) -> None:
        """Cache each term's dataset perturbation from the group's, if that is known.

        Evaluating the terms one at a time then needs no new pass over the data.
        """
        key = self.eps_key(terms)
        if self.perturbation != "dataset" or key not in self._dataset_eps:
            return
        stacked = self._dataset_eps[key]
        for k, term in enumerate(terms):
            self._dataset_eps.setdefault(
                self.eps_key([term]), {n: v[k : k + 1] for n, v in stacked.items()}
            )

    def moved(self, terms: Sequence[Term], eps: F.Params) -> tuple[F.Params, F.Params]:
        """``(params + eps, frozen + eps)``: every scoped parameter moved, ``(K, ...)``."""
        params, frozen = self.stack(terms)
        moved = {n: params[n] + eps[n] for n in params}
        extra = self.extra
        if extra:
            frozen = {n: v + eps[n] if n in eps else v for n, v in frozen.items()}
        return moved, frozen

    # ------------------------------------------------------------------ data

    def fetch(self, indices: Sequence[int] | None) -> tuple[Any, ...]:
        """The batch of ``indices`` on the device (the last one is remembered).

        A recorded step's batch is needed twice: for its perturbation and its gradients.
        """
        key = tuple(indices or ())
        if self._last_batch is None or self._last_batch[0] != key:
            batch = F.to_device(fetch_batch(self.train_data, list(key)), self.device)
            self._last_batch = (key, batch)
        return self._last_batch[1]

    def index(self, term: Term) -> Tensor:
        """The term's example indices as a tensor on the device."""
        return torch.tensor(term.indices, dtype=torch.long, device=self.device)
