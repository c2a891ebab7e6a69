"""Data plumbing shared by the estimators: loaders, batches, validation, top-k."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    SequentialSampler,
    TensorDataset,
    default_collate,
)

from captum_sam.core.errors import ArgumentError, check_k
from captum_sam.core.losses import FunctionalLoss, to_device
from captum_sam.core.params import Params

Inputs = tuple[Any, ...] | DataLoader


def fetch_batch(dataset: Dataset, indices: Sequence[int] | Tensor) -> tuple[Any, ...]:
    """Collate the examples ``indices`` of a map-style dataset into one batch."""
    idx = torch.as_tensor(indices, dtype=torch.long)
    if isinstance(dataset, TensorDataset):
        return tuple(t[idx] for t in dataset.tensors)
    return tuple(default_collate([dataset[int(i)] for i in idx]))


def check_batch_size(batch_size: Any, name: str) -> None:
    """Refuse a ``batch_size`` that cannot batch the Dataset given as ``name``.

    Raises:
        ArgumentError: Not a positive int (a ``ValueError`` and, as Captum's own
            ``assert``, an ``AssertionError``).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ArgumentError(
            f"since `{name}` is a Dataset, `batch_size` must be a positive int, got {batch_size!r}"
        )


def check_in_order(loader: DataLoader, name: str, whole: bool = False) -> None:
    """Refuse a DataLoader whose order changes between passes (or not all read, if ``whole``).

    Rows or columns of a result follow the loader's order, and an estimator reads a
    loader more than once: a shuffling loader (``shuffle=True``, a ``RandomSampler``,
    any sampler whose order differs between two passes) would mix examples. ``whole``:
    a training set, whose columns are dataset indices, so its batches must list
    ``0..n-1`` in order (``drop_last=True`` or a sampler that skips or repeats
    examples is refused too). A custom sampler's indices are read (twice) to check.

    Raises:
        ValueError: Naming ``name`` and the reason.
    """
    from torch.utils.data import IterableDataset, RandomSampler

    if isinstance(loader.dataset, IterableDataset):
        return  # read in the stream's own order (a training set refuses streams itself)
    batches = loader.batch_sampler
    samplers = [loader.sampler, getattr(batches, "sampler", None)]
    default = (
        type(batches) is BatchSampler
        and isinstance(batches.sampler, SequentialSampler)
        and isinstance(loader.sampler, SequentialSampler)
    )
    if default and not (whole and batches.drop_last):
        return
    if default or any(isinstance(x, RandomSampler) for x in samplers):
        order: list[int] | None = None  # (a RandomSampler is not drawn: the global RNG)
    else:
        order = _index_order(loader)
        if order != _index_order(loader):
            order = None
    if order is None and not default:
        raise ValueError(
            f"`{name}` is a DataLoader whose order changes between passes (shuffle=True "
            "or a random sampler): the estimators read it more than once and its rows "
            "must keep their examples; pass shuffle=False"
        )
    if whole and order != list(range(len(loader.dataset))):  # type: ignore[arg-type]
        raise ValueError(
            f"`{name}` is a DataLoader that does not read every example once, in index "
            "order (drop_last=True, or a sampler that skips, repeats or reorders "
            "examples): the curvature and the mean gradient would miss examples whose "
            "indices stay valid, or columns would belong to other examples"
        )


def _index_order(loader: DataLoader) -> list[int] | None:
    """The dataset indices one pass of ``loader`` reads, in order (``None``: unknown)."""
    try:
        if loader.batch_sampler is not None:
            return [int(i) for batch in loader.batch_sampler for i in batch]
        return [int(i) for i in loader.sampler]
    except (TypeError, ValueError):
        return None


def as_loader(
    inputs: Any, batch_size: int | None, name: str, ordered: bool = True
) -> Iterable[tuple[Any, ...]]:
    """Turn a batch tuple, a Dataset or a DataLoader into an iterable of batches.

    ``ordered``: a DataLoader must read its dataset in order (:func:`check_in_order`);
    ``False`` for data only summed over, e.g. a perturbation set.

    Raises:
        TypeError: ``inputs`` is none of these.
        ValueError: ``ordered`` and a DataLoader that shuffles.
    """
    if isinstance(inputs, DataLoader):
        if ordered:
            check_in_order(inputs, name)
        return inputs
    if isinstance(inputs, (tuple, list)):
        if len(inputs) < 2:
            raise ValueError(
                f"`{name}` must be a tuple (features..., labels) with the labels last; "
                f"got a {type(inputs).__name__} of length {len(inputs)}"
            )
        return [tuple(inputs)]
    if isinstance(inputs, Dataset):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"`batch_size` must be a positive int, got {batch_size!r}")
        return DataLoader(inputs, batch_size=batch_size, shuffle=False)
    raise TypeError(
        f"`{name}` must be a batch tuple (features..., labels), a Dataset or a DataLoader; "
        f"got {type(inputs).__name__}"
    )


def ordered_dataset(train: Dataset | DataLoader, name: str = "train_dataset") -> Dataset:
    """The map-style dataset behind ``train``, which must be iterated in order.

    Raises:
        ValueError: A DataLoader that shuffles or drops its last batch (:func:`check_in_order`).
    """
    from torch.utils.data import IterableDataset

    stream = train.dataset if isinstance(train, DataLoader) else train
    if isinstance(stream, IterableDataset):
        raise ArgumentError(
            f"`{name}` is an IterableDataset (a stream): the estimators need a map-style "
            "Dataset with a length, read in order more than once (one column per index); "
            "materialise the stream, e.g. TensorDataset(*tensors)"
        )
    if isinstance(train, DataLoader):
        check_in_order(train, name, whole=True)
        return train.dataset
    return train


def dataset_size(loader: Iterable[Any]) -> int:
    """Number of examples of a DataLoader's dataset (or of the batches listed)."""
    if isinstance(loader, DataLoader):
        return len(loader.dataset)  # type: ignore[arg-type]
    return sum(batch[-1].shape[0] for batch in loader)


def progress(iterable: Iterable[Any], show: bool, desc: str, total: int | None = None) -> Any:
    """A tqdm bar when ``show``, else the iterable unchanged."""
    if not show:
        return iterable
    from tqdm.auto import tqdm

    if total is None:
        try:
            total = len(iterable)  # type: ignore[arg-type]
        except TypeError:
            total = None
    return tqdm(iterable, desc=desc, total=total)


def on_device(
    batches: Iterable[tuple[Any, ...]], device: torch.device
) -> Iterator[tuple[Any, ...]]:
    """Move every batch to ``device`` as it is iterated.

    A plain in-order DataLoader over a ``TensorDataset`` (default collate, no
    workers) is read by slicing its tensors, which gives the same batches without
    indexing and collating example by example.
    """
    source = _tensor_slices(batches) if isinstance(batches, DataLoader) else None
    for batch in source if source is not None else batches:
        yield to_device(batch, device)


def local_batches(
    loader: Iterable[tuple[Any, ...]], device: torch.device
) -> Iterator[tuple[int, tuple[Any, ...]]]:
    """``(global index, batch on device)`` for this rank's share of the batches.

    Without a process group this is every batch (see :mod:`captum_sam.distributed`).
    """
    from captum_sam.core.distributed import is_distributed, shard

    if not is_distributed():
        yield from enumerate(on_device(loader, device))
        return
    for i, batch in shard(loader):
        yield i, to_device(batch, device)


def _tensor_slices(loader: DataLoader) -> Iterator[tuple[Tensor, ...]] | None:
    dataset = loader.dataset
    plain = (
        isinstance(dataset, TensorDataset)
        and isinstance(loader.sampler, SequentialSampler)
        and loader.batch_size is not None
        and loader.collate_fn is default_collate
        and loader.num_workers == 0
    )
    if not plain:
        return None
    n, size = len(dataset), loader.batch_size
    stop = n - n % size if loader.drop_last else n
    return (tuple(t[i : i + size] for t in dataset.tensors) for i in range(0, stop, size))


def validate_batch(
    floss: FunctionalLoss, params: Params, batch: tuple[Any, ...], name: str, run_loss: bool = True
) -> None:
    """Check one batch: labels last, matching sizes and (``run_loss``) a per-example loss.

    Raises:
        ValueError: With the argument name and the shapes involved.
    """
    if not isinstance(batch, (tuple, list)) or len(batch) < 2:
        raise ValueError(f"`{name}` batches must be tuples (features..., labels)")
    labels = batch[-1]
    sizes = {x.shape[0] for x in batch if isinstance(x, Tensor) and x.dim() > 0}
    if len(sizes) > 1:
        shapes = [tuple(x.shape) for x in batch if isinstance(x, Tensor)]
        raise ValueError(
            f"`{name}`: features and labels disagree on the batch size, shapes {shapes}"
        )
    if not isinstance(labels, Tensor):
        raise ValueError(f"`{name}`: the last element of a batch (labels) must be a tensor")
    if not run_loss:
        return
    try:
        with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            floss.summed_loss(params, batch)
        _refuse_broadcast_warning(caught, name)
    except ArgumentError as err:
        raise ArgumentError(f"`{name}`: {err}") from err
    except ValueError:
        raise
    except (RuntimeError, IndexError, TypeError) as err:
        shapes = [tuple(x.shape) for x in batch if isinstance(x, Tensor)]
        raise ValueError(
            f"`{name}`: the model or loss failed on a batch with shapes {shapes} "
            f"(labels last): {err}"
        ) from err


def _refuse_broadcast_warning(caught: list[warnings.WarningMessage], name: str) -> None:
    """Raise on torch's "target size ... different to the input size" warning; re-warn the rest.

    A reducing loss (``"sum"``/``"mean"``) of outputs ``(B, 1)`` and labels ``(B,)``
    broadcasts to ``(B, B)`` before it reduces: torch warns and returns a wrong number.
    """
    for w in caught:
        text = str(w.message)
        if "target size" in text and "broadcasting" in text:
            raise ArgumentError(
                f"`{name}`: the loss broadcast outputs and labels of different shapes "
                f"(torch: {text}); give the labels the outputs' shape"
            )
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def stream_topk(blocks: Iterable[Tensor], k: int, proponents: bool = True) -> tuple[Tensor, Tensor]:
    """Top-``k`` columns per row over score blocks ``(n_test, batch)`` given in order.

    Only ``k`` candidates per row are kept between blocks, so the full
    ``(n_test, n_train)`` matrix is never held.

    Returns:
        ``(indices, scores)``, each ``(n_test, min(k, n_train))``, best first.
    """
    k = check_k(k)
    sign = 1.0 if proponents else -1.0
    best_v = best_i = None
    offset = 0
    for block in blocks:
        cols = torch.arange(offset, offset + block.shape[1], device=block.device)
        offset += block.shape[1]
        v, i = sign * block, cols.expand(block.shape[0], -1)
        if best_v is not None:
            v, i = torch.cat([best_v, v], dim=1), torch.cat([best_i, i], dim=1)
        top, pos = torch.topk(v, min(k, v.shape[1]), dim=1)
        best_v, best_i = top, torch.gather(i, 1, pos)
    if best_v is None:
        raise ValueError("the training set is empty")
    return best_i, sign * best_v


def check_indices(
    indices: Any, n: int, name: str = "indices", allow_empty: bool = False
) -> list[int]:
    """Validate training indices of a removed set; return them sorted and unique.

    Args:
        indices: A sequence, array or tensor of integer indices.
        n: The training set's size.
        name: The argument's name, for messages.
        allow_empty: Accept an empty set (nothing removed).

    Raises:
        ValueError: Not a 1-D integer sequence within ``[0, n)`` (a boolean mask or
            floats included: they are not indices), or empty unless ``allow_empty``.
    """
    if isinstance(indices, (set, frozenset)):
        indices = sorted(indices)
    elif not hasattr(indices, "__len__") and hasattr(indices, "__iter__"):  # a generator
        indices = list(indices)
    try:
        idx = torch.as_tensor(indices)
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"`{name}` must be integer training indices: {err}") from None
    if idx.dim() == 0:
        idx = idx.reshape(1)  # one index
    if idx.numel() == 0:  # (an empty list or array reads as float)
        idx = idx.reshape(0).to(torch.long)
    if idx.dtype == torch.bool:
        raise ValueError(
            f"`{name}` is a boolean mask, not indices: pass torch.nonzero(mask).flatten()"
        )
    if idx.dim() != 1 or idx.dtype.is_floating_point or idx.dtype.is_complex:
        raise ValueError(
            f"`{name}` must be a 1-D sequence of integer training indices, got "
            f"{idx.dtype} {tuple(idx.shape)}"
        )
    idx = idx.to(torch.long)
    if idx.numel() == 0:
        if allow_empty:
            return []
        raise ValueError(f"`{name}` is empty: name at least one training example to remove")
    if int(idx.min()) < 0 or int(idx.max()) >= n:
        raise ValueError(f"`{name}` must lie in [0, {n}), got {int(idx.min())}..{int(idx.max())}")
    return sorted({int(i) for i in idx})


@contextlib.contextmanager
def batch_context(name: str, index: int | str) -> Iterator[None]:
    """Name the batch when the model or the loss fails on it.

    Only the first batch of a dataset is validated up front; a bad example later (a
    label out of range, a shape the model refuses) then raises a ``ValueError`` that
    names the argument and the batch instead of a bare ``IndexError`` from deep inside.
    """
    try:
        yield
    except (IndexError, RuntimeError) as err:
        raise ValueError(
            f"`{name}` batch {index}: the model or the loss failed on it "
            f"({type(err).__name__}: {err}); check its labels and shapes"
        ) from err


def empty_batch(inputs: Any) -> bool:
    """Whether ``inputs`` is a batch tuple with no examples (a zero-length first dimension)."""
    if not isinstance(inputs, (tuple, list)) or len(inputs) < 2:
        return False
    labels = inputs[-1]
    return isinstance(labels, Tensor) and labels.dim() > 0 and labels.shape[0] == 0


def empty_result(n_train: int, k: int | None, aggregate: bool, dtype: torch.dtype) -> Any:
    """What ``influence`` returns for a batch of no test example.

    ``(0, n_train)`` scores (one zero row with ``aggregate``: the sum over no example),
    or ``KMostInfluentialResults`` of ``(0, min(k, n_train))`` tensors, the width of
    any other batch's.
    """
    from captum_sam._captum import KMostInfluentialResults

    if k is None:
        return torch.zeros(1 if aggregate else 0, n_train, dtype=dtype)
    k = min(k, n_train)
    if aggregate:  # the sum over no example is zero for every training example
        return KMostInfluentialResults(torch.arange(k).unsqueeze(0), torch.zeros(1, k, dtype=dtype))
    return KMostInfluentialResults(
        torch.zeros(0, k, dtype=torch.long), torch.zeros(0, k, dtype=dtype)
    )
