r"""SAM-GIF self influence from layer factors (see :mod:`captum_sam.factored`).

A mixin of :class:`~captum_sam.SAMTracInCP`. For models whose attributed
parameters are all ``nn.Linear`` weights and biases, the per-example inner product
:math:`\nabla l_k(w) \cdot \nabla l_k(w + \epsilon)` is computed from layer inputs
and output gradients: two batched forward/backward passes per checkpoint and no
``batch x P`` matrix. With the default ``"dataset"`` perturbation over the training
set, the first pass also yields the perturbation gradient, so self influence costs
two passes over the data per checkpoint, against three when the perturbation is
computed separately.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.func import vmap

from captum_sam import factored
from captum_sam import functional as F
from captum_sam._gif_gradients import _finite
from captum_sam._utils import local_batches, on_device, progress, validate_batch
from captum_sam.distributed import all_reduce_sum, gather_ordered

# factors at w kept between the two passes of merged self influence, at most
MERGE_BUDGET_BYTES = 1 << 30
# factors and scores of the recorded steps scored together in the trajectory form, at most
GROUP_BUDGET_BYTES = 1 << 28


class FactoredGIFMixin:
    """Factored per-example inner products for :class:`~captum_sam.SAMTracInCP`."""

    def _factored(self, terms: Sequence[Any], batch: tuple[Any, ...], test: bool = False) -> bool:
        """Whether this estimator may use the factored path (``test``: for the test loss).

        Only for linear-layer models without projection or per-example perturbation;
        checked once per loss numerically against ``vmap`` on the first batch.
        """
        if self._sites is None or self.projector is not None or self.perturbation == "example":
            return False
        loss_fn = self._test_loss.loss_fn if test else self._loss.loss_fn
        if loss_fn not in self._sites_checked:
            state = self._loader(terms[0].checkpoint)
            floss = F.FunctionalLoss(self._loader.scratch, loss_fn, state.frozen)
            ok = factored.matches_vmap(floss, state.params, batch, self._sites)
            self._sites_checked[loss_fn] = ok
        return self._sites_checked[loss_fn]

    def _term_losses(
        self, terms: Sequence[Any], loss_fn: Any = None
    ) -> list[tuple[F.Params, F.FunctionalLoss]]:
        """Per term: its weights and a loss bound to its frozen parameters.

        The structure is the loader's private copy of the model, so the forward hooks
        of the factored passes never touch the user's modules.
        """
        loss_fn = self._loss.loss_fn if loss_fn is None else loss_fn
        key = (tuple(t.checkpoint for t in terms), id(loss_fn))
        if key not in self._term_loss_cache:  # (the estimator holds its loss functions)
            params, frozen = self._stack(terms)
            self._term_loss_cache[key] = [
                (
                    {n: v[k] for n, v in params.items()},
                    F.FunctionalLoss(
                        self._loader.scratch, loss_fn, {n: v[k] for n, v in frozen.items()}
                    ),
                )
                for k in range(len(terms))
            ]
        return self._term_loss_cache[key]

    def _train_factors(
        self,
        terms: Sequence[Any],
        batch: tuple[Any, ...],
        need_w: bool,
        own: list[factored.Factors] | None = None,
    ) -> list[tuple[factored.Factors | None, factored.Factors]]:
        """Per term: factors at ``w`` (if ``need_w`` or needed) and at ``w + eps``.

        ``own``: factors at ``w`` if already known.
        """
        eps = self._eps(terms) if self.perturbation == "dataset" else None
        out = []
        for k, (term, (p, floss)) in enumerate(zip(terms, self._term_losses(terms))):
            at_w = None if own is None else own[k]
            if at_w is None and (need_w or eps is None or term.rho == 0):
                at_w = factored.linear_factors(floss, p, batch, self._sites)
            if term.rho == 0:
                moved = at_w
            else:
                if eps is not None:
                    e = {n: v[k] for n, v in eps.items()}
                else:  # "batch": the mean gradient of the recorded batch, from ``at_w``
                    g = factored.factor_grad_sum(at_w, self._sites)  # type: ignore[arg-type]
                    g = F.tree_scale(g, 1.0 / at_w[0][0].shape[0])  # type: ignore[index]
                    _finite(g, "gradients of a recorded batch", [term])
                    e = F.sam_perturbation(p, g, term.rho, term.adaptive)
                shifted = {n: p[n] + e[n] for n in p}
                moved = factored.linear_factors(floss, shifted, batch, self._sites)
            out.append((at_w, moved))
        return out  # type: ignore[return-value]

    def _factored_pair_dots(
        self,
        terms: Sequence[Any],
        batch: tuple[Any, ...],
        own: list[factored.Factors] | None = None,
    ) -> Tensor:
        """``_pair_dots`` from layer factors; ``own``: factors at ``w`` if already known."""
        coef = self._coefficients(terms)
        total = None
        pairs = self._train_factors(terms, batch, not self.test_at_perturbed, own)
        for k, (at_w, moved) in enumerate(pairs):
            test = moved if self.test_at_perturbed else at_w
            dots = coef[k] * factored.factor_dots(test, moved, self._sites)  # type: ignore[arg-type]
            total = dots if total is None else total + dots
        return _finite(total, "gradients", terms)

    def _test_factors(
        self, terms: Sequence[Any], inputs: Iterable[tuple[Any, ...]], aggregate: bool
    ) -> list[factored.Factors] | None:
        """Per term, the test side as factors of all test rows; ``None`` if not possible.

        Possible without aggregation, with test gradients at one point per checkpoint
        and a single position per example in every layer (then a test-train score
        costs ``d_in + d_out`` per layer instead of ``d_in * d_out``).
        """
        if aggregate or (self.test_at_perturbed and self.perturbation == "batch"):
            return None
        eps = self._eps(terms) if self.test_at_perturbed else None
        losses = self._term_losses(terms, self._test_loss.loss_fn)
        parts: list[list[factored.Factors]] = [[] for _ in terms]
        for i, b in enumerate(on_device(inputs, self.device)):
            p0, floss0 = losses[0]
            validate_batch(floss0, p0, b, "inputs", run_loss=i == 0)
            if i == 0 and not (self._factored(terms, b) and self._factored(terms, b, test=True)):
                return None
            for k, (p, floss) in enumerate(losses):
                at = p if eps is None else {n: p[n] + eps[n][k] for n in p}
                f = factored.linear_factors(floss, at, b, self._sites)
                if any(a.shape[1] != 1 for a, _ in f):
                    return None
                parts[k].append(f)
        if not parts[0]:
            raise ValueError("`inputs` is empty")
        out = [factored.concat_factors(p) for p in parts]
        for f in out:
            _finite([t for pair in f for t in pair], "test gradients", terms)
        return out

    def _factored_apply(
        self, tests: F.Params, terms: Sequence[Any], batch: tuple[Any, ...]
    ) -> Tensor:
        """``(m, batch)`` scores of formed test rows ``(K, m, numel)`` with factored training."""
        total = None
        for k, (_, moved) in enumerate(self._train_factors(terms, batch, need_w=False)):
            rows = {n: v[k] for n, v in tests.items()}
            gram = factored.factor_apply(moved, rows, self._sites)  # type: ignore[arg-type]
            total = gram if total is None else total + gram
        return _finite(total, "training gradients", terms)

    def _factored_gram(
        self,
        tests: list[factored.Factors],
        terms: Sequence[Any],
        batch: tuple[Any, ...],
        coef: Tensor | None,
    ) -> Tensor:
        """``(n_test, batch)`` scores ``sum_k coef_k test_k . train_k`` from factors."""
        total = None
        for k, (_, moved) in enumerate(self._train_factors(terms, batch, need_w=False)):
            gram = factored.factor_cross(tests[k], moved, self._sites)  # type: ignore[arg-type]
            gram = gram if coef is None else coef[k] * gram
            total = gram if total is None else total + gram
        return _finite(total, "training gradients", terms)

    def _group_rows(self, n_test: int) -> int:
        """Training rows of recorded steps scored together within :data:`GROUP_BUDGET_BYTES`."""
        width = sum(sum(s.module.weight.shape) for s in self._sites)
        per_row = (2 * width + n_test) * torch.finfo(self._dtype()).bits // 8
        return max(1, GROUP_BUDGET_BYTES // per_row)

    def _step_factors(
        self, terms: Sequence[Any], need_w: bool
    ) -> tuple[list[Any], Tensor, factored.Factors | None, factored.Factors]:
        """Factors of recorded steps that share a checkpoint, in few large passes.

        With the ``"batch"`` perturbation (or ``need_w``, or a step with ``rho = 0``)
        one pass at ``w`` over the union of the steps' examples gives every step's
        factors at ``w`` (its mean gradient is a sum of them) instead of one pass per
        step. Steps with the same ``rho`` and ``adaptive`` then take their
        perturbations and their passes at ``w + eps`` together
        (:func:`~captum_sam.factored.linear_factors_stacked`); a step with a smaller
        batch is padded with copies of its first example, whose rows are dropped
        (exact, because the factored path is used only when examples do not interact).
        The stacked pass holds the activations of all the group's examples: the group
        budget (:data:`GROUP_BUDGET_BYTES`) bounds it, not ``batch_size``.

        Returns:
            The steps in the order scored (by ``rho`` and ``adaptive``), their example
            indices concatenated in that order, and the factors of those rows at ``w``
            (``None`` when not computed) and at ``w + eps``.
        """
        ((p, floss),) = self._term_losses(terms[:1])  # the steps share the checkpoint
        terms = sorted(terms, key=lambda t: (t.rho, t.adaptive))
        index = torch.tensor([i for t in terms for i in t.indices], device=self.device)
        at_w = None
        if need_w or self.perturbation == "batch" or any(t.rho == 0 for t in terms):
            union, where = torch.unique(index, return_inverse=True)
            chunks = union.split(self.batch_size or 64)
            found = factored.concat_factors(
                [
                    factored.linear_factors(floss, p, self._fetch(c.tolist()), self._sites)
                    for c in chunks
                ]
            )
            at_w = [(a[where], d[where]) for a, d in found]  # the rows of ``index``
        moved, batch_grads, start = [], [], 0
        for (rho, _), run in itertools.groupby(terms, key=lambda t: (t.rho, t.adaptive)):
            run = list(run)
            sizes = [len(t.indices) for t in run]
            rows = slice(start, start + sum(sizes))
            start = rows.stop
            if rho == 0:
                moved.append([(a[rows], d[rows]) for a, d in at_w])  # type: ignore[union-attr]
                continue
            width = max(sizes)
            # where each step's rows sit when every step is padded to ``width`` rows
            kept = torch.cat(
                [
                    torch.arange(k * width, k * width + m, device=self.device)
                    for k, m in enumerate(sizes)
                ]
            )
            padded = len(kept) != len(run) * width
            if self.perturbation == "dataset":  # one perturbation per checkpoint
                e = {n: v.expand(len(run), *v.shape[1:]) for n, v in self._eps(run[:1]).items()}  # type: ignore[union-attr]
            else:  # the mean gradient of each recorded batch
                own = [
                    tuple(
                        _spread(x[rows], kept, len(run) * width).unflatten(0, (len(run), width))
                        for x in pair
                    )
                    for pair in at_w  # type: ignore[union-attr]
                ]
                count = torch.tensor(sizes, dtype=self._dtype(), device=self.device)
                g = {
                    n: v / count.view(-1, *[1] * (v.dim() - 1))
                    for n, v in factored.factor_grad_sum(own, self._sites).items()  # type: ignore[arg-type]
                }
                batch_grads.extend(v.reshape(-1) for v in g.values())
                e = vmap(self._sam(run), in_dims=(None, 0))(p, g)
            shifted = {n: p[n] + e[n] for n in p}
            fill = [
                i for t in run for i in [*t.indices, *[t.indices[0]] * (width - len(t.indices))]
            ]
            batch = self._fetch(fill)
            f = factored.linear_factors_stacked(floss, shifted, batch, self._sites, len(run))
            moved.append(
                [
                    tuple(x.flatten(0, 1)[kept] if padded else x.flatten(0, 1) for x in pair)
                    for pair in f
                ]
            )
        if batch_grads:  # one check for the group (NaN would reach the scores anyway)
            _finite(torch.cat(batch_grads), "gradients of a recorded batch", terms)
        return terms, index, at_w, factored.concat_factors(moved)

    def _step_coefficients(self, terms: Sequence[Any]) -> Tensor:
        """Each step's coefficient, repeated for each of its examples."""
        coef = self._coefficients(terms)
        return coef.repeat_interleave(
            torch.tensor([len(t.indices) for t in terms], device=coef.device)
        )

    def _factored_steps(
        self, tests: list[factored.Factors], terms: Sequence[Any], scores: Tensor
    ) -> None:
        """Add the scores of recorded steps at one checkpoint to ``(n_test, n)`` ``scores``.

        ``tests``: the test factors of that checkpoint (a one-element list, as
        :meth:`_test_factors` returns them for one term). One cross product of the
        test factors with the perturbed factors of all the steps: the same scores as
        step by step, in fewer and larger operations.
        """
        terms, index, _, moved = self._step_factors(terms, need_w=False)
        gram = factored.factor_cross(tests[0], moved, self._sites)
        gram.mul_(self._step_coefficients(terms))
        scores.index_add_(1, index, _finite(gram, "training gradients", terms))

    def _factored_step_self(self, terms: Sequence[Any], scores: Tensor) -> None:
        """Add the self influence of recorded steps at one checkpoint to ``(n,)`` ``scores``."""
        terms, index, at_w, moved = self._step_factors(terms, need_w=not self.test_at_perturbed)
        test = moved if self.test_at_perturbed else at_w
        dots = factored.factor_dots(test, moved, self._sites)  # type: ignore[arg-type]
        dots = dots * self._step_coefficients(terms)
        scores.index_add_(0, index, _finite(dots, "gradients", terms))

    def _merged_self_influence(self, show_progress: bool) -> Tensor | None:
        """Checkpoint-form self influence of the training set in two passes, or ``None``.

        Applies when the perturbation is the mean gradient over the training set, not
        yet known, and the factors at ``w`` of every local example fit in
        :data:`MERGE_BUDGET_BYTES`; otherwise the caller takes the general path.
        """
        terms = self._terms
        key = self._eps_key(terms)
        if (
            self.perturbation != "dataset"
            or self.perturbation_dataloader is not self.train_dataloader
            or self.test_at_perturbed
            or key in self._dataset_eps
            or all(t.rho == 0 for t in terms)
        ):
            return None
        params, _ = self._stack(terms)
        losses = self._term_losses(terms)
        total = {n: torch.zeros_like(v) for n, v in params.items()}
        count, stored = 0, []
        batches = progress(
            local_batches(self.train_dataloader, self.device),
            show_progress,
            f"{self.get_name()}: self influence, pass 1 of 2",
        )
        usable = True
        for i, batch in batches:
            if not stored and not self._factored(terms, batch):
                usable = False
                break
            fs = [factored.linear_factors(floss, p, batch, self._sites) for p, floss in losses]
            size = len(fs[0][0][0])
            if not stored and _nbytes(fs) * self.n_train / size > MERGE_BUDGET_BYTES:
                usable = False
                break
            for k, f in enumerate(fs):
                for n, g in factored.factor_grad_sum(f, self._sites).items():
                    total[n][k] += g
            count += size
            stored.append((i, batch, fs))
        # every rank takes the same path (a rank may have no batch to decide on)
        refused = all_reduce_sum(torch.tensor([0.0 if usable else 1.0], dtype=torch.float64))
        if refused[0] > 0:
            return None
        self._store_dataset_eps(terms, total, count, "train_dataset")
        second = progress(stored, show_progress, f"{self.get_name()}: self influence, pass 2 of 2")
        out = [(i, self._factored_pair_dots(terms, b, own=fs)) for i, b, fs in second]
        return torch.cat(gather_ordered(out))


def _spread(x: Tensor, kept: Tensor, rows: int) -> Tensor:
    """``x`` placed at rows ``kept`` of ``rows`` zero rows (no copy when nothing is padded)."""
    if len(kept) == rows:
        return x
    return x.new_zeros(rows, *x.shape[1:]).index_copy_(0, kept, x)


def _nbytes(factors: list[factored.Factors]) -> int:
    return sum(t.numel() * t.element_size() for f in factors for pair in f for t in pair)
