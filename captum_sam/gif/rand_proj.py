r"""The twin of Captum's ``TracInCPFastRandProj``: final-layer embeddings in an index.

Projected final-layer embeddings and a nearest-neighbour index serve fast, repeated
proponent queries.

Every example gets an *embedding* whose inner products are its final-layer SAM-GIF
scores: per checkpoint :math:`\sqrt{\eta_c}\, (P_d^\top d) \otimes (P_a^\top a)` with
:math:`d` the loss gradient in the final layer's output and :math:`a` its input. As in
Captum, when ``projection_dim`` is set and the layer has more than ``projection_dim``
weights, :math:`d` and :math:`a` are projected by seeded Gaussian matrices of width
:math:`\lfloor\sqrt{\texttt{projection\_dim}}\rfloor` (capped by the layer's sizes),
drawn exactly as Captum draws them, so each checkpoint contributes at most
``projection_dim`` coordinates. Training embeddings are taken at :math:`w_c +
\epsilon_c` and stored in ``nearest_neighbors`` at construction; test embeddings at
:math:`w_c`.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from captum_sam._captum import AnnoyNearestNeighbors, KMostInfluentialResults, NearestNeighbors
from captum_sam.core.checkpoints import checkpoints_load_func
from captum_sam.core.data import as_loader, on_device, validate_batch
from captum_sam.core.errors import require_inputs, user_stacklevel
from captum_sam.core.layers import sites
from captum_sam.gif.fast import SAMTracInCPFast
from captum_sam.gif.terms import check_finite_terms

__all__ = ["SAMTracInCPFastRandProj", "captum_projections"]


def captum_projections(
    out_dim: int,
    in_dim: int,
    projection_dim: int | None,
    seed: int,
    like: Tensor,
    loader_draws: int = 1,
) -> tuple[Tensor, Tensor] | None:
    """Captum's projection matrices for the output-gradient and input sides, or ``None``.

    Drawn from a generator seeded with ``seed`` in Captum's order and shapes: Captum
    calls ``torch.manual_seed(seed)``, then opens the training DataLoader (which draws
    one ``int64`` base seed from the global generator unless the loader has its own,
    ``loader_draws``), then draws the two matrices. The same numbers on the CPU, without
    touching the global generator.
    """
    if projection_dim is None or out_dim * in_dim <= projection_dim:
        return None
    width = int(projection_dim**0.5)
    k_out, k_in = min(width, out_dim), min(width, in_dim)
    g = torch.Generator().manual_seed(seed)
    for _ in range(loader_draws):
        torch.empty((), dtype=torch.int64).random_(generator=g)
    p_out = torch.normal(torch.zeros(out_dim, k_out), 1.0 / k_out**0.5, generator=g)
    p_in = torch.normal(torch.zeros(in_dim, k_in), 1.0 / k_in**0.5, generator=g)
    return p_out.to(like), p_in.to(like)


class SAMTracInCPFastRandProj(SAMTracInCPFast):
    r"""Final-layer SAM-GIF embeddings in a nearest-neighbour index (``TracInCPFastRandProj``).

    The first twelve arguments are Captum ``TracInCPFastRandProj``'s, with its
    meanings; the rest are keyword-only and SAM's own (see
    :class:`~captum_sam.SAMTracInCPFast`).

    Args:
        model: The model (never modified).
        final_fc_layer: The last ``nn.Linear`` (module or name).
        train_dataset: Training Dataset, or a DataLoader iterating it in order.
        checkpoints: Directory, list or iterator of checkpoint paths.
        checkpoints_load_func: ``load(model, path) -> learning_rate``.
        loss_fn: A reducing loss (``"sum"`` or ``"mean"``), required.
        batch_size: Batch size when ``train_dataset`` is a Dataset.
        test_loss_fn: Loss for test examples (default ``loss_fn``).
        vectorize: Captum's jacobian switch (changes nothing here).
        nearest_neighbors: A Captum ``NearestNeighbors``; default
            ``AnnoyNearestNeighbors()`` (needs the ``annoy`` package), as Captum.
        projection_dim: Coordinates per checkpoint at most (Captum's meaning);
            ``None``: no projection.
        seed: Seed of the projection.
        rho: SAM radius of training (0 gives Captum's ``TracInCPFastRandProj``). Default
            ``None``: the recorded run's or 0.05 (:func:`~captum_sam.trajectory.sam_settings`).
        adaptive: ASAM. Default ``None``: as for ``rho`` (else ``False``).
        perturbation: ``"dataset"`` or ``"example"``.
        perturbation_dataset: Data for the ``"dataset"`` perturbation.
        perturbation_scope: ``"trainable"`` or ``"attributed"``.
        batchnorm_tolerance: The BatchNorm eval/train loss check of
            :class:`~captum_sam.SAMTracInCPFast` (``None`` skips it).

    Where the gradients are taken: test embeddings at :math:`w_c`, training embeddings
    at :math:`w_c + \epsilon_c` with :math:`\epsilon_c` over every trainable parameter
    (``perturbation_scope``), both of the final layer's weight.

    Differences from Captum, deliberate: training embeddings use ``loss_fn`` (Captum
    computes them with ``test_loss_fn``, which matters only when the two differ).
    """

    def __init__(
        self,
        model: nn.Module,
        final_fc_layer: nn.Module | str,
        train_dataset: Dataset | DataLoader,
        checkpoints: str | os.PathLike[str] | Sequence[str] | Iterable[str],
        checkpoints_load_func: Callable[[nn.Module, str], float] = checkpoints_load_func,
        loss_fn: Callable[..., Tensor] | None = None,
        batch_size: int | None = 64,
        test_loss_fn: Callable[..., Tensor] | None = None,
        vectorize: bool = False,
        nearest_neighbors: NearestNeighbors | None = None,
        projection_dim: int | None = None,
        seed: int = 0,
        *,
        rho: float | None = None,
        adaptive: bool | None = None,
        perturbation: str = "dataset",
        perturbation_dataset: Dataset | DataLoader | None = None,
        perturbation_scope: str = "trainable",
        batchnorm_tolerance: float | None = 0.1,
    ) -> None:
        super().__init__(
            model, final_fc_layer, train_dataset, checkpoints, checkpoints_load_func,
            loss_fn, batch_size, test_loss_fn, vectorize, rho=rho, adaptive=adaptive,
            perturbation=perturbation, perturbation_dataset=perturbation_dataset,
            perturbation_scope=perturbation_scope, batchnorm_tolerance=batchnorm_tolerance,
        )  # fmt: skip
        if perturbation != "dataset":
            raise ValueError(
                f"`perturbation` must be 'dataset' for the stored embeddings, got {perturbation!r}"
            )
        if projection_dim is not None and (
            isinstance(projection_dim, bool)
            or not isinstance(projection_dim, int)
            or projection_dim < 1
        ):
            raise ValueError(
                f"`projection_dim` must be a positive int or None, got {projection_dim!r}"
            )
        self.projection_dim, self.seed = projection_dim, seed
        self.nearest_neighbors = (
            AnnoyNearestNeighbors() if nearest_neighbors is None else nearest_neighbors
        )
        weight = self.final_fc_layer.weight
        ref = self._engines.points.reference(self._engines.terms[0].checkpoint)
        loader = self.train_dataloader
        draws = int(isinstance(loader, DataLoader) and loader.generator is None)
        self.projection_quantities = captum_projections(
            weight.shape[0], weight.shape[1], projection_dim, seed, ref, draws
        )
        self._engines.prepare()
        self.src_intermediate_quantities = self._embeddings(self.train_dataloader, "train")
        self.nearest_neighbors.setup(self.src_intermediate_quantities)

    # ------------------------------------------------------------------ embeddings

    def _embeddings(self, inputs: Any, side: str) -> Tensor:
        """``(n, C * D)`` embeddings of ``side`` ``"train"`` (at ``w + eps``) or ``"test"``."""
        e = self._engines
        data = as_loader(inputs, self.batch_size, "inputs")
        loss = e.quantities.test_loss if side == "test" else e.quantities.train_loss
        rows = []
        for i, batch in enumerate(on_device(data, e.device)):
            state = e.loader(e.terms[0].checkpoint)
            validate_batch(loss.bind(state.frozen), state.params, batch, "inputs", run_loss=i == 0)
            if side == "train":
                pairs = [moved for _, moved in e.factored.train_factors(e.terms, batch, False)]
            else:
                pairs = [
                    sites.layer_factors(floss, p, batch, e.factored.sites)  # type: ignore[arg-type]
                    for p, floss in e.factored.term_losses(e.terms, loss)
                ]
            coef = e.points.coefficients(e.terms).sqrt()
            rows.append(torch.cat([self._embed(f, c) for f, c in zip(pairs, coef)], dim=1))
        if not rows:
            raise ValueError("`inputs` is empty")
        return check_finite_terms(torch.cat(rows), "final-layer gradients", e.terms)

    def _embed(self, factors: sites.Factors, root_lr: Tensor) -> Tensor:
        ((a, d),) = factors
        if a.shape[1] != 1:
            raise ValueError(
                "the final layer sees several positions per example; the fast twins need "
                "one input vector per example (use SAMTracInCP instead)"
            )
        a, d = a[:, 0], d[:, 0]
        if self.projection_quantities is not None:
            p_out, p_in = self.projection_quantities
            a, d = a @ p_in, d @ p_out
        return (d.unsqueeze(2) * a.unsqueeze(1)).flatten(1) * root_lr

    def compute_intermediate_quantities(  # type: ignore[override]
        self, inputs: tuple[Any, ...] | DataLoader, *, side: str = "test"
    ) -> Tensor:
        r"""Embeddings ``(n, C * D)`` whose inner products are the scores.

        ``side="test"`` (default, what Captum's method returns for queries): at
        :math:`w_c` with ``test_loss_fn``; ``side="train"``: at :math:`w_c +
        \epsilon_c` with ``loss_fn``, the vectors in the index, so
        ``compute_intermediate_quantities(test) @
        compute_intermediate_quantities(train, side="train").T == influence(test, k=None)``.
        """
        if side not in ("train", "test"):
            raise ValueError(f"`side` must be 'train' or 'test', got {side!r}")
        return self._embeddings(inputs, side)

    def influence(  # type: ignore[override]
        self,
        inputs: tuple[Any, ...] | None = None,
        k: int | None = 5,
        proponents: bool = True,
    ) -> Tensor | KMostInfluentialResults:
        """Scores from the stored embeddings (``k=None``), or proponents from the index.

        Args:
            inputs: A test batch (required).
            k: Number of proponents/opponents per test example (Captum's default 5);
                ``None``: every score ``(n_test, n_train)``.
            proponents: Proponents (highest) or opponents (lowest).
        """
        require_inputs(inputs)
        query = self._embeddings(inputs, "test")
        if k is None:
            return query @ self.src_intermediate_quantities.T
        sign = 1.0 if proponents else -1.0
        indices, scores = self.nearest_neighbors.get_nearest_neighbors(query * sign, k)
        return KMostInfluentialResults(indices, scores * sign)

    def self_influence(  # type: ignore[override]
        self,
        inputs: tuple[Any, ...] | DataLoader | None = None,
        show_progress: bool = False,
        outer_loop_by_checkpoints: bool = False,
    ) -> Tensor:
        """Not implemented, as in Captum: use :class:`~captum_sam.SAMTracInCPFast` instead."""
        warnings.warn(
            "self influence scores gain nothing from the random projection and the index: "
            "use SAMTracInCPFast.self_influence, which is exact",
            stacklevel=user_stacklevel(),
        )
        raise NotImplementedError(
            "SAMTracInCPFastRandProj does not compute self influence scores (as Captum's "
            "TracInCPFastRandProj): use SAMTracInCPFast.self_influence"
        )
