"""Trajectory-form SAM-GIF on the factored path: the recorded steps of a checkpoint together.

Recorded steps are small batches; scoring them one by one costs a forward/backward
pass each. :class:`FactoredSteps` scores the steps that share a checkpoint in few
large passes: one pass at ``w`` over the union of their examples, then the passes at
``w + eps`` of steps with the same ``rho`` stacked into one ``vmap``
(:func:`~captum_sam.core.layers.sites.layer_factors_stacked`); none at ``w + eps``
when only the output layer moves and its factors at ``w`` are known
(:mod:`captum_sam.gif.head`).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.func import vmap

from captum_sam.core.layers import products, sites
from captum_sam.gif import head
from captum_sam.gif.factored_grads import FactoredGradients
from captum_sam.gif.terms import Term, check_finite_terms

__all__ = ["FactoredSteps", "GROUP_BUDGET_BYTES"]

# factors and scores of the recorded steps scored together in the trajectory form, at most
GROUP_BUDGET_BYTES = 1 << 28


@dataclass
class FactoredSteps:
    """Grouped factored scoring of recorded steps.

    Args:
        factored: The factored gradient source (its points, sites and losses).
        batch_size: Examples per pass when the union of a group's examples is read.
    """

    factored: FactoredGradients
    batch_size: int
    _row_floats: int | None = field(default=None, init=False)

    @property
    def points(self):  # noqa: D102 - shorthand
        return self.factored.points

    def group_rows(self, n_test: int, dtype: torch.dtype, terms: Sequence[Term]) -> int:
        """Training rows of recorded steps scored together within :data:`GROUP_BUDGET_BYTES`.

        Per row: its raw factors at ``w`` and at ``w + eps`` (measured on one example
        of the first step: a convolution keeps one row per output position) and its
        ``n_test`` scores.
        """
        if self._row_floats is None:
            first = terms[0]
            self._row_floats = self.factored.row_floats(
                [first], self.points.fetch(first.indices[:1])
            )[0]
        per_row = (2 * self._row_floats + n_test) * torch.finfo(dtype).bits // 8
        return max(1, GROUP_BUDGET_BYTES // per_row)

    def _union_factors(self, terms: Sequence[Term], index: Tensor) -> sites.Factors:
        """Factors at ``w`` of the rows ``index`` (one pass over their distinct examples)."""
        ((p, floss),) = self.factored.term_losses(terms[:1])  # the steps share the checkpoint
        union, where = torch.unique(index, return_inverse=True)
        chunks = union.split(self.batch_size)
        found = products.concat_factors(
            [
                sites.layer_factors(floss, p, self.points.fetch(c.tolist()), self.factored.sites)
                for c in chunks
            ]
        )
        return [(a[where], d[where]) for a, d in found]  # type: ignore[misc]

    def step_factors(
        self, terms: Sequence[Term], need_w: bool
    ) -> tuple[list[Term], Tensor, sites.Factors | None, sites.Factors]:
        """Factors of recorded steps that share a checkpoint, in few large passes.

        With the ``"batch"`` perturbation (or ``need_w``, or a step with ``rho = 0``)
        one pass at ``w`` over the union of the steps' examples gives every step's
        factors at ``w`` (its mean gradient is a sum of them) instead of one pass per
        step. Steps with the same ``rho`` and ``adaptive`` then take their
        perturbations and their passes at ``w + eps`` together; a step with a smaller
        batch is padded with copies of its first example, whose rows are dropped
        (exact, because the factored path is used only when examples do not interact).

        Returns:
            The steps in the order scored (by ``rho`` and ``adaptive``), their example
            indices concatenated in that order, and the factors of those rows at ``w``
            (``None`` when not computed) and at ``w + eps``.
        """
        points, site_list = self.points, self.factored.sites
        ((p, floss),) = self.factored.term_losses(terms[:1])
        terms = sorted(terms, key=lambda t: (t.rho, t.adaptive))
        index = torch.tensor([i for t in terms for i in t.indices], device=points.device)
        at_w = None
        if need_w or points.perturbation == "batch" or any(t.rho == 0 for t in terms):
            at_w = self._union_factors(terms, index)
        moved, batch_grads, start = [], [], 0
        for (rho, _), run in itertools.groupby(terms, key=lambda t: (t.rho, t.adaptive)):
            run = list(run)
            sizes = [len(t.indices) for t in run]
            rows = slice(start, start + sum(sizes))
            start = rows.stop
            if rho == 0:
                moved.append([(a[rows], d[rows]) for a, d in at_w])  # type: ignore[union-attr]
                continue
            if points.extra and points.perturbation == "batch":
                # each step moves the non-attributed parameters its own way: step by step
                moved.append(
                    products.concat_factors(
                        [
                            self.factored.train_factors([t], points.fetch(t.indices), False)[0][1]
                            for t in run
                        ],
                        site_list,
                    )
                )
                continue
            width = max(sizes)
            # where each step's rows sit when every step is padded to ``width`` rows
            kept = torch.cat(
                [
                    torch.arange(k * width, k * width + m, device=points.device)
                    for k, m in enumerate(sizes)
                ]
            )
            padded = len(kept) != len(run) * width
            mloss = floss
            if points.perturbation == "dataset":  # one perturbation per checkpoint
                shared = {n: v[0] for n, v in points.eps(run[:1]).items()}  # type: ignore[union-attr]
                mloss = self.factored.moved_loss(floss, shared)
                e = {n: shared[n].expand(len(run), *shared[n].shape) for n in p}
            else:  # the mean gradient of each recorded batch
                own = [
                    tuple(
                        _spread(x[rows], kept, len(run) * width).unflatten(0, (len(run), width))
                        for x in pair
                    )
                    for pair in at_w  # type: ignore[union-attr]
                ]
                count = torch.tensor(sizes, dtype=p[next(iter(p))].dtype, device=points.device)
                g = {
                    n: v / count.view(-1, *[1] * (v.dim() - 1))
                    for n, v in products.factor_grad_sum(own, site_list).items()  # type: ignore[arg-type]
                }
                batch_grads.extend(v.reshape(-1) for v in g.values())
                e = vmap(points.sam(run), in_dims=(None, 0))(p, g)
            shifted = {n: p[n] + e[n] for n in p}
            from_w = self._head_steps(run, rows.start, mloss, shifted, at_w)
            if from_w is not None:
                moved.append(from_w)
                continue
            fill = [
                i for t in run for i in [*t.indices, *[t.indices[0]] * (width - len(t.indices))]
            ]
            f = sites.layer_factors_stacked(
                mloss,
                shifted,
                points.fetch(fill),
                site_list,
                len(run),  # type: ignore[arg-type]
            )
            moved.append(
                [
                    tuple(x.flatten(0, 1)[kept] if padded else x.flatten(0, 1) for x in pair)
                    for pair in f
                ]
            )
        if batch_grads:  # one check for the group (NaN would reach the scores anyway)
            check_finite_terms(torch.cat(batch_grads), "gradients of a recorded batch", terms)
        return terms, index, at_w, products.concat_factors(moved, site_list)

    def _head_steps(
        self,
        run: list[Term],
        start: int,
        floss: Any,
        shifted: dict[str, Tensor],
        at_w: sites.Factors | None,
    ) -> sites.Factors | None:
        """Factors at ``w + eps`` of steps ``run`` from their rows at ``w`` (from ``start``).

        When only the output layer is attributed and perturbed
        (:mod:`captum_sam.gif.head`), each step's factors at its perturbed point follow
        from its layer input at ``w``: no pass through the network. ``None`` when that
        does not apply, the factors at ``w`` were not computed, or the check refuses.
        """
        if at_w is None or not head.applies(self.points.extra, self.factored.sites):
            return None
        found = []
        for k, term in enumerate(run):
            rows = slice(start, start + len(term.indices))
            start = rows.stop
            f = self.factored.head_moved(
                floss,
                {n: v[k] for n, v in shifted.items()},
                self.points.fetch(term.indices),
                [(a[rows], d[rows]) for a, d in at_w],
            )
            if f is None:
                return None
            found.append(f)
        return products.concat_factors(found, self.factored.sites)  # type: ignore[arg-type]

    def step_coefficients(self, terms: Sequence[Term]) -> Tensor:
        """Each step's coefficient, repeated for each of its examples."""
        coef = self.points.coefficients(terms)
        return coef.repeat_interleave(
            torch.tensor([len(t.indices) for t in terms], device=coef.device)
        )

    def add_scores(self, tests: list[sites.Factors], terms: Sequence[Term], scores: Tensor) -> None:
        """Add the scores of recorded steps at one checkpoint to ``(n_test, n)`` ``scores``.

        ``tests``: the test factors of that checkpoint (a one-element list).
        """
        terms, index, _, moved = self.step_factors(terms, need_w=False)
        gram = self.factored.cross(tests[0], moved)
        gram.mul_(self.step_coefficients(terms))
        scores.index_add_(1, index, check_finite_terms(gram, "training gradients", terms))

    def add_self(self, terms: Sequence[Term], scores: Tensor) -> None:
        """Add the self influence of recorded steps at one checkpoint to ``(n,)`` ``scores``."""
        test_moved = self.factored.test_at_perturbed
        terms, index, at_w, moved = self.step_factors(terms, need_w=not test_moved)
        test = moved if test_moved else at_w
        dots = self.factored.dots(test, moved)  # type: ignore[arg-type]
        dots = dots * self.step_coefficients(terms)
        scores.index_add_(0, index, check_finite_terms(dots, "gradients", terms))


def _spread(x: Tensor, kept: Tensor, rows: int) -> Tensor:
    """``x`` placed at rows ``kept`` of ``rows`` zero rows (no copy when nothing is padded)."""
    if len(kept) == rows:
        return x
    return x.new_zeros(rows, *x.shape[1:]).index_copy_(0, kept, x)
