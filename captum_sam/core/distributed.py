"""Scale-out on ``torch.distributed``: shard the training set, gather the result.

When a process group is initialised (for example by ``torchrun --nproc_per_node=N``
followed by ``torch.distributed.init_process_group``), the estimators split their
training-side work across ranks and combine it so that **every rank receives the
full result**, equal to a single-process run:

* batches of the training set (and of the Hessian and perturbation sets) are dealt
  round-robin: rank ``r`` of ``W`` takes batches ``r, r + W, ...``;
* sums (mean gradients, curvature products, trajectory-form scores, parameter
  changes) are combined with ``all_reduce``;
* per-example blocks (influence columns, self influence) are gathered with
  ``all_gather_object`` and put back in dataset order.

Every rank must build the same estimator on the same data and call the same methods
in the same order (collective operations). Without an initialised process group
nothing here communicates and a single process does all the work.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import DataLoader, SequentialSampler, TensorDataset, default_collate

__all__ = [
    "rank_and_world",
    "is_distributed",
    "shard",
    "contiguous",
    "all_reduce_sum",
    "all_reduce_tree",
    "gather_ordered",
]

T = TypeVar("T")


def is_distributed() -> bool:
    """Whether a process group with more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world() -> tuple[int, int]:
    """``(rank, world_size)``, or ``(0, 1)`` without a process group."""
    if not is_distributed():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def shard(batches: Iterable[T]) -> Iterator[tuple[int, T]]:
    """This rank's share of ``batches`` as ``(global index, batch)``, round-robin.

    A plain in-order DataLoader (default collate, no workers) is sharded by its
    batch sampler, so the other ranks' batches are never loaded.
    """
    rank, world = rank_and_world()
    if world > 1 and isinstance(batches, DataLoader) and _plain(batches):
        dataset = batches.dataset
        for i, idx in enumerate(batches.batch_sampler):  # type: ignore[union-attr]
            if i % world == rank:
                if isinstance(dataset, TensorDataset):
                    yield i, tuple(t[idx] for t in dataset.tensors)  # type: ignore[misc]
                else:
                    yield i, default_collate([dataset[j] for j in idx])  # type: ignore[misc]
        return
    for i, batch in enumerate(batches):
        if i % world == rank:
            yield i, batch


def contiguous(items: list[T]) -> list[tuple[int, T]]:
    """This rank's contiguous slice of ``items`` as ``(index, item)`` pairs.

    Used where neighbouring items share work (trajectory steps share checkpoints).
    """
    rank, world = rank_and_world()
    lo, hi = rank * len(items) // world, (rank + 1) * len(items) // world
    return list(enumerate(items))[lo:hi]


def _plain(loader: DataLoader) -> bool:
    return (
        isinstance(loader.sampler, SequentialSampler)
        and loader.batch_sampler is not None
        and loader.collate_fn is default_collate
        and loader.num_workers == 0
    )


def _collective_device(tensor: Tensor) -> torch.device | None:
    """Where a collective must see ``tensor`` if not where it is: NCCL reduces CUDA tensors only."""
    if tensor.device.type == "cpu" and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return None


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """Sum ``tensor`` over ranks in place (no-op in a single process); returns it.

    A CPU tensor (a count, an agreement flag) goes through this rank's CUDA device
    when the backend is NCCL, which cannot reduce CPU tensors.
    """
    if is_distributed():
        device = _collective_device(tensor)
        if device is None:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        else:
            moved = tensor.to(device, copy=True)
            dist.all_reduce(moved, op=dist.ReduceOp.SUM)
            tensor.copy_(moved)
    return tensor


def all_reduce_tree(tree: dict[str, Tensor]) -> dict[str, Tensor]:
    """Sum every tensor of a dict over ranks, in place."""
    for value in tree.values():
        all_reduce_sum(value)
    return tree


def on_rank_zero(work: Callable[[], Any]) -> None:
    """Run ``work`` on rank 0 alone; if it raises, every rank raises (none waits).

    Without a process group this is ``work()``. Rank 0 re-raises its own exception;
    the others raise the same type with rank 0's message when it can be built from a
    message, else a ``RuntimeError`` naming it. The outcome is broadcast, so this is
    also the point where the ranks meet (a barrier).
    """
    if not is_distributed():
        work()
        return
    outcome: list[Any] = [None]
    failure: BaseException | None = None
    if dist.get_rank() == 0:
        try:
            work()
        except Exception as err:  # shared below, then re-raised on this rank
            failure = err
            outcome[0] = (type(err), str(err))
    dist.broadcast_object_list(outcome, src=0)
    if failure is not None:
        raise failure
    if outcome[0] is not None:
        kind, message = outcome[0]
        try:
            error = kind(f"on rank 0: {message}")
        except Exception:
            error = RuntimeError(f"rank 0 failed with {kind.__name__}: {message}")
        raise error


def require_same(value: Any, what: str) -> None:
    """Refuse, on every rank alike, a ``value`` that differs between ranks.

    Every rank must build the same estimator on the same data (the batches are
    dealt out by index); a rank given other data would have its results mixed in
    silently. Each rank sees every rank's value, so all raise together (no rank is
    left waiting in a later collective).

    Raises:
        ValueError: Naming ``what`` and each rank's value.
    """
    if not is_distributed():
        return
    every: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(every, value)
    if any(v != every[0] for v in every[1:]):
        if all(isinstance(v, dict) for v in every):  # a fingerprint: the fields that differ
            keys = sorted({k for v in every for k in v}, key=str)
            shown = f"fields {[k for k in keys if any(v.get(k) != every[0].get(k) for v in every)]}"
        else:
            shown = ", ".join(f"rank {r}: {str(v)[:80]}" for r, v in enumerate(every))
        raise ValueError(
            f"the ranks disagree on {what} ({shown}): every rank must build the same "
            "estimator on the same data"
        )


def gather_ordered(items: list[tuple[int, Any]]) -> list[Any]:
    """Gather ``(index, value)`` pairs from every rank; values sorted by index.

    Tensors travel through the CPU (``all_gather_object``) and come back on the
    device of this rank's first tensor.
    """
    if not is_distributed():
        return [v for _, v in sorted(items, key=lambda p: p[0])]
    device = next((v.device for _, v in items if isinstance(v, Tensor)), torch.device("cpu"))
    local = [(i, v.cpu() if isinstance(v, Tensor) else v) for i, v in items]
    every: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(every, local)
    merged = sorted((p for part in every for p in part), key=lambda p: p[0])
    return [v.to(device) if isinstance(v, Tensor) else v for _, v in merged]
