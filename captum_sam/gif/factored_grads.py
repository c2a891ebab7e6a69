r"""SAM-GIF's per-example inner products from layer factors, without forming gradients.

For models whose attributed parameters are all ``nn.Linear`` weights and biases,
:math:`\nabla l_k(w) \cdot \nabla l_k(w + \epsilon)` and test-train products are
computed from layer inputs and output gradients (:mod:`captum_sam.core.layers.linear`):
two batched forward/backward passes per checkpoint and no ``batch x P`` matrix. The
path is used only after a numerical check against ``vmap`` on the first batch
(models whose examples interact fall back to :class:`~captum_sam.gif.vmap_grads.VmapGradients`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from captum_sam import core as F
from captum_sam.core.data import on_device, validate_batch
from captum_sam.core.layers import linear
from captum_sam.gif.points import WeightPoints
from captum_sam.gif.terms import Term, check_finite_terms

__all__ = ["FactoredGradients"]


@dataclass
class FactoredGradients:
    """Factored per-example products for the terms of one estimator.

    Args:
        points: Stacked weights and perturbations.
        sites: The linear layers holding the attributed parameters (``None``: the
            path does not apply).
        train_loss: The training loss (the model structure is the private copy).
        test_loss: The test loss.
        usable_with: Whether the estimator's settings allow the path at all (no
            projection, no per-example perturbation).
        test_at_perturbed: Test side at ``w + eps``.
        device: Where the model lives.
    """

    points: WeightPoints
    sites: list[linear.LinearSite] | None
    train_loss: F.FunctionalLoss
    test_loss: F.FunctionalLoss
    usable_with: bool
    test_at_perturbed: bool
    device: torch.device
    _checked: dict[Any, bool] = field(default_factory=dict)  # loss function -> path valid
    _term_losses: dict[tuple[Any, ...], Any] = field(default_factory=dict)

    def applies(self, terms: Sequence[Term], batch: tuple[Any, ...], test: bool = False) -> bool:
        """Whether the factored path may be used (``test``: for the test loss).

        Checked once per loss numerically against ``vmap`` on the first batch.
        """
        if self.sites is None or not self.usable_with:
            return False
        loss = self.test_loss if test else self.train_loss
        key = (loss.loss_fn, loss.reduction)
        if key not in self._checked:
            state = self.points.state(terms[0].checkpoint)
            floss = loss.bind(state.frozen)
            self._checked[key] = linear.matches_vmap(floss, state.params, batch, self.sites)
        return self._checked[key]

    def term_losses(
        self, terms: Sequence[Term], loss: F.FunctionalLoss | None = None
    ) -> list[tuple[F.Params, F.FunctionalLoss]]:
        """Per term: its weights and the loss bound to its frozen parameters."""
        loss = self.train_loss if loss is None else loss
        key = (tuple(t.checkpoint for t in terms), id(loss))
        if key not in self._term_losses:  # (the estimator holds its loss functions)
            params, frozen = self.points.stack(terms)
            self._term_losses[key] = [
                (
                    {n: v[k] for n, v in params.items()},
                    loss.bind({n: v[k] for n, v in frozen.items()}),
                )
                for k in range(len(terms))
            ]
        return self._term_losses[key]

    def _moved_loss(
        self, floss: F.FunctionalLoss, eps: F.Params, k: int | None
    ) -> F.FunctionalLoss:
        """``floss`` with its perturbed non-attributed parameters moved by ``eps``."""
        extra = self.points.extra
        if not extra:
            return floss
        pick = (lambda v: v) if k is None else (lambda v: v[k])
        return floss.bind(
            {n: v + pick(eps[n]) if n in extra else v for n, v in floss.frozen.items()}
        )

    def train_factors(
        self,
        terms: Sequence[Term],
        batch: tuple[Any, ...],
        need_w: bool,
        own: list[linear.Factors] | None = None,
    ) -> list[tuple[linear.Factors | None, linear.Factors]]:
        """Per term: factors at ``w`` (if ``need_w`` or needed) and at ``w + eps``.

        ``own``: factors at ``w`` if already known.
        """
        points = self.points
        shortcut = self.points.perturbation == "batch" and not points.extra
        eps = None if shortcut else points.eps(terms)
        out = []
        for k, (term, (p, floss)) in enumerate(zip(terms, self.term_losses(terms))):
            at_w = None if own is None else own[k]
            if at_w is None and (need_w or eps is None or term.rho == 0):
                at_w = linear.linear_factors(floss, p, batch, self.sites)
            if term.rho == 0:
                moved = at_w
            else:
                if eps is not None:
                    e = {n: v[k] for n, v in eps.items()}
                    mloss = self._moved_loss(floss, e, None)
                else:  # "batch": the mean gradient of the recorded batch, from ``at_w``
                    g = linear.factor_grad_sum(at_w, self.sites)  # type: ignore[arg-type]
                    g = F.tree_scale(g, 1.0 / at_w[0][0].shape[0])  # type: ignore[index]
                    check_finite_terms(g, "gradients of a recorded batch", [term])
                    e = F.sam_perturbation(p, g, term.rho, term.adaptive)
                    mloss = floss
                shifted = {n: p[n] + e[n] for n in p}
                moved = linear.linear_factors(mloss, shifted, batch, self.sites)
            out.append((at_w, moved))
        return out  # type: ignore[return-value]

    def pair_dots(
        self,
        terms: Sequence[Term],
        batch: tuple[Any, ...],
        own: list[linear.Factors] | None = None,
    ) -> Tensor:
        """``sum_k c_k test_k(x) . train_k(x)`` for every example; ``own``: factors at ``w``."""
        coef = self.points.coefficients(terms)
        total = None
        pairs = self.train_factors(terms, batch, not self.test_at_perturbed, own)
        for k, (at_w, moved) in enumerate(pairs):
            test = moved if self.test_at_perturbed else at_w
            dots = coef[k] * linear.factor_dots(test, moved, self.sites)  # type: ignore[arg-type]
            total = dots if total is None else total + dots
        return check_finite_terms(total, "gradients", terms)

    def test_factors(
        self, terms: Sequence[Term], inputs: Iterable[tuple[Any, ...]], aggregate: bool
    ) -> list[linear.Factors] | None:
        """Per term, the test side as factors of all test rows; ``None`` if not possible.

        Possible without aggregation, with test gradients at one point per checkpoint
        and a single position per example in every layer (then a test-train score
        costs ``d_in + d_out`` per layer instead of ``d_in * d_out``).
        """
        points = self.points
        if aggregate or (self.test_at_perturbed and points.perturbation == "batch"):
            return None
        eps = points.eps(terms) if self.test_at_perturbed else None
        losses = self.term_losses(terms, self.test_loss)
        parts: list[list[linear.Factors]] = [[] for _ in terms]
        for i, b in enumerate(on_device(inputs, self.device)):
            p0, floss0 = losses[0]
            validate_batch(floss0, p0, b, "inputs", run_loss=i == 0)
            if i == 0 and not (self.applies(terms, b) and self.applies(terms, b, test=True)):
                return None
            for k, (p, floss) in enumerate(losses):
                if eps is None:
                    at, mloss = p, floss
                else:
                    e = {n: v[k] for n, v in eps.items()}
                    at, mloss = {n: p[n] + e[n] for n in p}, self._moved_loss(floss, e, None)
                f = linear.linear_factors(mloss, at, b, self.sites)
                if any(a.shape[1] != 1 for a, _ in f):
                    return None
                parts[k].append(f)
        if not parts[0]:
            raise ValueError("`inputs` is empty")
        out = [linear.concat_factors(p) for p in parts]
        for f in out:
            check_finite_terms([t for pair in f for t in pair], "test gradients", terms)
        return out

    def apply(self, tests: F.Params, terms: Sequence[Term], batch: tuple[Any, ...]) -> Tensor:
        """``(m, batch)`` scores of formed test rows ``(K, m, numel)`` with factored training."""
        total = None
        for k, (_, moved) in enumerate(self.train_factors(terms, batch, need_w=False)):
            rows = {n: v[k] for n, v in tests.items()}
            gram = linear.factor_apply(moved, rows, self.sites)  # type: ignore[arg-type]
            total = gram if total is None else total + gram
        return check_finite_terms(total, "training gradients", terms)

    def gram(
        self,
        tests: list[linear.Factors],
        terms: Sequence[Term],
        batch: tuple[Any, ...],
        coef: Tensor | None,
    ) -> Tensor:
        """``(n_test, batch)`` scores ``sum_k coef_k test_k . train_k`` from factors."""
        total = None
        for k, (_, moved) in enumerate(self.train_factors(terms, batch, need_w=False)):
            gram = linear.factor_cross(tests[k], moved, self.sites)  # type: ignore[arg-type]
            gram = gram if coef is None else coef[k] * gram
            total = gram if total is None else total + gram
        return check_finite_terms(total, "training gradients", terms)
