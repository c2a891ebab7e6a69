r"""Checkpoint-form SAM-GIF (Captum's ``TracInCP``): scores summed over checkpoints.

:math:`\mathrm{score}(z, z_k) = \sum_c \eta_c \nabla l(z; w_c)\cdot\nabla l_k(w_c+\epsilon_c)`.
Training batches are streamed (this rank's share under ``torch.distributed``); the
test side is computed once per call. Every checkpoint of a batch is evaluated in one
stacked ``vmap`` call, or on the factored path when every attributed parameter sits
in a layer site (``nn.Linear``, ``nn.Conv2d``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from captum_sam import core as F
from captum_sam.core.data import batch_context, local_batches, progress
from captum_sam.core.distributed import all_reduce_sum, gather_ordered, rank_and_world
from captum_sam.core.layers import products
from captum_sam.gif import head
from captum_sam.gif.factored_grads import (
    FactoredGradients,
    Rep,
    like_rows,
    put_rows,
    rep_tensors,
)
from captum_sam.gif.points import WeightPoints
from captum_sam.gif.terms import Term, check_finite_terms
from captum_sam.gif.vmap_grads import VmapGradients

__all__ = ["CheckpointForm", "MERGE_BUDGET_BYTES", "MERGE_MIN_KEPT", "TEST_BUDGET_BYTES"]

# factors at w of one checkpoint (and their batches) kept between the two passes of merged
# self influence, at most: the batches that fit take two passes, the second pass
# recomputes the others
MERGE_BUDGET_BYTES = 1 << 30
# ... but only when at least this fraction of the examples (this process's share under
# torch.distributed) fits: the memory spent is the whole budget, the time saved is in
# proportion to the examples kept (on a ResNet-18, whose factors take megabytes per
# example, 1 GiB keeps a few dozen of thousands)
MERGE_MIN_KEPT = 0.5
# test rows of every checkpoint kept during influence, at most (else one checkpoint at a
# time, one pass over the training data each)
TEST_BUDGET_BYTES = 1 << 30


@dataclass
class CheckpointForm:
    """Influence and self influence of the checkpoint form.

    Args:
        terms: One term per checkpoint.
        points: Stacked weights and perturbations.
        vmap: The general gradient source.
        factored: The factored gradient source.
        train_loss: The training loss.
        test_loss: The test loss.
        device: Where the model lives.
    """

    terms: list[Term]
    points: WeightPoints
    vmap: VmapGradients
    factored: FactoredGradients
    train_loss: F.FunctionalLoss
    test_loss: F.FunctionalLoss
    device: torch.device
    # the output layer's factors at w of the training batches (by index), per term, from
    # the perturbation's pass: read once by the next ``columns`` (see ``prepare``)
    _head_kept: dict[int, list[Rep]] = field(default_factory=dict)

    def prepare(self, train: Any = None, n_train: int = 0) -> None:
        """Compute the dataset perturbations on every rank before work is split.

        ``train``: the training batches :meth:`columns` scores next (``n_train``
        examples). When the
        perturbation is the mean gradient over them and moves only the output layer
        (:mod:`captum_sam.gif.head`), it is taken from that layer's factors, which are
        kept for those batches as long as they fit in :data:`MERGE_BUDGET_BYTES` (none
        when less than :data:`MERGE_MIN_KEPT` of the examples would): :meth:`columns`
        then needs no forward pass for them.
        """
        self._head_kept = {}
        if self.points.perturbation == "dataset":
            if train is None or not self._head_pass(train, n_train):
                self.points.eps(self.terms)

    def _head_pass(self, train: Any, n_train: int) -> bool:
        """The dataset perturbation from the output layer's factors, kept (``False``: n/a)."""
        terms, points, factored = self.terms, self.points, self.factored
        if (
            points.perturbation_data is not train
            or points.has_dataset_eps(terms)
            or not factored.usable_with
            or not head.applies(points.extra, factored.sites)
            or all(t.rho == 0 for t in terms)
        ):
            return False
        first = self._first_pass(terms, train, n_train, local_batches(train, self.device),
                                 lambda f: f, with_batch=False)  # fmt: skip
        if first is None:
            return False
        self._head_kept = {i: reps for i, _, reps in first[0]}
        return True

    def columns(
        self,
        test: Iterable[tuple[Any, ...]],
        train: Iterable[tuple[int, tuple[Any, ...]]],
        aggregate: bool,
        train_again: Callable[[], Iterable[tuple[int, tuple[Any, ...]]]] | None = None,
    ) -> Iterator[tuple[int, Tensor]]:
        """``(batch index, (n_test, batch) scores)`` for the given training batches.

        ``train_again``: the same batches once more (no progress bar). When given and the
        factored test rows of all checkpoints would exceed :data:`TEST_BUDGET_BYTES`,
        the checkpoints are taken one at a time (one pass over the training batches
        each, the scores accumulated): the same numbers with one checkpoint's test rows
        in memory.
        """
        terms, points = self.terms, self.points
        coef = points.coefficients(terms).view(-1, 1, 1)
        if train_again is not None and len(terms) > 1 and not self.vmap.test_at_perturbed:
            first = self.factored.test_factors(terms[:1], test, aggregate)
            if first is not None and _nbytes(first) * len(terms) > TEST_BUDGET_BYTES:
                held = [first]  # handed over: freed after the first checkpoint's pass
                del first
                yield from self._columns_by_term(held, test, train, train_again, aggregate)
                return
            rest = None if first is None else self.factored.test_factors(terms[1:], test, aggregate)
            factors = None if rest is None else first + rest  # type: ignore[operator]
        else:
            factors = self.factored.test_factors(terms, test, aggregate)
        tests = None
        if factors is None:
            tests = {
                n: coef * v
                for n, v in self.vmap.test_matrix(terms, test, self.test_loss, aggregate).items()
            }
        kept, self._head_kept = self._head_kept, {}  # read once
        for i, batch in train:
            with batch_context("train_dataset", i):
                block = self._column(
                    factors, tests, terms, batch, coef, aggregate, kept.pop(i, None)
                )
            yield i, block

    def _columns_by_term(
        self,
        held: list[list[Any]],
        test: Iterable[tuple[Any, ...]],
        train: Iterable[tuple[int, tuple[Any, ...]]],
        train_again: Callable[[], Iterable[tuple[int, tuple[Any, ...]]]],
        aggregate: bool,
    ) -> Iterator[tuple[int, Tensor]]:
        """:meth:`columns` one checkpoint at a time, the blocks summed over them.

        ``held``: a list holding the first checkpoint's test rows, emptied here so that
        they are freed before the next checkpoint's are computed.
        """
        terms = self.terms
        self.points.share_dataset_eps(terms)  # no pass over the data per checkpoint
        coef = self.points.coefficients(terms)
        kept, self._head_kept = self._head_kept, {}  # read once
        blocks: dict[int, Tensor] = {}
        for k, term in enumerate(terms):
            tests = held.pop() if k == 0 else self.factored.test_factors([term], test, aggregate)
            for i, batch in train if k == 0 else train_again():
                own = kept[i][k : k + 1] if i in kept else None
                with batch_context("train_dataset", i):
                    block = self.factored.gram(tests, [term], batch, coef[k : k + 1], own)  # type: ignore[arg-type]
                blocks[i] = block if k == 0 else blocks[i].add_(block)
            del tests
        del kept
        yield from blocks.items()

    def _column(
        self, factors: Any, tests: Any, terms: list[Term], batch: tuple[Any, ...],
        coef: Tensor, aggregate: bool, own: list[Rep] | None = None,
    ) -> Tensor:  # fmt: skip
        """The ``(n_test, batch)`` scores of one training batch (``own``: its factors at w)."""
        if factors is not None:
            return self.factored.gram(factors, terms, batch, coef.view(-1), own)
        if aggregate and self.factored.applies(terms, batch):  # one summed test row
            return self.factored.apply(tests, terms, batch)
        grads = self.vmap.grads(terms, batch, self.train_loss, False, True)[1]
        block = sum(
            torch.bmm(tests[n], grads[n].transpose(1, 2)).sum(0)  # type: ignore[index]
            for n in tests
        )
        return check_finite_terms(block, "training gradients", terms)

    def pair_dots(self, terms: list[Term], batch: tuple[Any, ...]) -> Tensor:
        """``sum_k c_k test_side_k(x) . train_side_k(x)`` for every example ``x``."""
        if self.factored.applies(terms, batch):
            return self.factored.pair_dots(terms, batch)
        if self.vmap.test_at_perturbed:
            train = self.vmap.grads(terms, batch, self.train_loss, False, True)[1]
            test = train
            if self.vmap.batch_stats is not None:  # test side on the running statistics
                test = self.vmap.test_side(terms, batch, self.train_loss)
        else:
            test, train = self.vmap.grads(terms, batch, self.train_loss, True, True)
        coef = self.points.coefficients(terms)
        dots = coef @ sum(rowdot(test[n], train[n]) for n in train)  # type: ignore[index]
        return check_finite_terms(dots, "gradients", terms)

    def merged_self_influence(
        self, train: Any, n_train: int, show_progress: bool, name: str
    ) -> Tensor | None:
        """Self influence of the training set on the factored path, or ``None``.

        Applies when the perturbation is the mean gradient over the training set and
        not yet known. The first pass takes the perturbation gradient from the layer
        factors at ``w`` (no ``vmap``; the gradient in perturbed parameters that are
        not attributed, such as all but the last layer of
        :class:`~captum_sam.SAMTracInCPFast`, from the same backward pass) and keeps
        the batches' factors at ``w`` (with the batches) for as long as they fit in
        :data:`MERGE_BUDGET_BYTES`: self influence costs two passes per checkpoint
        for the kept batches, and the second pass recomputes the factors of the
        others (three passes for those, memory of one batch).
        Nothing is kept when the budget holds less than :data:`MERGE_MIN_KEPT` of the
        examples this process scores (estimated from the first batch).

        The checkpoints are taken one at a time, each with its own two passes: the
        factors of one checkpoint are held, and the training data is read once per
        checkpoint when every batch is kept (with its factors), as Captum reads it.
        Holding several checkpoints' factors to read the data fewer times was measured
        slower as well as larger (``bench_cnn_gif.py``'s CNN, n 2000, 10 checkpoints:
        all ten at once 10.0-10.4 s, 1.6 GB peak; one at a time 8.5-9.6 s, 0.95 GB).
        """
        terms, points = self.terms, self.points
        if (
            points.perturbation != "dataset"
            or points.perturbation_data is not train
            or self.vmap.test_at_perturbed
            or points.has_dataset_eps(terms)
            or all(t.rho == 0 for t in terms)
        ):
            return None
        total = None
        for k, term in enumerate(terms):
            where = f"checkpoint {k + 1} of {len(terms)}, " if len(terms) > 1 else ""
            scores = self._merged_checkpoint([term], train, n_train, show_progress, name, where)
            if scores is None:  # refused on the first batch (the first checkpoint)
                return None
            total = scores if total is None else total.add_(scores)
        return total

    def _merged_checkpoint(
        self,
        terms: list[Term],
        train: Any,
        n_train: int,
        show_progress: bool,
        name: str,
        where: str = "",
    ) -> Tensor | None:
        """:meth:`merged_self_influence` of one checkpoint's ``terms`` (``None``: refused).

        ``where`` (``"checkpoint 2 of 3, "``) goes into the progress bars' text.
        """
        start = f"Using {name} to compute self influence ({where}pass"
        batches = progress(
            local_batches(train, self.device),
            show_progress,
            f"{start} 1 of 2). Processing batch",
            total=_length(train),
        )
        first = self._first_pass(terms, train, n_train, batches, self.factored.represent, True)
        if first is None:
            return None
        stored, keep = first
        second = progress(
            stored if keep else _kept_then_recomputed(stored, train, self.device),
            show_progress,
            f"{start} 2 of 2). Processing batch",
        )
        out = []
        for i, b, fs in second:
            with batch_context("train_dataset", i):
                out.append((i, self.factored.pair_dots(terms, b, own=fs)))
        return torch.cat(gather_ordered(out))

    def _first_pass(
        self,
        terms: list[Term],
        train: Any,
        n_train: int,
        batches: Iterable[tuple[int, tuple[Any, ...]]],
        keep_as: Callable[[Any], Rep],
        with_batch: bool,
    ) -> tuple[list[tuple[int, Any, list[Rep]]], bool] | None:
        """A pass at ``w``: the dataset perturbation from layer factors, and factors kept.

        Over ``batches`` of ``train``, the perturbation of ``terms`` is summed from layer
        factors and stored. Per term, ``keep_as(raw factors)`` is kept (with the batch
        when ``with_batch``) for the prefix of the batches that fits in
        :data:`MERGE_BUDGET_BYTES`, in one :class:`_RowStore`; nothing when less than
        :data:`MERGE_MIN_KEPT` of the examples this process scores would fit
        (estimated from the first batch).

        Returns:
            ``(kept, every)``: the kept ``(batch index, batch or None, per-term reps)``
            in order, and whether every batch was kept; ``None`` when the factored path
            is refused on the first batch (on every rank alike).
        """
        points, factored = self.points, self.factored
        losses = factored.term_losses(terms)
        # the perturbation's gradient sum over its scope (non-attributed parameters too)
        total = {n: torch.zeros_like(v) for n, v in points.scoped_stack(terms)[0].items()}
        count, stored = 0, []
        usable, keep, held = True, True, 0
        store: _RowStore | None = None
        for i, batch in batches:
            if not count and not factored.applies(terms, batch):
                usable = False
                break
            fs = []  # one term's raw factors at a time
            for k, (p, floss) in enumerate(losses):
                with batch_context("train_dataset", i):
                    f, extra = factored.factors_and_extra(floss, p, batch)
                for n, g in extra.items():
                    total[n][k] += g
                size = products.row_count(f)
                kept = keep_as(f)
                # formed entries sum faster than raw factors (projected rows cannot)
                summable = f if isinstance(kept, Tensor) else kept
                for n, g in products.factor_grad_sum(summable, factored.sites).items():  # type: ignore[arg-type]
                    total[n][k] += g
                fs.append(kept)
                del f, summable
            # with the batch's tensors (a flat tuple, as core.losses.to_device has it)
            tensors = [x for x in batch if isinstance(x, Tensor)] if with_batch else []
            nbytes = _nbytes([*fs, *tensors])
            # a prefix of the batches is kept
            keep = keep and held + nbytes <= MERGE_BUDGET_BYTES
            if keep and store is None:  # room for what the budget allows, at most every row
                rows = MERGE_BUDGET_BYTES * size // max(nbytes, 1)
                keep = rows >= MERGE_MIN_KEPT * _local_share(train, n_train)
                store = _RowStore(min(n_train, max(size, rows)))
            if keep and store is not None:
                stored.append((i, batch if with_batch else None, store.put(fs, size)))
                held += nbytes
            count += size
        # every rank takes the same path (a rank may have no batch to decide on)
        refused = all_reduce_sum(torch.tensor([0.0 if usable else 1.0], dtype=torch.float64))
        if refused[0] > 0:
            return None
        points.store_dataset_eps(terms, total, count, "train_dataset")
        return stored, keep


def _kept_then_recomputed(
    stored: list[tuple[int, Any, list[Rep]]], train: Any, device: torch.device
) -> Iterator[tuple[int, Any, list[Rep] | None]]:
    """The kept batches with their factors, then every other batch (factors ``None``)."""
    yield from stored
    kept = {i for i, _, _ in stored}
    for i, b in local_batches(train, device):
        if i not in kept:
            yield i, b, None


class _RowStore:
    """The kept per-example rows of every batch, in order, in one store per term.

    Kept rows that stayed as separate tensors of a batch each would sit in the
    allocator's heap between the pass's transient tensors and pin it: on a small CNN
    that fragmentation tripled the memory self influence adds. One store of ``rows``
    rows per term (:func:`~captum_sam.gif.factored_grads.like_rows`, allocated on the
    first batch; untouched rows take no resident memory) holds them instead; a batch
    that does not fit the stores' shapes is kept as it is.
    """

    def __init__(self, rows: int) -> None:
        self.rows = rows
        self.stores: list[Rep] | None = None
        self.filled = 0

    def put(self, reps: list[Rep], size: int) -> list[Rep]:
        """``reps`` (per term: entries or projected rows) as views of the stores."""
        if self.stores is None:
            self.stores = [like_rows(rep, max(self.rows, size)) for rep in reps]
        lo, hi = self.filled, self.filled + size
        held = [t for store in self.stores for t in rep_tensors(store)]
        given = [t for rep in reps for t in rep_tensors(rep)]
        if (
            len(given) != len(held)
            or hi > len(held[0])
            or any(
                t.shape != (size, *h.shape[1:]) or t.dtype != h.dtype for t, h in zip(given, held)
            )
        ):
            return reps
        for store, rep in zip(self.stores, reps):
            put_rows(store, rep, lo)
        self.filled = hi
        rows = lambda t: t[lo:hi]  # noqa: E731
        return [
            rows(store) if isinstance(store, Tensor) else products.map_rows(store, rows)
            for store in self.stores
        ]


def rowdot(a: Tensor, b: Tensor) -> Tensor:
    """Inner products along the last dimension, ``(K, B, n) -> (K, B)``, with no temporary."""
    if a is b:
        return torch.linalg.vector_norm(a, dim=-1).square()
    return torch.einsum("kbi,kbi->kb", a, b)


def _local_share(train: Any, n_train: int) -> float:
    """How many training examples this process scores (expected).

    Its round-robin share of the batches (:func:`~captum_sam.core.distributed.shard`);
    every example in a single process.
    """
    rank, world = rank_and_world()
    batches = _length(train)
    if world == 1 or not batches:
        return n_train / world
    return n_train * len(range(rank, batches, world)) / batches


def _length(data: Any) -> int | None:
    try:
        return len(data)
    except TypeError:
        return None


def _nbytes(reps: list[Any]) -> int:
    """Bytes held by per-term representations (entries or projected rows, or tensors)."""
    return sum(t.numel() * t.element_size() for rep in reps for t in rep_tensors(rep))
