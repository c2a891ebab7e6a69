"""SAM-GIF internals: the terms of the sum and their per-example gradients.

A mixin of :class:`~captum_sam.SAMTracInCP`. Terms are evaluated in *groups* that
share their data: the checkpoint form is one group (every checkpoint, every training
batch), the trajectory form one group per recorded step (its own batch). The weight
sets of a group are stacked, so one ``vmap`` call gives the per-example gradients of
every checkpoint: dicts ``name -> (K, batch, numel)`` for ``K`` terms.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.func import vmap

from captum_sam import functional as F
from captum_sam._utils import local_batches, on_device, validate_batch
from captum_sam.distributed import all_reduce_sum, all_reduce_tree
from captum_sam.trajectory import fetch_batch


@dataclass(frozen=True)
class _Term:
    """One summand: a checkpoint, a coefficient and the examples it applies to."""

    checkpoint: str
    coefficient: float
    indices: tuple[int, ...] | None  # None: every training example
    rho: float
    adaptive: bool


class GIFGradientsMixin:
    """Stacked weights, SAM perturbations and per-example gradients of the terms."""

    def _stack(self, terms: Sequence[_Term]) -> tuple[F.Params, F.Params]:
        key = tuple(t.checkpoint for t in terms)
        if key not in self._stacks:
            states = [self._loader(c) for c in key]
            params = {n: torch.stack([s.params[n] for s in states]) for n in self.names}
            frozen = {n: torch.stack([s.frozen[n] for s in states]) for n in states[0].frozen}
            self._stacks[key] = (params, frozen)
        return self._stacks[key]

    def _sam(self, terms: Sequence[_Term]) -> Callable[[F.Params, F.Params], F.Params]:
        rho, adaptive = terms[0].rho, terms[0].adaptive
        if any((t.rho, t.adaptive) != (rho, adaptive) for t in terms):
            raise ValueError("terms evaluated together must share rho and adaptive")
        return lambda p, g: F.sam_perturbation(p, g, rho, adaptive)

    def _eps_key(self, terms: Sequence[_Term]) -> tuple[Any, ...]:
        return (tuple(t.checkpoint for t in terms), terms[0].rho, terms[0].adaptive)

    def _eps(self, terms: Sequence[_Term]) -> F.Params | None:
        """Shared perturbations ``(K, ...)`` of the terms; ``None`` when per example."""
        if self.perturbation == "example":
            return None
        params, frozen = self._stack(terms)
        key = self._eps_key(terms)
        if self.perturbation == "dataset" and key in self._dataset_eps:
            return self._dataset_eps[key]
        if self.perturbation == "dataset":
            local = (b for _, b in local_batches(self.perturbation_dataloader, self.device))
            g, count = F.stacked_grad_sum(self._loss, params, frozen, local)
            return self._store_dataset_eps(terms, g, count, "perturbation_dataset")
        # "batch": the mean gradient of the recorded batch
        g, _ = F.stacked_mean_grad(self._loss, params, frozen, [self._fetch(terms[0].indices)])
        return vmap(self._sam(terms))(params, _finite(g, "gradients of a recorded batch", terms))

    def _store_dataset_eps(
        self, terms: Sequence[_Term], local_sum: F.Params, count: int, data_name: str
    ) -> F.Params:
        """Dataset perturbations from this rank's gradient sum: all-reduce, mean, cache."""
        all_reduce_tree(local_sum)
        count = int(all_reduce_sum(torch.tensor([count], dtype=torch.float64))[0])
        if count == 0:
            raise ValueError(f"`{data_name}` is empty")
        mean = _finite(F.tree_scale(local_sum, 1.0 / count), "perturbation gradients", terms)
        eps = vmap(self._sam(terms))(self._stack(terms)[0], mean)
        self._dataset_eps[self._eps_key(terms)] = eps
        return eps

    def _grads(
        self,
        terms: Sequence[_Term],
        batch: tuple[Any, ...],
        loss: F.FunctionalLoss,
        at_w: bool,
        at_perturbed: bool,
        project: bool = True,
    ) -> tuple[F.Params | None, F.Params | None]:
        """Per-example gradients at ``w`` and/or at ``w + eps`` for every term.

        With a projection (and ``project``) each result is ``{"projected": (K, B, d)}``.
        """
        params, frozen = self._stack(terms)
        if at_w and at_perturbed and all(t.rho == 0 for t in terms):
            same = self._grads(terms, batch, loss, True, False, project)[0]  # eps = 0
            return same, same
        own = pert = None
        eps = self._eps(terms) if at_perturbed else None
        if eps is not None and at_w:  # both in one call: 2K weight sets
            both = F.stacked_per_example_grads(
                loss,
                {n: torch.cat([params[n], params[n] + eps[n]]) for n in params},
                {n: torch.cat([v, v]) for n, v in frozen.items()},
                batch,
            )
            k = len(terms)
            own, pert = {n: v[:k] for n, v in both.items()}, {n: v[k:] for n, v in both.items()}
        elif eps is not None:
            moved = {n: params[n] + eps[n] for n in params}
            pert = F.stacked_per_example_grads(loss, moved, frozen, batch)
        else:
            own = F.stacked_per_example_grads(loss, params, frozen, batch)
            if at_perturbed:  # each example's own perturbation
                eps_i = vmap(vmap(self._sam(terms), in_dims=(None, 0)))(params, own)
                moved = {n: params[n].unsqueeze(1) + eps_i[n] for n in params}
                pert = F.stacked_per_example_grads(
                    loss, moved, frozen, batch, params_per_example=True
                )
        out = _rows(own if at_w else None), _rows(pert)
        if self.projector is None or not project:
            return out
        return tuple(None if g is None else {"projected": self.projector(g)} for g in out)  # type: ignore[return-value]

    def _test_side(
        self, terms: Sequence[_Term], batch: tuple[Any, ...], loss: F.FunctionalLoss
    ) -> F.Params:
        if self.test_at_perturbed:
            return self._grads(terms, batch, loss, False, True)[1]  # type: ignore[return-value]
        return self._grads(terms, batch, loss, True, False)[0]  # type: ignore[return-value]

    def _fetch(self, indices: Sequence[int] | None) -> tuple[Any, ...]:
        """The batch of ``indices`` on the device (the last one is remembered).

        A recorded step's batch is needed twice: for its perturbation and its gradients.
        """
        key = tuple(indices or ())
        if self._last_batch is None or self._last_batch[0] != key:
            batch = F.to_device(fetch_batch(self.train_data, list(key)), self.device)
            self._last_batch = (key, batch)
        return self._last_batch[1]

    def _index(self, term: _Term) -> Tensor:
        return torch.tensor(term.indices, dtype=torch.long, device=self.device)

    def _test_matrix(
        self, terms: Sequence[_Term], inputs: Iterable[tuple[Any, ...]], aggregate: bool
    ) -> F.Params:
        """Test-side gradients ``(K, n_test, numel)`` (``(K, 1, numel)`` aggregated)."""
        state = self._loader(terms[0].checkpoint)
        floss = F.FunctionalLoss(self.model, self._test_loss.loss_fn, state.frozen)
        rows = []
        for i, b in enumerate(on_device(inputs, self.device)):
            validate_batch(floss, state.params, b, "inputs", run_loss=i == 0)
            rows.append(self._test_side(terms, b, self._test_loss))
        if not rows:
            raise ValueError("`inputs` is empty")
        out = _finite(
            {n: torch.cat([r[n] for r in rows], dim=1) for n in rows[0]}, "test gradients", terms
        )
        return {n: v.sum(dim=1, keepdim=True) for n, v in out.items()} if aggregate else out

    def _test_key(self, term: _Term, index: int) -> tuple[Any, ...]:
        # test gradients depend on the term only through its checkpoint, unless they
        # are taken at a perturbation that changes from term to term
        if self.test_at_perturbed and self.perturbation == "batch":
            return ("term", index)
        return ("ckpt", term.checkpoint, term.rho, term.adaptive)

    def _coefficients(self, terms: Sequence[_Term]) -> Tensor:
        state = self._loader(terms[0].checkpoint)
        ref = state.params[self.names[0]]
        return torch.tensor([t.coefficient for t in terms], dtype=ref.dtype, device=ref.device)


def _rows(grads: F.Params | None) -> F.Params | None:
    """``(K, B, *shape)`` -> ``(K, B, numel)`` views."""
    if grads is None:
        return None
    return {n: g.reshape(g.shape[0], g.shape[1], -1) for n, g in grads.items()}


def _cat(a: F.Params, names: Sequence[str], dim: int) -> Tensor:
    return torch.cat([a[n] for n in names], dim=dim)


def _finite(x: Any, what: str, terms: Sequence[_Term]) -> Any:
    """Return ``x``, or raise if it holds NaN/inf (NaN gradients propagate into it)."""
    values = x.values() if isinstance(x, dict) else x if isinstance(x, list) else [x]
    if not all(bool(torch.isfinite(v).all()) for v in values):
        where = sorted({os.path.basename(t.checkpoint) for t in terms})
        raise ValueError(
            f"{what} at checkpoint(s) {where} contain NaN or inf: check the inputs, the "
            "loss function and the checkpoint weights"
        )
    return x
