r"""SAM-HIF: Hessian influence functions at the SAM fixed point.

:class:`SAMInfluenceFunction` subclasses Captum's ``InfluenceFunctionBase`` and is
built like ``NaiveInfluenceFunction``. Every matrix uses the *summed* training loss
:math:`S(w) = \sum_i l_i(w)` (Captum's scale), so the weight decay :math:`\lambda` of
the mean objective enters as :math:`n\lambda` and damping :math:`d` as :math:`n d`.
With :math:`g_0 = \nabla L(w^*)`, :math:`\epsilon^* = \epsilon(w^*; g_0)`,
:math:`H_e` the curvature of :math:`S` at :math:`w^* + \epsilon^*`, :math:`H_0` at
:math:`w^*`, :math:`J = d\epsilon/dw` and :math:`b_k = \nabla l_k(w^* + \epsilon^*)`:

=========  ==================================  ===============================================
variant    matrix :math:`A`                    right-hand side :math:`r_k`
=========  ==================================  ===============================================
fast       :math:`H_e + n\lambda I`            :math:`b_k` (Theorem 4.3)
full       :math:`H_e (I + J) + n\lambda I`    :math:`b_k` (Theorem 4.5, not symmetric)
exact      :math:`H_e (I + J) + n\lambda I`    :math:`b_k + H_e\, \partial\epsilon/\partial\delta_k`
plain      :math:`H_0 + n\lambda I`            :math:`\nabla l_k(w^*)` (Koh & Liang)
=========  ==================================  ===============================================

``exact`` is the true first-order derivative of the SAM fixed point
:math:`\nabla L(w + \epsilon(w)) + \lambda w = 0` with respect to the weight of
:math:`z_k`; the paper drops its second right-hand-side term. Removing :math:`z_k`
moves the weights by :math:`A^{-1} r_k`, and the influence on a test example
:math:`z` is :math:`\nabla l(z; w^*)^\top A^{-1} r_k`, the first-order increase of
:math:`z`'s loss (positive = helpful). Because :math:`A` is not symmetric, the test
side is solved with :math:`A^{-\top}`.

Choosing a variant: ``exact`` is the first-order truth for a model at its SAM fixed
point (a convex model trained to convergence); ``fast`` is cheaper (one curvature
product per matvec instead of two, symmetric so ``cg`` applies) and, on our
measurements, tracks retraining better than the paper's ``full``; ``plain`` is the
classic baseline on the same code path. On non-convex networks the Hessian is
indefinite: use ``curvature="ggn"`` (positive semi-definite) and some damping.

Choosing a solver: ``dense`` (exact, forms :math:`A`, for up to a few thousand
parameters; ``"auto"`` picks it there), ``cg`` for the symmetric variants, ``gmres``
or ``bicgstab`` for ``full``/``exact``, ``neumann``/``lissa`` (the paper's series;
need a positive-definite matrix), ``arnoldi`` (low-rank, symmetric variants).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import fields
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from captum_sam import factored
from captum_sam import functional as F
from captum_sam._captum import InfluenceFunctionBase, KMostInfluentialResults
from captum_sam._hif_operators import HIFOperatorsMixin
from captum_sam._utils import (
    CheckpointLoader,
    as_loader,
    check_indices,
    dataset_size,
    edited_copy,
    local_batches,
    make_loss,
    model_device,
    on_device,
    ordered_dataset,
    progress,
    stream_topk,
    validate_batch,
)
from captum_sam.cache import (
    CachedQuantities,
    QuantityCacheMixin,
    data_digest,
    file_digest,
    projection_setting,
    save_quantities,
)
from captum_sam.distributed import (
    all_reduce_sum,
    all_reduce_tree,
    contiguous,
    gather_ordered,
    is_distributed,
)
from captum_sam.projection import RandomProjection
from captum_sam.solvers import METHODS, InverseOperator, SolverOptions
from captum_sam.trajectory import MANIFEST, checkpoints_load_func, fetch_batch, load_trajectory

__all__ = ["SAMInfluenceFunction", "VARIANTS", "CURVATURES"]

VARIANTS = ("fast", "full", "exact", "plain")
CURVATURES = ("hessian", "ggn")


class SAMInfluenceFunction(HIFOperatorsMixin, QuantityCacheMixin, InfluenceFunctionBase):
    r"""SAM-HIF (fast, full, exact) and plain IF as a Captum ``InfluenceFunctionBase``.

    Args:
        model: The model (never modified: the checkpoint loads into a private copy).
        train_dataset: Training Dataset, or a DataLoader iterating it in order.
        checkpoint: The trained weights :math:`w^*`: a checkpoint file, or a record
            directory of :func:`captum_sam.train_sam` (its final checkpoint).
        checkpoints_load_func: ``load(model, path) -> learning_rate``.
        layers: Module names whose parameters are attributed (others held fixed).
        loss_fn: Per-example training loss, ``reduction="none"``.
        batch_size: Batch size for Datasets (and the LiSSA minibatch size).
        hessian_dataset: Data for the curvature (default: the training set); a set
            of ``m`` examples is rescaled by ``n/m``.
        test_loss_fn: Per-example test loss (default ``loss_fn``).
        rho: SAM radius of training.
        adaptive: ASAM (the Jacobian :math:`J` of its perturbation is exact too).
        weight_decay: :math:`\lambda` of the training objective (enters as
            :math:`n\lambda`).
        damping: Extra :math:`d`, added as :math:`n d I`.
        variant: ``"fast"``, ``"full"``, ``"exact"`` or ``"plain"``.
        curvature: ``"hessian"`` or ``"ggn"`` (generalised Gauss-Newton).
        solver: One of :data:`captum_sam.solvers.METHODS`.
        solver_options: :class:`~captum_sam.solvers.SolverOptions` or a dict of its
            fields.
        show_progress: Progress bars while forming or solving.
        projection_dim: If given, the test-side vectors :math:`A^{-T}\nabla l(z)` and
            the right-hand sides :math:`r_k` are projected to this many dimensions by a
            seeded random projection that preserves inner products in expectation
            (:class:`~captum_sam.projection.RandomProjection`) before their inner
            product: scores are unbiased estimates with relative error about
            ``1/sqrt(projection_dim)`` and intermediate quantities are
            ``projection_dim`` wide (``2 * projection_dim`` for ``exact``). Solves and
            ``parameter_change`` are exact.
        projection: ``"gaussian"`` or ``"rademacher"``.
        projection_seed: Seed of the projection.
        factorize: With ``curvature="ggn"``, the dense solver and every attributed
            parameter an ``nn.Linear`` weight or bias, form each Gauss-Newton
            matrix from layer inputs and output Jacobians
            (:func:`captum_sam.factored_ggn.linear_ggn`, one matrix product over the
            data per pair of layers) instead of :math:`P` curvature-vector
            products, after a check against ``ggn_vp`` on a few examples of the
            first batch (models whose examples interact fall back). ``False``
            always uses the products. The matrix is the same either way.

    Distributed: with an initialised ``torch.distributed`` process group, the mean
    gradient and every curvature product are summed over shards of the data on all
    ranks, training batches are split across ranks, and every rank receives the
    full result (see :mod:`captum_sam.distributed`).

    Shapes: ``influence`` returns ``(n_test, n_train)``.
    """

    def __init__(
        self,
        model: nn.Module,
        train_dataset: Dataset | DataLoader,
        checkpoint: str | os.PathLike[str],
        checkpoints_load_func: Callable[[nn.Module, str], float] = checkpoints_load_func,
        layers: Sequence[str] | None = None,
        loss_fn: Callable[[Any, Any], Tensor] | None = None,
        batch_size: int | None = 64,
        hessian_dataset: Dataset | DataLoader | None = None,
        test_loss_fn: Callable[[Any, Any], Tensor] | None = None,
        rho: float = 0.05,
        adaptive: bool = False,
        weight_decay: float = 0.0,
        damping: float = 0.0,
        variant: str = "full",
        curvature: str = "hessian",
        solver: str = "auto",
        solver_options: SolverOptions | dict[str, Any] | None = None,
        show_progress: bool = False,
        projection_dim: int | None = None,
        projection: str = "gaussian",
        projection_seed: int = 0,
        factorize: bool = True,
    ) -> None:
        # InfluenceFunctionBase.__init__ loads the checkpoint into the user's model
        # and may flip requires_grad; we set the same attributes without doing so.
        if variant not in VARIANTS:
            raise ValueError(f"`variant` must be one of {VARIANTS}, got {variant!r}")
        if curvature not in CURVATURES:
            raise ValueError(f"`curvature` must be one of {CURVATURES}, got {curvature!r}")
        if solver not in METHODS:
            raise ValueError(f"`solver` must be one of {METHODS}, got {solver!r}")
        for name, value in (("rho", rho), ("weight_decay", weight_decay), ("damping", damping)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(f"`{name}` must be a number >= 0, got {value!r}")
        for name, flag in (("adaptive", adaptive), ("factorize", factorize)):
            if not isinstance(flag, bool):
                raise TypeError(f"`{name}` must be a bool, got {flag!r}")
        symmetric = variant in ("fast", "plain")
        if solver in ("cg", "arnoldi") and not symmetric:
            raise ValueError(
                f"solver {solver!r} needs a symmetric matrix, but variant {variant!r} is not "
                "symmetric: use 'gmres', 'bicgstab' or 'dense' (or variant 'fast'/'plain')"
            )
        self.model = model
        self.checkpoint = _resolve_checkpoint(checkpoint)
        self.checkpoints_load_func = checkpoints_load_func
        self.loss_fn = loss_fn
        self.test_loss_fn = loss_fn if test_loss_fn is None else test_loss_fn
        self.sample_wise_grads_per_batch = False
        self.batch_size = batch_size
        self.reduction_type = self.test_reduction_type = "none"
        self.layer_modules = None
        self.train_dataloader = as_loader(_not_tuple(train_dataset), batch_size, "train_dataset")
        self.hessian_dataloader = (
            self.train_dataloader
            if hessian_dataset is None
            else as_loader(_not_tuple(hessian_dataset), batch_size, "hessian_dataset")
        )
        self.train_data = ordered_dataset(train_dataset)
        self.n_train = len(self.train_data)  # type: ignore[arg-type]
        if self.n_train == 0:
            raise ValueError("`train_dataset` is empty")
        n_hessian = dataset_size(self.hessian_dataloader)
        if n_hessian == 0:
            raise ValueError("`hessian_dataset` is empty")
        self.hessian_scale = self.n_train / n_hessian
        self.rho, self.adaptive = float(rho), adaptive
        self.weight_decay, self.damping = float(weight_decay), float(damping)
        self.variant, self.curvature, self.solver = variant, curvature, solver
        if isinstance(solver_options, dict):
            valid = {f.name for f in fields(SolverOptions)}
            unknown = set(solver_options) - valid
            if unknown:
                raise ValueError(
                    f"unknown `solver_options` {sorted(unknown)}; valid: {sorted(valid)}"
                )
            solver_options = SolverOptions(**solver_options)
        self.solver_options = solver_options or SolverOptions()
        self.show_progress = show_progress
        self.layers = None if layers is None else list(layers)
        self.names = F.attributed_names(model, self.layers)
        self.device = model_device(model)

        loader = CheckpointLoader(model, self.names, checkpoints_load_func)
        state = loader(self.checkpoint)
        self.params, self.frozen = state.params, state.frozen
        scratch = loader.scratch  # the factored GGN's hooks go on this private copy
        scratch.eval()
        self._factored_loss = F.FunctionalLoss(scratch, loss_fn, state.frozen)
        self._ggn_sites = (
            factored.linear_sites(scratch, self.names) if factorize and curvature == "ggn" else None
        )
        self._ggn_checked: bool | None = None
        self._dense_he: Tensor | None = None  # H_e, kept when the dense solver forms A
        self._loss = make_loss(model, loss_fn, state.frozen, "loss_fn")
        self._test_loss = make_loss(model, self.test_loss_fn, state.frozen, "test_loss_fn")
        self.dim = sum(self.params[n].numel() for n in self.names)
        self._local = False  # True: curvature products on all data, on this rank alone
        self._cache: CachedQuantities | None = None
        sizes = {n: self.params[n].numel() for n in self.names}
        self.projector = (
            None
            if projection_dim is None
            else RandomProjection(sizes, projection_dim, projection, projection_seed)
        )
        with F.eval_mode(model):
            first = next(iter(on_device(self.train_dataloader, self.device)))
            validate_batch(self._loss, self.params, first, "train_dataset")
            local = (b for _, b in local_batches(self.train_dataloader, self.device))
            total, count = F.grad_sum(self._loss, self.params, local)
            all_reduce_tree(total)
            count = int(all_reduce_sum(torch.tensor([count], dtype=torch.float64))[0])
            self.mean_grad = F.tree_scale(total, 1.0 / count)
        F.check_finite(self.mean_grad, "training gradients at the checkpoint")
        self.eps = F.sam_perturbation(self.params, self.mean_grad, self.rho, self.adaptive)
        self.perturbed = F.tree_add(self.params, self.eps)
        # (P, 1) columns of w* and g0 for the closed-form derivative of eps
        self._flat_point = tuple(
            F.flatten(t, self.names).unsqueeze(1) for t in (self.params, self.mean_grad)
        )
        self._columns = None
        self.inverse = InverseOperator(
            self._matvec,
            self.dim,
            method=solver,
            symmetric=symmetric,
            rmatvec=None if symmetric else self._rmatvec,
            sampled_matvec=self._sampled(transpose=False),
            sampled_rmatvec=None if symmetric else self._sampled(transpose=True),
            options=self.solver_options,
            dtype=self.params[self.names[0]].dtype,
            device=self.device,
            dense_builder=self._factored_matrix,
        )

    # ------------------------------------------------------------------ data

    def _reduce(self) -> bool:
        """Whether curvature products are split over ranks and summed."""
        return is_distributed() and not self._local

    def _hessian_batches(self) -> Iterable[tuple[Any, ...]]:
        if self._reduce():
            return (b for _, b in local_batches(self.hessian_dataloader, self.device))
        return on_device(self.hessian_dataloader, self.device)

    @contextlib.contextmanager
    def _local_mode(self) -> Iterator[None]:
        """Solve on this rank alone (ranks solving different right-hand sides)."""
        self._local = True
        try:
            yield
        finally:
            self._local = False

    def _prepare_inverse(self) -> None:
        """Form the dense matrix / eigenbasis with every rank, before ranks split up."""
        if self.inverse.method == "dense":
            self.inverse.matrix()
        elif self.inverse.method == "arnoldi" and is_distributed():
            with F.eval_mode(self.model):
                self.inverse.solve(self.params[self.names[0]].new_ones(self.dim, 1))

    def _project(self, rows: Tensor) -> Tensor:
        """Project ``(m, P)`` rows (``(m, 2P)`` for ``exact``: each half) if asked."""
        if self.projector is None:
            return rows
        halves = rows.split(self.dim, dim=1)
        return torch.cat([self.projector(h) for h in halves], dim=1)

    # ------------------------------------------------------------------ per-example sides

    def _grads(self, batch: tuple[Any, ...], loss: F.FunctionalLoss, point: F.Params) -> Tensor:
        g = F.per_example_grads(loss, point, batch)
        return F.flatten(g, self.names, batch_dims=1)

    def _train_side(self, batch: tuple[Any, ...]) -> Tensor:
        """:math:`r_k` rows ``(B, P)``; for ``exact`` ``[b_k, d eps/d delta_k]`` ``(B, 2P)``."""
        point = self.params if self.variant == "plain" else self.perturbed
        b = self._grads(batch, self._loss, point)
        if self.variant != "exact":
            return b
        own = self._grads(batch, self._loss, self.params)  # d eps along g -> g + g_k / n
        d = self._jvp_eps_given(None, own.T / self.n_train).T
        return torch.cat([b, d], dim=1)

    def _test_side(self, batch: tuple[Any, ...], loss: F.FunctionalLoss, what: str) -> Tensor:
        r"""Rows :math:`A^{-T} \nabla l(z)` (``exact``: with :math:`H_e A^{-T}\nabla l`)."""
        return self._solve_test(self._grads(batch, loss, self.params), what)

    def _solve_test(self, grads: Tensor, what: str) -> Tensor:
        """Test-side rows for gradient rows ``(m, P)``: one solve with ``m`` columns."""
        F.check_finite(grads, "gradients of the examples at the checkpoint")
        v = self._solve(grads.T, transpose=True, what=what)
        if self.variant != "exact":
            return v.T
        with F.eval_mode(self.model):
            hv = self._he_product(v)
        return torch.cat([v.T, hv.T], dim=1)

    # ------------------------------------------------------------------ Captum API

    def compute_intermediate_quantities(
        self,
        inputs_dataset: tuple[Any, ...] | DataLoader,
        aggregate: bool = False,
        show_progress: bool = False,
        test: bool = False,
    ) -> Tensor:
        r"""Vectors whose inner products are the influence scores.

        ``compute_intermediate_quantities(test_data, test=True) @
        compute_intermediate_quantities(train_data).T == influence(test_data)``.

        Args:
            inputs_dataset: A batch tuple or a DataLoader.
            aggregate: Sum over the examples (``(1, D)``).
            show_progress: Progress bar over batches.
            test: Test side (:math:`A^{-T}\nabla l(z)`, solved) instead of the
                training side (right-hand sides :math:`r_k`).

        Returns:
            ``(n_examples, D)`` with ``D = P`` (``2P`` for ``exact``).
        """
        data = as_loader(inputs_dataset, self.batch_size, "inputs_dataset")
        loss = self._test_loss if test else self._loss
        with F.eval_mode(self.model):
            if test:  # every rank computes every test vector (the solves are collective)
                rows = []
                for i, batch in enumerate(
                    on_device(progress(data, show_progress, "batches"), self.device)
                ):
                    validate_batch(loss, self.params, batch, "inputs_dataset", run_loss=i == 0)
                    if aggregate:  # sum the gradients, then one solve
                        rows.append(self._grads(batch, loss, self.params).sum(0, keepdim=True))
                    else:
                        rows.append(self._test_side(batch, loss, "test vectors"))
                if not rows:
                    raise ValueError("`inputs_dataset` is empty")
                out = torch.cat(rows)
                if aggregate:
                    out = self._solve_test(out.sum(dim=0, keepdim=True), "aggregated test vector")
                return self._project(out)
            parts = []
            for i, batch in progress(local_batches(data, self.device), show_progress, "batches"):
                validate_batch(loss, self.params, batch, "inputs_dataset", run_loss=i == 0)
                parts.append((i, self._project(self._train_side(batch))))
            gathered = gather_ordered(parts)
        if not gathered:
            raise ValueError("`inputs_dataset` is empty")
        out = torch.cat(gathered)
        F.check_finite(out, "gradients")
        return out.sum(dim=0, keepdim=True) if aggregate else out

    def influence(  # type: ignore[override]
        self,
        inputs: tuple[Any, ...] | DataLoader,
        k: int | None = None,
        proponents: bool = True,
        show_progress: bool = False,
        aggregate: bool = False,
    ) -> Tensor | KMostInfluentialResults:
        """Influence of every training example on every test example.

        Args:
            inputs: Test batch ``(features..., labels)`` or a DataLoader of them.
            k: Return the ``k`` proponents (or opponents) per test example.
            proponents: Highest (``True``) or lowest (``False``) with ``k``.
            show_progress: Progress bars.
            aggregate: Sum over the test examples (the influence on a validation
                set, Theorem 4.8), computed with a single solve.

        Returns:
            ``(n_test, n_train)`` (``(1, n_train)`` aggregated), or
            ``KMostInfluentialResults`` with ``k``.
        """
        if inputs is None:
            raise ValueError("`inputs` is required; use self_influence() for self influence")
        if k is None:
            return self._influence(inputs, show_progress, aggregate)
        return self._get_k_most_influential(inputs, k, proponents, show_progress, aggregate)

    def _columns_blocks(
        self, inputs: Any, show_progress: bool, aggregate: bool = False
    ) -> Iterable[Tensor]:
        q = self.compute_intermediate_quantities(inputs, test=True, aggregate=aggregate)
        if self._cache is not None:
            yield from self._cache.scores(q)
            return
        bar = progress(
            local_batches(self.train_dataloader, self.device),
            show_progress,
            f"SAM-HIF {self.variant}: training",
            total=len(self.train_dataloader),  # type: ignore[arg-type]
        )
        with F.eval_mode(self.model):
            blocks = [(i, q @ self._project(self._train_side(batch)).T) for i, batch in bar]
        yield from gather_ordered(blocks)

    def _influence(  # type: ignore[override]
        self,
        inputs: tuple[Any, ...] | DataLoader,
        show_progress: bool = False,
        aggregate: bool = False,
    ) -> Tensor:
        out = torch.cat(list(self._columns_blocks(inputs, show_progress, aggregate)), dim=1)
        F.check_finite(out, "influence scores")
        return out

    def _get_k_most_influential(  # type: ignore[override]
        self,
        inputs: tuple[Any, ...] | DataLoader,
        k: int = 5,
        proponents: bool = True,
        show_progress: bool = False,
        aggregate: bool = False,
    ) -> KMostInfluentialResults:
        blocks = self._columns_blocks(inputs, show_progress, aggregate)
        return KMostInfluentialResults(*stream_topk(blocks, k, proponents))

    def self_influence(  # type: ignore[override]
        self,
        inputs_dataset: tuple[Any, ...] | DataLoader | None = None,
        show_progress: bool = False,
    ) -> Tensor:
        r"""Self influence :math:`\nabla l_k(w^*)^\top A^{-1} r_k` of every example.

        Args:
            inputs_dataset: Examples (default: the training set).
            show_progress: Progress bar over batches.

        Returns:
            ``(n_examples,)``.
        """
        data = (
            self.train_dataloader
            if inputs_dataset is None
            else as_loader(inputs_dataset, self.batch_size, "inputs_dataset")
        )
        parts = []
        with F.eval_mode(self.model):
            self._prepare_inverse()
            bar = progress(
                local_batches(data, self.device),
                show_progress,
                f"SAM-HIF {self.variant}: self influence",
            )
            with self._local_mode():  # each rank solves for its own batches
                for i, batch in bar:
                    q = self._project(self._test_side(batch, self._loss, "self influence"))
                    parts.append((i, (q * self._project(self._train_side(batch))).sum(dim=1)))
        out = gather_ordered(parts)
        if not out:
            raise ValueError("`inputs_dataset` is empty")
        return torch.cat(out)

    # ------------------------------------------------------------------ caching

    def _fingerprint(self) -> dict[str, Any]:
        return {
            "estimator": type(self).__name__,
            "checkpoint": file_digest(self.checkpoint),
            "right_hand_side": "plain"
            if self.variant == "plain"
            else ("exact" if self.variant == "exact" else "perturbed"),
            "rho": self.rho,
            "adaptive": self.adaptive,
            "parameters": self.names,
            "projection": projection_setting(self.projector),
            "loss": repr(self._loss.loss_fn),
            "data": data_digest(self.train_data),
            "dtype": str(self.params[self.names[0]].dtype),
        }

    def save_intermediate_quantities(self, directory: str | os.PathLike[str]) -> str:
        """Compute the training-side quantities :math:`r_k` and store them in ``directory``.

        One torch file per training batch plus a manifest fingerprinting the
        checkpoint (SHA-256), the settings the right-hand sides depend on (variant,
        rho, parameters, projection), the loss and the training data. Curvature,
        damping, weight decay and the solver do not change them, so the cache stays
        valid across those.

        Returns:
            The directory.
        """
        with F.eval_mode(self.model):
            parts = (
                (i, self._project(self._train_side(b)))
                for i, b in local_batches(self.train_dataloader, self.device)
            )
            return save_quantities(directory, self._fingerprint(), parts)

    # ------------------------------------------------------------------ editing

    def parameter_change(
        self, indices: Sequence[int] | Tensor, flat: bool = False
    ) -> F.Params | Tensor:
        r""":math:`w_{-S} - w^* \approx A^{-1} \sum_{k \in S} r_k` (one solve).

        Args:
            indices: Training indices of the removed set :math:`S`.
            flat: Return a flat ``(P,)`` vector instead of a dict.

        Returns:
            Dict name -> tensor of the parameter's shape, or ``(P,)``.
        """
        idx = check_indices(indices, self.n_train)
        size = self.batch_size or 64
        chunks = [idx[start : start + size] for start in range(0, len(idx), size)]
        width = 2 * self.dim if self.variant == "exact" else self.dim
        rhs = self.params[self.names[0]].new_zeros(width)
        with F.eval_mode(self.model):
            for _, chunk in contiguous(chunks):
                batch = F.to_device(fetch_batch(self.train_data, chunk), self.device)
                rhs += self._train_side(batch).sum(dim=0)
            all_reduce_sum(rhs)
            if self.variant == "exact":  # b + H_e (sum of d eps / d delta_k)
                b, d = rhs[: self.dim], rhs[self.dim :]
                rhs = b + self._he_product(d.unsqueeze(1)).squeeze(1)
            delta = self._solve(rhs.unsqueeze(1), transpose=False, what="parameter change")
        delta = delta.squeeze(1)
        return delta if flat else F.unflatten(delta, {n: self.params[n] for n in self.names})

    def edited_model(self, indices: Sequence[int] | Tensor) -> nn.Module:
        r"""A new model at :math:`w^* + A^{-1}\sum_{k\in S} r_k`; the user's model is untouched."""
        delta = self.parameter_change(indices)
        return edited_copy(self.model, self.checkpoints_load_func, self.checkpoint, delta)  # type: ignore[arg-type]


def _not_tuple(data: Any) -> Any:
    if isinstance(data, (tuple, list)):
        raise TypeError("`train_dataset` / `hessian_dataset` must be a Dataset or a DataLoader")
    return data


def _resolve_checkpoint(checkpoint: Any) -> str:
    if not isinstance(checkpoint, (str, os.PathLike)):
        raise TypeError(f"`checkpoint` must be a path, got {type(checkpoint).__name__}")
    path = os.fspath(checkpoint)
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, MANIFEST)):
        return load_trajectory(path).final.path
    if not os.path.exists(path):
        raise FileNotFoundError(f"`checkpoint` {path!r} does not exist")
    return path
