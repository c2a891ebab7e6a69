"""Random training subsets for LDS, and checks of user-given subset masks.

A mask is a boolean tensor ``(M, n)``, ``True`` = the example is kept. Two samplers:

* ``"fraction"``: every subset keeps exactly ``round(fraction * n)`` examples, drawn
  without replacement;
* ``"bernoulli"``: every example is kept with probability ``fraction``, independently
  (the LDS protocol of TRAK and dattri); a draw that keeps every example or none is
  drawn again.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["SAMPLERS", "random_subsets", "check_masks"]

SAMPLERS = ("fraction", "bernoulli")


def random_subsets(
    n: int, count: int, sampler: str = "fraction", fraction: float = 0.5, seed: int = 0
) -> Tensor:
    """``count`` random subsets of ``n`` training examples, as masks ``(count, n)``.

    Args:
        n: Training examples.
        count: Subsets.
        sampler: ``"fraction"`` (exactly ``round(fraction * n)`` kept) or
            ``"bernoulli"`` (each kept with probability ``fraction``).
        fraction: Kept fraction, in ``(0, 1)``.
        seed: Seed of the draws (a fixed seed gives the same masks).

    Returns:
        Boolean masks ``(count, n)``, ``True`` = kept; every row keeps at least one
        example and removes at least one.

    Raises:
        ValueError: A bad argument (the message names it).
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise ValueError(f"`n` must be an int >= 2, got {n!r}")
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"`count` must be an int >= 1, got {count!r}")
    if sampler not in SAMPLERS:
        raise ValueError(f"`sampler` must be one of {SAMPLERS}, got {sampler!r}")
    if not 0 < fraction < 1:
        raise ValueError(f"`fraction` must be in (0, 1), got {fraction}")
    g = torch.Generator().manual_seed(int(seed))
    masks = torch.zeros(count, n, dtype=torch.bool)
    if sampler == "fraction":
        keep = int(round(fraction * n))
        if not 0 < keep < n:
            raise ValueError(
                f"`fraction` {fraction} of n = {n} keeps {keep} examples: every subset must "
                "keep at least one and remove at least one"
            )
        for m in range(count):
            masks[m, torch.randperm(n, generator=g)[:keep]] = True
        return masks
    for m in range(count):
        while True:
            row = torch.rand(n, generator=g, dtype=torch.float64) < fraction
            if 0 < int(row.sum()) < n:
                break
        masks[m] = row
    return masks


def check_masks(masks: Any, n: int) -> Tensor:
    """Check user-given subset masks: boolean ``(M, n)``, each row keeps and removes some.

    Args:
        masks: The masks, ``True`` = kept.
        n: Training examples.

    Returns:
        ``masks`` on the CPU.

    Raises:
        TypeError: ``masks`` is not a tensor.
        ValueError: Wrong shape or dtype, no row, or a row that keeps every example
            or none (the message names ``masks`` and the row).
    """
    if not isinstance(masks, Tensor):
        raise TypeError(f"`masks` must be a boolean tensor (M, {n}), got {type(masks).__name__}")
    if masks.dtype != torch.bool:
        raise ValueError(f"`masks` must have dtype torch.bool (True = kept), got {masks.dtype}")
    if masks.dim() != 2 or masks.shape[1] != n:
        raise ValueError(f"`masks` must have shape (M, {n}), got {tuple(masks.shape)}")
    if masks.shape[0] == 0:
        raise ValueError("`masks` holds no subset (shape (0, n))")
    masks = masks.detach().cpu()
    kept = masks.sum(dim=1)
    for name, bad in (("keeps every example", kept == n), ("keeps no example", kept == 0)):
        if bool(bad.any()):
            row = int(torch.nonzero(bad)[0])
            raise ValueError(f"`masks` row {row} {name}: each subset must keep and remove some")
    return masks
