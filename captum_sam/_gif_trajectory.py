"""SAM-GIF in trajectory form: scores summed over the recorded steps.

A mixin of :class:`~captum_sam.SAMTracInCP`. This rank's block of recorded steps
is visited in order; test-side quantities are computed once per checkpoint. On the
factored path (:mod:`captum_sam._gif_factored`) the steps that share a checkpoint
are scored together.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from captum_sam import functional as F
from captum_sam._gif_gradients import _finite, _Term
from captum_sam._utils import progress
from captum_sam.distributed import all_reduce_sum, contiguous


class TrajectoryGIFMixin:
    """``influence`` and ``self_influence`` over a recorded trajectory."""

    def _trajectory_influence(
        self, test: Iterable[tuple[Any, ...]], aggregate: bool, show_progress: bool
    ) -> Tensor:
        cache: dict[tuple[Any, ...], Any] = {}
        scores, factored_path = None, None
        group: list[_Term] = []  # factored: steps at the current checkpoint, scored together
        steps = progress(
            contiguous(self._terms), show_progress, f"{self.get_name()}: recorded steps"
        )
        for i, term in steps:
            key = self._test_key(term, i)
            if key not in cache:
                if group:
                    self._factored_steps(cache[self._test_key(group[0], 0)], group, scores)
                    group = []
                if key[0] == "ckpt":
                    cache.clear()  # terms are grouped by checkpoint: free the last one
                t = (
                    self._test_factors([term], test, aggregate)
                    if factored_path is not False
                    else None
                )
                factored_path = t is not None
                cache[key] = t if factored_path else self._test_matrix([term], test, aggregate)
            t = cache[key]
            if scores is None:
                rows = t[0][0][0].shape[0] if factored_path else next(iter(t.values())).shape[1]
                scores = torch.zeros(rows, self.n_train, dtype=self._dtype(), device=self.device)
                limit = self._group_rows(rows) if factored_path else 0
            if factored_path:
                if group and sum(len(g.indices) for g in group) + len(term.indices) > limit:
                    self._factored_steps(t, group, scores)
                    group = []
                group.append(term)
                continue
            batch = self._fetch(term.indices)
            if aggregate and self._factored([term], batch):  # one summed test row
                gram = self._factored_apply(t, [term], batch)
            else:
                g = self._grads([term], batch, self._loss, False, True)[1]
                gram = _finite(_gram(t, g), "training gradients", [term])  # type: ignore[arg-type]
            scores.index_add_(1, self._index(term), gram, alpha=term.coefficient)
        if group:
            self._factored_steps(cache[self._test_key(group[0], 0)], group, scores)
        if scores is None:  # a rank without steps still joins the reduction
            n_test = _count(test) if not aggregate else 1
            scores = torch.zeros(n_test, self.n_train, dtype=self._dtype(), device=self.device)
        return all_reduce_sum(scores)

    def _trajectory_self_influence(self, show_progress: bool) -> Tensor:
        """Self influence over the recorded steps; factored steps of a checkpoint together."""
        scores = torch.zeros(self.n_train, dtype=self._dtype(), device=self.device)
        bar = progress(contiguous(self._terms), show_progress, f"{self.get_name()}: self influence")
        group: list[_Term] = []
        limit = self._group_rows(0) if self._sites is not None else 0
        for _, term in bar:
            batch = self._fetch(term.indices)
            if group and (
                term.checkpoint != group[0].checkpoint
                or sum(len(g.indices) for g in group) + len(term.indices) > limit
            ):
                self._factored_step_self(group, scores)
                group = []
            if self._factored([term], batch):
                group.append(term)
                continue
            scores.index_add_(0, self._index(term), self._pair_dots([term], batch))
        if group:
            self._factored_step_self(group, scores)
        return all_reduce_sum(scores)


def _count(batches: Iterable[tuple[Any, ...]]) -> int:
    return sum(b[-1].shape[0] for b in batches)


def _gram(a: F.Params, b: F.Params) -> Tensor:
    """Inner products of one term's vectors ``(1, m, numel)`` x ``(1, b, numel)`` -> ``(m, b)``."""
    return sum(a[n][0] @ b[n][0].T for n in a)  # type: ignore[return-value]
