r"""Trajectory-form SAM-GIF: scores summed over the recorded steps of a training run.

Every recorded step :math:`t` contributes
:math:`\eta_t [k \in B_t]/|B_t|\, \nabla l(z; w_t)\cdot\nabla l_k(w_t+\epsilon_t)`,
:math:`w_t` the latest checkpoint saved at or before the step. This rank's block of
steps is visited in order; test-side quantities are computed once per checkpoint. On
the factored path the steps that share a checkpoint are scored together
(:class:`~captum_sam.gif.factored_steps.FactoredSteps`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from captum_sam import core as F
from captum_sam.core.data import batch_context, progress
from captum_sam.core.distributed import all_reduce_sum, contiguous
from captum_sam.gif.factored_grads import FactoredGradients, rep_rows
from captum_sam.gif.factored_steps import FactoredSteps
from captum_sam.gif.points import WeightPoints
from captum_sam.gif.terms import Term, check_finite_terms
from captum_sam.gif.vmap_grads import VmapGradients

__all__ = ["TrajectoryForm"]


@dataclass
class TrajectoryForm:
    """Influence and self influence over the recorded steps.

    Args:
        terms: One term per recorded step.
        points: Stacked weights and perturbations.
        vmap: The general gradient source.
        factored: The factored gradient source.
        steps: Grouped factored scoring of steps.
        train_loss: The training loss.
        test_loss: The test loss.
        n_train: Training set size.
    """

    terms: list[Term]
    points: WeightPoints
    vmap: VmapGradients
    factored: FactoredGradients
    steps: FactoredSteps
    train_loss: F.FunctionalLoss
    test_loss: F.FunctionalLoss
    n_train: int

    def prepare(self) -> None:
        """Compute the dataset perturbation of every checkpoint on every rank."""
        if self.points.perturbation == "dataset":
            for term in {t.checkpoint: t for t in self.terms}.values():
                self.points.eps([term])

    def test_key(self, term: Term, index: int) -> tuple[Any, ...]:
        """What a term's test side depends on (its checkpoint, or the step itself)."""
        if self.vmap.test_at_perturbed and self.points.perturbation == "batch":
            return ("term", index)
        return ("ckpt", term.checkpoint, term.rho, term.adaptive)

    def influence(
        self, test: Iterable[tuple[Any, ...]], aggregate: bool, show_progress: bool, name: str
    ) -> Tensor:
        """``(n_test, n_train)`` scores (``(1, n_train)`` aggregated)."""
        points, dtype = self.points, self.points.reference(self.terms[0].checkpoint).dtype
        cache: dict[tuple[Any, ...], Any] = {}
        scores, factored_path, limit = None, None, 0
        group: list[Term] = []  # factored: steps at the current checkpoint, scored together
        bar = progress(
            contiguous(self.terms),
            show_progress,
            f"Using {name} to compute influence for recorded steps",
        )
        for i, term in bar:
            with batch_context("train_dataset", f"of recorded step {i}"):
                key = self.test_key(term, i)
                if key not in cache:
                    if group:
                        self.steps.add_scores(cache[self.test_key(group[0], 0)], group, scores)
                        group = []
                    if key[0] == "ckpt":
                        cache.clear()  # terms are grouped by checkpoint: free the last one
                    t = (
                        self.factored.test_factors([term], test, aggregate)
                        if factored_path is not False
                        else None
                    )
                    factored_path = t is not None
                    cache[key] = (
                        t
                        if factored_path
                        else self.vmap.test_matrix([term], test, self.test_loss, aggregate)
                    )
                t = cache[key]
                if scores is None:
                    rows = rep_rows(t[0]) if factored_path else next(iter(t.values())).shape[1]
                    scores = torch.zeros(rows, self.n_train, dtype=dtype, device=points.device)
                    limit = self.steps.group_rows(rows, dtype, [term]) if factored_path else 0
                if factored_path:
                    if group and sum(len(g.indices) for g in group) + len(term.indices) > limit:
                        self.steps.add_scores(t, group, scores)
                        group = []
                    group.append(term)
                    continue
                batch = points.fetch(term.indices)
                if aggregate and self.factored.applies([term], batch):  # one summed test row
                    gram = self.factored.apply(t, [term], batch)
                else:
                    g = self.vmap.grads([term], batch, self.train_loss, False, True)[1]
                    gram = check_finite_terms(_gram(t, g), "training gradients", [term])  # type: ignore[arg-type]
                scores.index_add_(1, points.index(term), gram, alpha=term.coefficient)
        if group:
            self.steps.add_scores(cache[self.test_key(group[0], 0)], group, scores)
        if scores is None:  # a rank without steps still joins the reduction
            n_test = 1 if aggregate else sum(b[-1].shape[0] for b in test)
            scores = torch.zeros(n_test, self.n_train, dtype=dtype, device=points.device)
        return all_reduce_sum(scores)

    def self_influence(self, show_progress: bool, name: str, pair_dots: Any) -> Tensor:
        """Self influence ``(n_train,)``; factored steps of a checkpoint scored together.

        ``pair_dots(terms, batch)``: the per-example products of the general path.
        """
        points = self.points
        dtype = points.reference(self.terms[0].checkpoint).dtype
        scores = torch.zeros(self.n_train, dtype=dtype, device=points.device)
        bar = progress(
            contiguous(self.terms),
            show_progress,
            f"Using {name} to compute self influence. Processing recorded step",
        )
        group: list[Term] = []
        limit = 0
        for t, term in bar:
            with batch_context("train_dataset", f"of recorded step {t}"):
                batch = points.fetch(term.indices)
                if group and (
                    term.checkpoint != group[0].checkpoint
                    or sum(len(g.indices) for g in group) + len(term.indices) > limit
                ):
                    self.steps.add_self(group, scores)
                    group = []
                if self.factored.applies([term], batch):
                    limit = limit or self.steps.group_rows(0, dtype, [term])
                    group.append(term)
                    continue
                scores.index_add_(0, points.index(term), pair_dots([term], batch))
        if group:
            self.steps.add_self(group, scores)
        return all_reduce_sum(scores)


def _gram(a: F.Params, b: F.Params) -> Tensor:
    """Inner products of one term's vectors ``(1, m, numel)`` x ``(1, b, numel)`` -> ``(m, b)``."""
    return sum(a[n][0] @ b[n][0].T for n in a)  # type: ignore[return-value]
