"""An exact nearest-neighbour index for Captum's ``NearestNeighbors`` interface.

Captum's ``TracInCPFastRandProj`` (and its twin) find proponents in an index of the
training embeddings; Captum's default, ``AnnoyNearestNeighbors``, is approximate and
needs the compiled ``annoy`` package. :class:`ExactNearestNeighbors` returns the exact
largest inner products by a blocked matrix product: no extra dependency, and the
results equal a full ``influence(k=None)`` followed by ``topk``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from captum_sam._captum import NearestNeighbors
from captum_sam.core.errors import check_k

__all__ = ["ExactNearestNeighbors"]


class ExactNearestNeighbors(NearestNeighbors):
    """Exact largest-inner-product search over stored vectors.

    Args:
        block: Stored vectors scored per matrix product (bounds memory to
            ``queries x block``).
    """

    def __init__(self, block: int = 65536) -> None:
        if isinstance(block, bool) or not isinstance(block, int) or block < 1:
            raise ValueError(f"`block` must be a positive int, got {block!r}")
        self.block = block
        self.data: Tensor | None = None

    def setup(self, data: Tensor) -> None:
        """Store ``(N, *)`` vectors (flattened to ``(N, D)``)."""
        self.data = data.reshape(len(data), -1)

    def get_nearest_neighbors(self, query: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """The ``k`` stored vectors with the largest inner product with each query row.

        Returns:
            ``(indices, scores)``, each ``(n_queries, min(k, N))``, best first.
        """
        if self.data is None:
            raise ValueError("call setup() with the stored vectors first")
        k = check_k(k)
        query = query.reshape(len(query), -1).to(self.data)
        best_v = best_i = None
        for start in range(0, len(self.data), self.block):
            scores = query @ self.data[start : start + self.block].T
            idx = torch.arange(start, start + scores.shape[1], device=scores.device)
            idx = idx.expand_as(scores)
            if best_v is not None:
                scores, idx = torch.cat([best_v, scores], 1), torch.cat([best_i, idx], 1)
            best_v, pos = torch.topk(scores, min(k, scores.shape[1]), dim=1)
            best_i = torch.gather(idx, 1, pos)
        return best_i, best_v  # type: ignore[return-value]
