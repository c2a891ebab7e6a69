"""SAM-GIF's per-example gradients formed with ``vmap``: the general gradient source.

Terms are evaluated in *groups* that share their data: the checkpoint form is one
group (every checkpoint, every training batch), the trajectory form one group per
recorded step (its own batch). The weight sets of a group are stacked, so one
``vmap`` call gives the per-example gradients of every checkpoint: dicts
``name -> (K, batch, numel)`` for ``K`` terms. With a projection, every result is
``{"projected": (K, batch, d)}``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.func import vmap

from captum_sam import core as F
from captum_sam.core.batchnorm import BatchStatistics
from captum_sam.core.data import on_device, validate_batch
from captum_sam.core.projection import LayerProjection, RandomProjection
from captum_sam.gif.points import WeightPoints
from captum_sam.gif.terms import Term, check_finite_terms

__all__ = ["VmapGradients", "rows", "concat"]


@dataclass
class VmapGradients:
    """Per-example gradients at ``w`` and ``w + eps`` for groups of terms.

    Args:
        points: Stacked weights and perturbations.
        projector: Random projection of every gradient, or ``None``.
        test_at_perturbed: Test-side gradients at ``w + eps`` instead of ``w``.
        device: Where the model lives.
        batch_stats: With ``batchnorm="batch"``: training-side gradients at ``w + eps``
            use the BatchNorm statistics of the term's recorded batch at those weights,
            as constants (:mod:`captum_sam.core.batchnorm`); ``None``: running statistics.
    """

    points: WeightPoints
    projector: RandomProjection | LayerProjection | None
    test_at_perturbed: bool
    device: torch.device
    batch_stats: BatchStatistics | None = None

    def grads(
        self,
        terms: Sequence[Term],
        batch: tuple[Any, ...],
        loss: F.FunctionalLoss,
        at_w: bool,
        at_perturbed: bool,
        project: bool = True,
        train: bool = True,
    ) -> tuple[F.Params | None, F.Params | None]:
        """Per-example gradients at ``w`` and/or at ``w + eps`` for every term.

        ``train``: the gradients at ``w + eps`` are the training side (with
        ``batch_stats``, on the recorded batch's BatchNorm statistics); ``False`` for a
        test side taken at the perturbed weights. Gradients at ``w`` are test sides.
        """
        points = self.points
        params, frozen = points.stack(terms)
        with_stats = self.batch_stats is not None and train
        if at_w and at_perturbed and all(t.rho == 0 for t in terms) and not with_stats:
            same = self.grads(terms, batch, loss, True, False, project)[0]  # eps = 0
            return same, same
        own = pert = None
        eps = points.eps(terms) if at_perturbed else None
        if eps is not None and at_w:  # both in one call: 2K weight sets
            moved, moved_frozen = points.moved(terms, eps)
            if with_stats:
                moved_frozen = self._batch_frozen(terms, loss, moved, moved_frozen)
            both = F.stacked_per_example_grads(
                loss,
                {n: torch.cat([params[n], moved[n]]) for n in params},
                {n: torch.cat([v, moved_frozen[n]]) for n, v in frozen.items()},
                batch,
            )
            k = len(terms)
            own, pert = {n: v[:k] for n, v in both.items()}, {n: v[k:] for n, v in both.items()}
        elif eps is not None:
            moved, moved_frozen = points.moved(terms, eps)
            if with_stats:
                moved_frozen = self._batch_frozen(terms, loss, moved, moved_frozen)
            pert = F.stacked_per_example_grads(loss, moved, moved_frozen, batch)
        else:
            own = F.stacked_per_example_grads(loss, params, frozen, batch)
            if at_perturbed:  # each example's own perturbation
                pert = self._own_perturbation(terms, batch, loss, own)
        out = rows(own if at_w else None), rows(pert)
        if self.projector is None or not project:
            return out
        return tuple(None if g is None else {"projected": self.projector(g)} for g in out)  # type: ignore[return-value]

    def _batch_frozen(
        self, terms: Sequence[Term], loss: F.FunctionalLoss, params: F.Params, frozen: F.Params
    ) -> F.Params:
        """``frozen`` with the running buffers replaced by the recorded batch's statistics."""
        indices = terms[0].indices
        if indices is None or any(t.indices != indices for t in terms):
            raise ValueError(
                "batchnorm='batch' needs the recorded batch of every term (trajectory form)"
            )
        full = self.points.fetch(indices)  # the whole recorded batch, not a slice of it
        return self.batch_stats.stacked_frozen(loss, params, frozen, full)  # type: ignore[union-attr]

    def _own_perturbation(
        self, terms: Sequence[Term], batch: tuple[Any, ...], loss: F.FunctionalLoss, own: F.Params
    ) -> F.Params:
        """Gradients at ``w + eps_i`` with ``eps_i`` from example i's own gradient."""
        points = self.points
        params, frozen = points.stack(terms)
        sam = points.sam(terms)
        extra = points.extra
        if not extra:
            eps_i = vmap(vmap(sam, in_dims=(None, 0)))(params, own)
            moved = {n: params[n].unsqueeze(1) + eps_i[n] for n in params}
            return F.stacked_per_example_grads(loss, moved, frozen, batch, params_per_example=True)
        # the scope is wider than the attributed parameters: differentiate it whole
        full = {**params, **{n: frozen[n] for n in extra}}
        rest = {n: v for n, v in frozen.items() if n not in set(extra)}
        g_full = F.stacked_per_example_grads(loss, full, rest, batch)
        eps_i = vmap(vmap(sam, in_dims=(None, 0)))(full, g_full)
        moved = {n: full[n].unsqueeze(1) + eps_i[n] for n in full}
        at = F.stacked_per_example_grads(loss, moved, rest, batch, params_per_example=True)
        return {n: at[n] for n in params}

    def test_side(
        self, terms: Sequence[Term], batch: tuple[Any, ...], loss: F.FunctionalLoss
    ) -> F.Params:
        """Test-side gradients of a batch (at ``w``, or ``w + eps`` if so configured)."""
        if self.test_at_perturbed:
            return self.grads(terms, batch, loss, False, True, train=False)[1]  # type: ignore[return-value]
        return self.grads(terms, batch, loss, True, False)[0]  # type: ignore[return-value]

    def test_matrix(
        self,
        terms: Sequence[Term],
        inputs: Iterable[tuple[Any, ...]],
        loss: F.FunctionalLoss,
        aggregate: bool,
    ) -> F.Params:
        """Test-side gradients ``(K, n_test, numel)`` (``(K, 1, numel)`` aggregated)."""
        state = self.points.state(terms[0].checkpoint)
        floss = loss.bind(state.frozen)
        parts = []
        for i, b in enumerate(on_device(inputs, self.device)):
            validate_batch(floss, state.params, b, "inputs", run_loss=i == 0)
            g = self.test_side(terms, b, loss)
            parts.append({n: v.sum(dim=1, keepdim=True) for n, v in g.items()} if aggregate else g)
        if not parts:
            raise ValueError("`inputs` is empty")
        out = {n: torch.cat([p[n] for p in parts], dim=1) for n in parts[0]}
        out = check_finite_terms(out, "test gradients", terms)
        return {n: v.sum(dim=1, keepdim=True) for n, v in out.items()} if aggregate else out


def rows(grads: F.Params | None) -> F.Params | None:
    """``(K, B, *shape)`` -> ``(K, B, numel)`` views."""
    if grads is None:
        return None
    return {n: g.reshape(g.shape[0], g.shape[1], -1) for n, g in grads.items()}


def concat(a: F.Params, names: Sequence[str], dim: int) -> torch.Tensor:
    """Concatenate the named tensors of ``a`` along ``dim``."""
    return torch.cat([a[n] for n in names], dim=dim)
