r"""SAM-GIF's per-example products from layer factors, without ``vmap`` over autograd.

For models whose attributed parameters all sit in layer sites (``nn.Linear``,
``nn.Conv2d``; :mod:`captum_sam.core.layers.sites`), the products
:math:`\nabla l_k(w) \cdot \nabla l_k(w + \epsilon)` and test-train products come from
layer inputs and output gradients: one batched forward/backward pass per weight point
and batch, then per layer the cheaper of ghost products and gradients formed by one
batched matmul (:mod:`captum_sam.core.layers.products`), or, with a projection, the
per-layer Kronecker projection computed from the factors
(:class:`~captum_sam.core.projection.LayerProjection`). The path is used only after a
numerical check against ``vmap`` on the first batch (models whose examples interact,
e.g. BatchNorm in train mode, fall back to
:class:`~captum_sam.gif.vmap_grads.VmapGradients`).

A batch's gradients at one weight point are held in one of three *representations*:
raw factors (one ``(a, d)`` pair per site), compact entries (factors where ghost
products are cheaper, formed gradients elsewhere) or projected rows ``(B, D)``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from captum_sam import core as F
from captum_sam.core.data import on_device, validate_batch
from captum_sam.core.layers import products, sites
from captum_sam.core.losses import batch_size, slice_batch
from captum_sam.core.projection import LayerProjection
from captum_sam.gif import head
from captum_sam.gif.points import WeightPoints
from captum_sam.gif.terms import Term, check_finite_terms

__all__ = ["FactoredGradients", "Rep", "TEST_PIECE_ROWS", "like_rows", "put_rows"]

TEST_PIECE_ROWS = 32
"""Test examples whose raw layer factors (a convolution's unfolded patches: 20 MB per
example of a ResNet-18) are held at once; a larger test batch, e.g. a tuple of inputs,
is taken in pieces (the kept representation does not depend on the cut)."""

Rep = list[products.Entry] | Tensor
"""A batch's gradients at one weight point: per-site entries, or projected rows ``(B, D)``."""


@dataclass
class FactoredGradients:
    """Factored per-example products for the terms of one estimator.

    Args:
        points: Stacked weights and perturbations.
        sites: The layer sites holding the attributed parameters (``None``: the path
            does not apply).
        train_loss: The training loss (the model structure is the private copy).
        test_loss: The test loss.
        usable_with: Whether the estimator's settings allow the path at all (no
            per-example perturbation).
        test_at_perturbed: Test side at ``w + eps``.
        device: Where the model lives.
        projector: The estimator's projection, or ``None``.
    """

    points: WeightPoints
    sites: list[sites.Site] | None
    train_loss: F.FunctionalLoss
    test_loss: F.FunctionalLoss
    usable_with: bool
    test_at_perturbed: bool
    device: torch.device
    projector: LayerProjection | None = None
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
            self._checked[key] = sites.matches_vmap(floss, state.params, batch, self.sites)
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

    def moved_loss(self, floss: F.FunctionalLoss, eps: F.Params) -> F.FunctionalLoss:
        """``floss`` with its perturbed non-attributed parameters moved by ``eps``."""
        extra = self.points.extra
        if not extra:
            return floss
        return floss.bind({n: v + eps[n] if n in extra else v for n, v in floss.frozen.items()})

    def factors(self, floss: F.FunctionalLoss, params: F.Params, batch: Any) -> sites.Factors:
        """Raw factors of a batch at ``params`` (one forward/backward pass)."""
        return sites.layer_factors(floss, params, batch, self.sites)  # type: ignore[arg-type]

    def factors_and_extra(
        self, floss: F.FunctionalLoss, params: F.Params, batch: Any
    ) -> tuple[sites.Factors, F.Params]:
        """:meth:`factors` and the summed gradient in the other perturbed parameters.

        The parameters that a perturbation moves but that are not attributed
        (:attr:`WeightPoints.extra`), from the same forward and backward pass.
        """
        extra = self.points.extra
        if not extra:
            return self.factors(floss, params, batch), {}
        return sites.layer_factors_and_grads(floss, params, batch, self.sites, extra)  # type: ignore[arg-type]

    # ------------------------------------------------------------------ representations

    def represent(self, f: Sequence[products.Entry], pairs_per_row: float = 1.0) -> Rep:
        """Raw factors as compact entries, or projected rows ``(B, D)`` with a projection.

        ``pairs_per_row``: how many products each row will enter (see
        :func:`~captum_sam.core.layers.products.prefers_formed`).
        """
        if self.projector is None:
            return products.compact(f, self.sites, pairs_per_row)  # type: ignore[arg-type]
        keys = [(s.weight, s.bias) for s in self.sites]  # type: ignore[union-attr]
        return self.projector.project_factors(f, keys)  # type: ignore[arg-type]

    def shrink(self, f: Sequence[products.Entry]) -> list[products.Entry]:
        """Factors to keep for later: compact without a projection, raw with one.

        (Raw factors still give gradient sums, which a perturbation may need.)
        """
        if self.projector is None:
            return products.compact(f, self.sites)  # type: ignore[arg-type]
        return list(f)

    def dots(self, x: Rep, y: Rep) -> Tensor:
        """Per-example inner products ``(B,)`` of two representations of the same rows."""
        if self.projector is not None:
            x, y = (r if isinstance(r, Tensor) else self.represent(r) for r in (x, y))
            return torch.linalg.vector_norm(x, dim=1).square() if x is y else (x * y).sum(1)
        return products.factor_dots(x, y, self.sites)  # type: ignore[arg-type]

    def cross(self, x: Rep, y: Rep) -> Tensor:
        """Inner products ``(m, B)`` of every row of ``x`` with every row of ``y``."""
        if self.projector is not None:
            x, y = (r if isinstance(r, Tensor) else self.represent(r) for r in (x, y))
            return x @ y.T
        return products.factor_cross(x, y, self.sites)  # type: ignore[arg-type]

    def row_floats(self, terms: Sequence[Term], batch: tuple[Any, ...]) -> tuple[int, int]:
        """Numbers per example of raw factors and of the kept representation.

        From one example of ``batch`` at the first term's weights.
        """
        ((p, floss),) = self.term_losses(terms[:1])
        f = self.factors(floss, p, sites.head(batch, 1))
        kept = self.represent(f)
        raw = products.entry_floats(f)
        return raw, kept.numel() if isinstance(kept, Tensor) else products.entry_floats(kept)

    # ------------------------------------------------------------------ per term

    def train_factors(
        self,
        terms: Sequence[Term],
        batch: tuple[Any, ...],
        need_w: bool,
        own: list[Rep] | None = None,
    ) -> list[tuple[Any, sites.Factors]]:
        """Per term: factors at ``w`` (if ``need_w`` or needed) and raw ones at ``w + eps``.

        ``own``: representations at ``w`` if already known (returned in place of the
        factors at ``w``). Holds every term's factors at once: the products below
        iterate :meth:`iter_train_factors` instead, one term in memory at a time.
        """
        return list(self.iter_train_factors(terms, batch, need_w, own))

    def iter_train_factors(
        self,
        terms: Sequence[Term],
        batch: tuple[Any, ...],
        need_w: bool,
        own: list[Rep] | None = None,
    ) -> Iterator[tuple[Any, sites.Factors]]:
        """:meth:`train_factors`, one term at a time.

        A convolution's unfolded patches are the largest tensors of the factored path:
        one checkpoint's at a time.
        """
        points = self.points
        shortcut = self.points.perturbation == "batch" and not points.extra
        eps = None if shortcut else points.eps(terms)
        for k, (term, (p, floss)) in enumerate(zip(terms, self.term_losses(terms))):
            at_w = None if own is None else own[k]
            if at_w is None and (need_w or eps is None or term.rho == 0):
                at_w = self.factors(floss, p, batch)
            if term.rho == 0:
                moved = at_w
            else:
                if eps is not None:
                    e = {n: v[k] for n, v in eps.items()}
                    mloss = self.moved_loss(floss, e)
                else:  # "batch": the mean gradient of the recorded batch, from ``at_w``
                    g = products.factor_grad_sum(at_w, self.sites)  # type: ignore[arg-type]
                    g = F.tree_scale(g, 1.0 / products.row_count(at_w))  # type: ignore[arg-type]
                    check_finite_terms(g, "gradients of a recorded batch", [term])
                    e = F.sam_perturbation(p, g, term.rho, term.adaptive)
                    mloss = floss
                shifted = {n: p[n] + e[n] for n in p}
                moved = self.head_moved(mloss, shifted, batch, at_w)
                if moved is None:
                    moved = self.factors(mloss, shifted, batch)
            yield at_w, moved
            del at_w, moved

    def head_moved(
        self, floss: F.FunctionalLoss, shifted: F.Params, batch: Any, at_w: Any
    ) -> sites.Factors | None:
        """Factors at ``w + eps`` from the input at ``w`` when only the output layer moves.

        (:mod:`captum_sam.gif.head`; checked against a real pass once per loss.)
        """
        if at_w is None or not head.applies(self.points.extra, self.sites):
            return None
        site = self.sites[0]  # type: ignore[index]
        key = ("head", floss.loss_fn, floss.reduction)
        if key not in self._checked:  # None: not decidable on this representation
            verdict = head.head_matches(floss, shifted, batch, site, at_w)
            if verdict is None:
                return None
            self._checked[key] = verdict
        if not self._checked[key]:
            return None
        return head.head_factors(floss, shifted, batch, site, at_w)

    def pair_dots(
        self, terms: Sequence[Term], batch: tuple[Any, ...], own: list[Rep] | None = None
    ) -> Tensor:
        """``sum_k c_k test_k(x) . train_k(x)`` for every example; ``own``: reps at ``w``."""
        coef = self.points.coefficients(terms)
        total = None
        pairs = self.iter_train_factors(terms, batch, not self.test_at_perturbed, own)
        for k, (at_w, moved) in enumerate(pairs):
            test = moved if self.test_at_perturbed else at_w
            dots = coef[k] * self.dots(test, moved)
            total = dots if total is None else total + dots
            del at_w, moved, test  # before the next term's factors are computed
        return check_finite_terms(total, "gradients", terms)

    def test_factors(
        self, terms: Sequence[Term], inputs: Iterable[tuple[Any, ...]], aggregate: bool
    ) -> list[Rep] | None:
        """Per term, the test side of all test rows (summed with ``aggregate``), or ``None``.

        ``None`` when the test gradients change with every recorded step
        (``test_at_perturbed`` with the ``"batch"`` perturbation) or the path does
        not apply. Each site is kept as factors or formed, whichever makes the
        test-train products cheaper (:func:`~captum_sam.core.layers.products.prefers_formed`
        with the number of test rows per training row).
        """
        points = self.points
        if self.test_at_perturbed and points.perturbation == "batch":
            return None
        eps = points.eps(terms) if self.test_at_perturbed else None
        losses = self.term_losses(terms, self.test_loss)
        parts: list[list[Rep]] = [[] for _ in terms]
        rows = 1.0
        for i, b in enumerate(on_device(inputs, self.device)):
            p0, floss0 = losses[0]
            validate_batch(floss0, p0, b, "inputs", run_loss=i == 0)
            if i == 0:
                if not (self.applies(terms, b) and self.applies(terms, b, test=True)):
                    return None
                rows = 1.0 if aggregate else float(len(b[-1]))
            for k, (p, floss) in enumerate(losses):
                if eps is None:
                    at, mloss = p, floss
                else:
                    e = {n: v[k] for n, v in eps.items()}
                    at, mloss = {n: p[n] + e[n] for n in p}, self.moved_loss(floss, e)
                count = batch_size(b)
                store: Rep | None = None  # a batch cut in pieces: its rows, filled in place
                step = TEST_PIECE_ROWS
                for start in range(0, count, step):  # raw factors a piece at a time
                    piece = b if count <= step else slice_batch(b, start, start + step)
                    f = self.factors(mloss, at, piece)
                    if aggregate and self.projector is None:
                        g = products.factor_grad_sum(f, self.sites)  # type: ignore[arg-type]
                        parts[k].append(_formed_sum(g, self.sites))  # type: ignore[arg-type]
                        continue
                    rep = self.represent(f, rows)  # (as many pairs per row as the batch)
                    del f
                    if aggregate:
                        parts[k].append(rep.sum(0, keepdim=True))  # type: ignore[union-attr]
                    elif count <= TEST_PIECE_ROWS:
                        parts[k].append(rep)
                    else:
                        store = like_rows(rep, count) if store is None else store
                        put_rows(store, rep, start)
                    del rep
                if store is not None:
                    parts[k].append(store)
                    del store
        if not parts[0]:
            raise ValueError("`inputs` is empty")
        out: list[Rep] = []
        for k in range(len(parts)):
            p, parts[k] = parts[k], []  # one term's parts and their copy at a time
            if isinstance(p[0], Tensor):
                joined = p[0] if len(p) == 1 else torch.cat(p)  # type: ignore[arg-type]
                out.append(joined.sum(0, keepdim=True) if aggregate else joined)
            else:
                joined = p[0] if len(p) == 1 else products.concat_factors(p, self.sites)  # type: ignore[arg-type]
                out.append(_summed(joined) if aggregate else joined)
            del p, joined
        for rep in out:
            check_finite_terms(rep_tensors(rep), "test gradients", terms)
        return out

    def apply(self, tests: F.Params, terms: Sequence[Term], batch: tuple[Any, ...]) -> Tensor:
        """``(m, batch)`` scores of formed test rows ``(K, m, numel)`` with factored training.

        With a projection the test rows are projected: ``{"projected": (K, m, D)}``.
        """
        total = None
        for k, (_, moved) in enumerate(self.iter_train_factors(terms, batch, need_w=False)):
            if self.projector is not None:
                gram = tests["projected"][k] @ self.represent(moved).T  # type: ignore[union-attr]
            else:
                rows = {n: v[k] for n, v in tests.items()}
                gram = products.factor_apply(moved, rows, self.sites)  # type: ignore[arg-type]
            total = gram if total is None else total + gram
            del moved
        return check_finite_terms(total, "training gradients", terms)

    def gram(
        self,
        tests: list[Rep],
        terms: Sequence[Term],
        batch: tuple[Any, ...],
        coef: Tensor | None,
        own: list[Rep] | None = None,
    ) -> Tensor:
        """``(n_test, batch)`` scores ``sum_k coef_k test_k . train_k`` from factors.

        ``own``: the batch's factors at ``w`` per term, when known (only the output
        layer perturbed: the factors at ``w + eps`` then need no forward pass).
        """
        total = None
        pairs = self.iter_train_factors(terms, batch, need_w=False, own=own)
        for k, (_, moved) in enumerate(pairs):
            gram = self.cross(tests[k], moved)
            gram = gram if coef is None else coef[k] * gram
            total = gram if total is None else total + gram
            del moved
        return check_finite_terms(total, "training gradients", terms)


def like_rows(rep: Rep, count: int) -> Rep:
    """Uninitialised storage shaped like ``rep`` with ``count`` rows."""
    if isinstance(rep, Tensor):
        return rep.new_empty(count, *rep.shape[1:])
    out: list[products.Entry] = []
    for entry in rep:
        parts = [None if x is None else x.new_empty(count, *x.shape[1:]) for x in entry]
        out.append(products.Formed(*parts) if isinstance(entry, products.Formed) else tuple(parts))  # type: ignore[arg-type]
    return out


def put_rows(store: Rep, rep: Rep, start: int) -> None:
    """Copy ``rep``'s rows into ``store`` from row ``start`` (same representation)."""
    pairs = (
        [(store, rep)]
        if isinstance(rep, Tensor)
        else [
            (s, x)
            for se, e in zip(store, rep)
            for s, x in zip(se, e)  # type: ignore[arg-type]
        ]
    )
    for s, x in pairs:
        if x is not None:
            s[start : start + len(x)] = x


def rep_rows(rep: Rep) -> int:
    """Number of rows of a representation."""
    return int(rep.shape[0]) if isinstance(rep, Tensor) else products.row_count(rep)


def rep_tensors(rep: Rep) -> list[Tensor]:
    """The tensors of a representation (its ``None`` parts left out)."""
    if isinstance(rep, Tensor):
        return [rep]
    return [x for e in rep for x in e if x is not None]


def _formed_sum(grad: F.Params, site_list: Sequence[sites.Site]) -> list[products.Entry]:
    """A gradient dict as one formed row per site."""
    return [
        products.Formed(
            None if s.weight is None else grad[s.weight].reshape(1, s.d_out, s.d_in),
            None if s.bias is None else grad[s.bias].reshape(1, s.d_out),
        )
        for s in site_list
    ]


def _summed(entries: list[products.Entry]) -> list[products.Entry]:
    """Formed rows summed to one row."""
    return products.map_rows(entries, lambda x: x.sum(0, keepdim=True))
