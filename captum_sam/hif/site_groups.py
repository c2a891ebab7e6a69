r"""Influence scores of a direct Kronecker inverse, a group of layers per pass.

With K-FAC/EK-FAC (``fast`` or ``plain``, no sketch) the solved test rows are
block-diagonal: a score is a sum over the layer blocks of the products of a training
example's gradient block with the test rows' block. When the test rows do not fit in
:data:`~captum_sam.hif.sides.TEST_BUDGET_BYTES` together they are taken a group of
*blocks* at a time (every test row, the blocks of the group: :func:`plan`) instead of a
group of rows (every block), and the partial scores of the groups are added. Each pass
over the training data then forms the per-example gradients of its own layers only
(forming them is paid once over all the passes, not once per pass) and back-propagates
only down to its lowest layer (the other layers' parameters are held constant, so no
graph is built below it). The numbers are those of the row groups.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import BatchSampler, DataLoader, SequentialSampler

from captum_sam import core as F
from captum_sam.core.data import as_loader, on_device, validate_batch
from captum_sam.core.distributed import gather_ordered
from captum_sam.core.layers import sites as layer_sites
from captum_sam.core.losses import batch_size, slice_batch
from captum_sam.hif import sides
from captum_sam.hif.inverse import LowRankInverse

__all__ = ["SiteGroup", "plan", "scores"]


@dataclass(frozen=True)
class SiteGroup:
    """Some blocks of a Kronecker inverse and some test rows, scored in one pass.

    Args:
        blocks: Indices into the inverse's ``curvature.sites``.
        sites: The matching gradient sites (of ``est._grad_sites``).
        names: Their parameters, in the group's column order.
        rows: Test rows ``[start, stop)``.
    """

    blocks: list[int]
    sites: list[layer_sites.Site]
    names: list[str]
    rows: tuple[int, int]

    def restrict(self, loss: F.FunctionalLoss, point: F.Params) -> tuple[Any, F.Params]:
        """``loss`` with every parameter outside the group held constant, and the group's."""
        held = {n: v.detach() for n, v in point.items() if n not in self.names}
        return loss.bind({**loss.frozen, **held}), {n: point[n] for n in self.names}

    def factors(
        self, loss: F.FunctionalLoss, point: F.Params, batch: tuple[Any, ...]
    ) -> list[tuple[Tensor, Tensor]] | None:
        """The group's layer factors of a batch (``restrict``-ed ``loss``), or ``None``."""
        try:
            return layer_sites.layer_factors(loss, point, batch, self.sites)
        except layer_sites.Unsupported:  # e.g. a layer called twice in this batch only
            return None

    def columns(self, grads: Tensor, names: Sequence[str], point: F.Params) -> Tensor:
        """The group's columns of flat ``(B, P)`` rows laid out as ``names``."""
        offsets = sides.column_offsets(list(names), point)
        return torch.cat([grads[:, slice(*offsets[n])] for n in self.names], dim=1)


def _rows(inputs: Any, est: Any) -> int | None:
    """Number of test rows when ``inputs`` gives the same rows in the same order each time."""
    data = as_loader(inputs, est.batch_size, "inputs")
    if not isinstance(data, DataLoader):
        return sum(batch_size(b) for b in data)
    batches = data.batch_sampler
    repeatable = (
        type(batches) is BatchSampler
        and isinstance(batches.sampler, SequentialSampler)
        and not batches.drop_last
    )
    return len(data.dataset) if repeatable else None  # type: ignore[arg-type]


def plan(est: Any, inputs: Any, budget: int) -> list[SiteGroup] | None:
    """Groups of blocks (and rows) whose solved test rows fit in ``budget`` bytes each.

    ``None`` (score by row groups) unless the inverse is a direct Kronecker one whose
    blocks are the gradient sites, the scores are plain products (not ``exact``, no
    sketch), the training and test gradients come from layer factors, the test rows
    are repeatable, and they do not fit in ``budget`` together. Consecutive blocks from
    the output layer down are packed into a group while it fits; a block too large for
    ``budget`` with every row is scored a slice of rows at a time.
    """
    if est.variant == "exact" or est.sketch is not None or isinstance(est.inverse, LowRankInverse):
        return None
    index = sides.kronecker_index(est)
    n_test = _rows(inputs, est)
    if index is None or not n_test:
        return None
    item = est.operator.mean_grad[est.names[0]].element_size()
    if n_test * est.operator.dim * item <= budget:
        return None  # one group of rows: one pass
    op = est.operator
    first_train = next(iter(on_device(est.train_dataloader, est.device)), None)
    data = as_loader(inputs, est.batch_size, "inputs")
    first_test = next(iter(on_device(data, est.device)))
    if first_train is None:
        return None
    validate_batch(est._test_loss, op.params, first_test, "inputs_dataset", run_loss=True)
    if sides.factored_sites(est, op.loss_at(op.point), op.point, first_train) is None:
        return None
    if sides.factored_sites(est, est._test_loss, op.params, first_test) is None:
        return None
    curvature = est.inverse.inverse.curvature
    groups: list[SiteGroup] = []
    pending: list[int] = []

    def close() -> None:
        if pending:
            groups.append(_group(est, index, pending[::-1], (0, n_test)))
            pending.clear()

    for b in reversed(range(len(curvature.sites))):
        size = n_test * _numel(curvature.sites[b], curvature.like) * item
        if size > budget:  # alone, a slice of rows at a time
            close()
            step = max(1, n_test * budget // size)
            for start in range(0, n_test, step):
                groups.append(_group(est, index, [b], (start, min(n_test, start + step))))
            continue
        held = sum(n_test * _numel(curvature.sites[p], curvature.like) * item for p in pending)
        if held + size > budget:
            close()
        pending.append(b)
    close()
    return groups


def _numel(site: Any, like: F.Params) -> int:
    return sum(like[n].numel() for n in (site.weight, site.bias) if n is not None)


def _group(est: Any, index: list[int], blocks: list[int], rows: tuple[int, int]) -> SiteGroup:
    sites = [est._grad_sites[index[b]] for b in blocks]
    names = [n for s in sites for n in (s.weight, s.bias) if n is not None]
    return SiteGroup(blocks, sites, names, rows)


def scores(
    est: Any,
    inputs: Any,
    groups: list[SiteGroup],
    train_batches: Callable[[], Iterable[tuple[int, tuple[Any, ...]]]],
) -> Tensor:
    """``(n_test, n_train)`` scores: per group its test rows, one training pass, added.

    ``train_batches()``: the (local, numbered) training batches of one pass.
    """
    data = as_loader(inputs, est.batch_size, "inputs")
    n_test = max(group.rows[1] for group in groups)
    total: Tensor | None = None
    for g, group in enumerate(groups):
        q = _test_rows(est, data, group, validate=g == 0)
        blocks = gather_ordered(list(sides.score_blocks(est, q, train_batches(), group)))
        part = torch.cat(blocks, dim=1)
        if total is None:
            total = part.new_zeros(n_test, part.shape[1])
        total[group.rows[0] : group.rows[1]] += part
        del q, blocks, part
    assert total is not None
    return total


def _test_rows(est: Any, data: Iterable[Any], group: SiteGroup, validate: bool) -> Tensor:
    r"""The group's solved test rows :math:`A^{-\top} g` ``(rows, width)``, from factors.

    Taken a piece of :data:`~captum_sam.hif.sides.TEST_BUDGET_BYTES` /
    :data:`~captum_sam.hif.sides.DIRECT_PIECES` at a time.
    """
    loss, params = est._test_loss, est.operator.params
    held_loss, held_params = group.restrict(loss, params)
    curvature = est.inverse.inverse.curvature
    item = params[est.names[0]].element_size()
    width = sum(params[n].numel() for n in group.names)
    piece = max(1, sides.TEST_BUDGET_BYTES // sides.DIRECT_PIECES // (width * item))
    start_row, stop_row = group.rows
    out: Tensor | None = None  # filled in place: the group's rows are most of the budget
    seen = 0
    for i, batch in enumerate(on_device(data, est.device)):
        if validate:
            validate_batch(loss, params, batch, "inputs_dataset", run_loss=i == 0)
        count = batch_size(batch)
        lo, hi = max(start_row - seen, 0), min(stop_row - seen, count)
        seen += count
        for start in range(lo, hi, piece):
            end = min(hi, start + piece)
            part = batch if (start, end) == (0, count) else slice_batch(batch, start, end)
            factors = group.factors(held_loss, held_params, part)
            if factors is None:  # formed by vmap, then cut into the group's blocks
                grads = sides.gradients(est, part, loss, params)
                matrices = curvature.split(grads.T)
                blocks: list[Any] = [matrices[b] for b in group.blocks]
            else:
                blocks = []
                for b, (a, d) in zip(group.blocks, factors):
                    F.check_finite(a, "layer inputs of the examples at the checkpoint")
                    F.check_finite(d, "gradients of the examples at the checkpoint")
                    blocks.append((curvature.sites[b].columns(a), d))
            solved = est.inverse.inverse.solve_some(group.blocks, blocks)
            tree: F.Params = {}
            for b, matrix in zip(group.blocks, solved):
                tree.update(curvature.sites[b].from_matrix(matrix, curvature.like))
            del solved
            if out is None:
                ref = tree[group.names[0]]
                out = ref.new_empty(stop_row - start_row, width)
            rows = out[seen - count + start - start_row : seen - count + end - start_row]
            torch.cat([tree[n].reshape(end - start, -1) for n in group.names], dim=1, out=rows)
            del tree
            est.inverse.check(rows, "inverse-HVP solutions")
        if seen >= stop_row and not validate:
            break
    assert out is not None
    return out
