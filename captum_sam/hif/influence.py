r"""SAM-HIF: Captum's ``NaiveInfluenceFunction`` with the curvature where SAM training is.

:class:`SAMInfluenceFunction` is a drop-in for Captum's ``NaiveInfluenceFunction``:
the same arguments with the same meanings (and, where they change a result, the same
defaults), then SAM's own. Every matrix uses the *summed* training loss (Captum's
scale), so weight decay :math:`\lambda` enters as :math:`n\lambda` and damping
:math:`d` as :math:`n d`. With :math:`H_e` the curvature at :math:`w^* + \epsilon^*`,
:math:`H_0` at :math:`w^*`, :math:`J = d\epsilon/dw`, :math:`b_k = \nabla l_k(w^* +
\epsilon^*)` and :math:`r = n(\lambda + d) + \text{hessian\_reg}`:

=========  ==================================  ===============================================
variant    matrix :math:`A`                    right-hand side :math:`r_k`
=========  ==================================  ===============================================
fast       :math:`H_e + r I`                   :math:`b_k` (Theorem 4.3)
full       :math:`H_e (I + J) + r I`           :math:`b_k` (Theorem 4.5, not symmetric)
exact      :math:`H_e (I + J) + r I`           :math:`b_k + H_e\, \partial\epsilon/\partial\delta_k`
plain      :math:`H_0 + r I`                   :math:`\nabla l_k(w^*)` (Koh & Liang; Captum's)
=========  ==================================  ===============================================

The influence of :math:`z_k` on a test example :math:`z` is
:math:`\nabla l(z; w^*)^\top A^{-1} r_k`, the first-order increase of :math:`z`'s loss
when :math:`z_k` is removed (positive = helpful). With ``rho=0`` and
``variant="plain"`` this is Captum's ``NaiveInfluenceFunction``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from captum_sam import core as F
from captum_sam._captum import IntermediateQuantitiesInfluenceFunction, KMostInfluentialResults
from captum_sam.core.checkpoints import checkpoints_load_func, edited_copy
from captum_sam.core.data import check_indices, fetch_batch, local_batches, progress, stream_topk
from captum_sam.core.distributed import all_reduce_sum, contiguous, gather_ordered
from captum_sam.core.errors import ArgumentError
from captum_sam.core.store import (
    data_digest,
    file_digest,
    open_quantities,
    projection_setting,
    save_quantities,
)
from captum_sam.hif import sides
from captum_sam.hif.inverse import LowRankInverse, SolvedInverse
from captum_sam.hif.setup import check_number, prepare, resolve_checkpoint
from captum_sam.hif.setup import solver_options as make_solver_options
from captum_sam.solvers import InverseOperator, SolverOptions

__all__ = ["SAMInfluenceFunction"]


class SAMInfluenceFunction(IntermediateQuantitiesInfluenceFunction):
    r"""SAM-HIF (fast, full, exact) and plain IF as a Captum ``NaiveInfluenceFunction``.

    The first sixteen arguments are ``NaiveInfluenceFunction``'s, with its meanings
    and defaults (``batch_size`` excepted: a larger default changes no score); the
    rest are keyword-only and SAM's own.

    Args:
        model: The model (never modified: the checkpoint loads into a private copy,
            which runs in eval mode; ``requires_grad`` is never changed).
        train_dataset: Training Dataset, or a DataLoader iterating it in order.
        checkpoint: The trained weights :math:`w^*`: a checkpoint file, or a record
            directory of :func:`~captum_sam.train_sam` (its final checkpoint).
        checkpoints_load_func: ``load(model, path) -> learning_rate``.
        layers: Module names whose parameters are attributed (others held fixed).
        loss_fn: Training loss (per-example, or reducing with
            ``sample_wise_grads_per_batch=True``; see :mod:`captum_sam.core.losses`).
        batch_size: Batch size for Datasets (and LiSSA's minibatch size).
        hessian_dataset: Data for the curvature (default: the training set). Its
            curvature is summed, as in Captum (see ``rescale_hessian``).
        test_loss_fn: Loss for test examples (default ``loss_fn``).
        sample_wise_grads_per_batch: Captum's switch for reducing losses (then only
            ``nn.Linear``/``nn.Conv2d`` parameters are attributed, as in Captum).
        projection_dim: Keep the top ``projection_dim`` eigen-directions of
            :math:`A` (singular directions for the non-symmetric variants), Captum's
            low-rank inverse; ``None`` keeps every direction above
            ``hessian_inverse_tol``. Needs ``solver`` ``"dense"`` or ``"auto"``.
        seed: Captum's reproducibility seed (nothing here is random; kept so that
            code written for Captum runs unchanged).
        hessian_reg: Added to the diagonal of :math:`A`, as Captum adds it to the
            Hessian.
        hessian_inverse_tol: Eigenvalues (singular values) of :math:`A` at or below
            this are dropped, as in Captum (``solver="dense"``); ``None`` (our
            extension) drops none, negative eigenvalues included: the exact inverse.
        projection_on_cpu: Keep the low-rank factors on the CPU (as Captum).
        show_progress: Progress bars while forming :math:`A` or solving.
        rho: SAM radius of training (0 with ``variant="plain"`` is Captum's).
        adaptive: ASAM.
        weight_decay: :math:`\lambda` of the training objective (enters as
            :math:`n\lambda`).
        damping: Extra :math:`d`, added as :math:`n d I`.
        variant: ``"fast"``, ``"full"`` (default, the paper's SAM-HIF), ``"exact"``
            or ``"plain"``.
        curvature: ``"hessian"`` or ``"ggn"`` (generalised Gauss-Newton, positive
            semi-definite).
        solver: ``"auto"`` (``"dense"`` when ``projection_dim`` is set or ``P`` is
            small, else ``"cg"``/``"gmres"``), ``"dense"`` (Captum's decomposition),
            or an iterative solver of :data:`captum_sam.solvers.METHODS` (solves
            exactly, needs ``projection_dim=None``).
        solver_options: :class:`~captum_sam.solvers.SolverOptions` or a dict.
        rescale_hessian: Multiply the curvature of a ``hessian_dataset`` of ``m``
            examples by ``n/m`` (an estimate of the full-data curvature) instead of
            summing it as Captum does.
        sketch_dim: If given, test and train intermediate quantities are projected to
            this many dimensions by a seeded random projection that preserves inner
            products in expectation (:class:`~captum_sam.core.projection.RandomProjection`).
        sketch: ``"gaussian"`` or ``"rademacher"``.
        sketch_seed: Seed of the sketch.
        factorize: With ``curvature="ggn"`` and ``nn.Linear`` models, form GGN
            matrices from layer factors (checked against ``ggn_vp`` first).

    Shapes: ``influence`` returns ``(n_test, n_train)``.
    """

    def __init__(
        self,
        model: nn.Module,
        train_dataset: Dataset | DataLoader,
        checkpoint: str | os.PathLike[str],
        checkpoints_load_func: Callable[[nn.Module, str], float] = checkpoints_load_func,
        layers: list[str] | None = None,
        loss_fn: Callable[..., Tensor] | None = None,
        batch_size: int | None = 64,
        hessian_dataset: Dataset | DataLoader | None = None,
        test_loss_fn: Callable[..., Tensor] | None = None,
        sample_wise_grads_per_batch: bool = False,
        projection_dim: int | None = 50,
        seed: int = 42,
        hessian_reg: float = 1e-6,
        hessian_inverse_tol: float | None = 1e-5,
        projection_on_cpu: bool = True,
        show_progress: bool = False,
        *,
        rho: float = 0.05,
        adaptive: bool = False,
        weight_decay: float = 0.0,
        damping: float = 0.0,
        variant: str = "full",
        curvature: str = "hessian",
        solver: str = "auto",
        solver_options: SolverOptions | dict[str, Any] | None = None,
        rescale_hessian: bool = False,
        sketch_dim: int | None = None,
        sketch: str = "gaussian",
        sketch_seed: int = 0,
        factorize: bool = True,
    ) -> None:
        self.model = model
        self.checkpoint = resolve_checkpoint(checkpoint)
        self.checkpoints_load_func = checkpoints_load_func
        self.loss_fn = loss_fn
        self.test_loss_fn = loss_fn if test_loss_fn is None else test_loss_fn
        self.batch_size = batch_size
        self.projection_dim, self.seed = _rank(projection_dim), seed
        self.hessian_reg = check_number("hessian_reg", hessian_reg)
        self.hessian_inverse_tol = (
            None
            if hessian_inverse_tol is None
            else check_number("hessian_inverse_tol", hessian_inverse_tol)
        )
        self.projection_on_cpu, self.show_progress = projection_on_cpu, show_progress
        self.variant, self.curvature = variant, curvature
        self.rho, self.adaptive = rho, adaptive
        self.weight_decay, self.damping = weight_decay, damping
        self.solver_options = solver_options_ = make_solver_options(solver_options)
        self.operator = prepare(
            self, train_dataset, layers, hessian_dataset, sample_wise_grads_per_batch,
            variant, curvature, solver, rho, adaptive,
            {"weight_decay": weight_decay, "damping": damping, "hessian_reg": hessian_reg},
            rescale_hessian, (sketch_dim, sketch, sketch_seed), factorize, solver_options_,
        )  # fmt: skip
        self.rho = self.operator.rho
        self.weight_decay, self.damping = float(weight_decay), float(damping)
        self.solver = solver
        self._cache = None
        self.inverse = self._build_inverse(solver)
        sides.check_sketch(self)

    # ------------------------------------------------------------------ the inverse

    def _build_inverse(self, solver: str) -> LowRankInverse | SolvedInverse:
        """Captum's low-rank decomposition, or a solver (see :mod:`captum_sam.hif.inverse`).

        ``solver="dense"`` decomposes :math:`A` when a rank (``projection_dim``) or a
        tolerance (``hessian_inverse_tol``) is set, Captum's semantics; with both
        ``None`` it solves exactly with LU factors instead.
        """
        op = self.operator
        decompose = self.projection_dim is not None or self.hessian_inverse_tol is not None
        if solver == "auto":
            small = op.dim <= self.solver_options.dense_max_dim
            solver = (
                "dense"
                if self.projection_dim is not None or small
                else ("cg" if op.symmetric else "gmres")
            )
        if solver != "dense" and self.projection_dim is not None:
            raise ArgumentError(
                f"`projection_dim`={self.projection_dim} keeps the top eigen-directions of "
                f"A, which only solver='dense' computes; pass projection_dim=None to solve "
                f"with solver={solver!r}"
            )
        if solver in ("cg", "arnoldi") and not op.symmetric:
            raise ValueError(
                f"solver {solver!r} needs a symmetric matrix, but variant {self.variant!r} is "
                "not symmetric: use 'gmres', 'bicgstab' or 'dense' (or variant 'fast'/'plain')"
            )
        self.method = solver
        self._dense = None
        if solver == "dense" and decompose:
            matrix = self._form(keep_he=self.variant == "exact")
            low = LowRankInverse.from_matrix(
                matrix, op.symmetric, self.projection_dim, self.hessian_inverse_tol
            )
            self._dense = matrix
            if self.variant == "exact":
                self._he_right = op.dense_he @ low.right  # type: ignore[operator]
            return self._to_projection_device(low)
        exact = self.variant == "exact"
        inverse = InverseOperator(
            op.matvec, op.dim, method=solver, symmetric=op.symmetric,
            rmatvec=None if op.symmetric else op.rmatvec,
            sampled_matvec=op.sampled(transpose=False),
            sampled_rmatvec=None if op.symmetric else op.sampled(transpose=True),
            options=self.solver_options, dtype=op.mean_grad[op.names[0]].dtype,
            device=self.device, dense_builder=lambda: op.factored_matrix(keep_he=exact),
        )  # fmt: skip
        return SolvedInverse(inverse, F.check_finite)

    def _form(self, keep_he: bool) -> Tensor:
        bar = None
        if self.show_progress:
            from tqdm.auto import tqdm

            bar = tqdm(desc=f"Using {self.get_name()} to form A (curvature columns)")
        self.operator.columns_bar = bar
        try:
            return self.operator.dense_matrix(self.solver_options.chunk_size, keep_he)
        finally:
            self.operator.columns_bar = None
            if bar is not None:
                bar.close()

    def _to_projection_device(self, low: LowRankInverse) -> LowRankInverse:
        if not self.projection_on_cpu:
            return low
        cpu = torch.device("cpu")
        if self.variant == "exact":
            self._he_right = self._he_right.to(cpu)
        return LowRankInverse(low.left.to(cpu), low.right.to(cpu), low.values.to(cpu))

    @property
    def params(self) -> F.Params:
        """:math:`w^*` (attributed parameters)."""
        return self.operator.params

    @property
    def mean_grad(self) -> F.Params:
        r""":math:`g_0 = \nabla L(w^*)` over the training set."""
        return self.operator.mean_grad

    @property
    def eps(self) -> F.Params:
        r""":math:`\epsilon^* = \epsilon(w^*; g_0)`."""
        return self.operator.eps

    @property
    def perturbed(self) -> F.Params:
        r""":math:`w^* + \epsilon^*`."""
        return self.operator.perturbed

    @property
    def dim(self) -> int:
        """Number of attributed coordinates ``P``."""
        return self.operator.dim

    @property
    def last_residual(self) -> Tensor | None:
        """Relative residuals ``||A x - b|| / ||b||`` of the last solve, per column."""
        return (
            self.inverse.inverse.last_residual if isinstance(self.inverse, SolvedInverse) else None
        )

    def matrix(self) -> Tensor:
        """The dense :math:`A` ``(P, P)`` (formed on first use unless already formed)."""
        if self._dense is None:
            if isinstance(self.inverse, SolvedInverse) and self.inverse.inverse.method == "dense":
                self._dense = self.inverse.inverse.matrix()
            else:
                self._dense = self._form(keep_he=False)
        return self._dense

    # ------------------------------------------------------------------ Captum API

    def compute_intermediate_quantities(
        self,
        inputs_dataset: tuple[Any, ...] | DataLoader,
        aggregate: bool = False,
        show_progress: bool = False,
        return_on_cpu: bool = True,
        test: bool = False,
    ) -> Tensor:
        r"""Embeddings whose inner products are the influence scores.

        ``compute_intermediate_quantities(test_data, test=True) @
        compute_intermediate_quantities(train_data).T == influence(test_data)``.
        With ``solver="dense"`` (Captum's low-rank inverse) these are ``g L`` and
        ``r_k R`` (``(n, k)``); at ``rho=0`` with ``variant="plain"`` both sides are
        Captum's symmetric embedding. With an iterative solver the test side is
        :math:`A^{-\top}\nabla l(z)` and the train side :math:`r_k` (``(n, P)``;
        ``2P`` for ``exact``).

        Args:
            inputs_dataset: A batch tuple or a DataLoader.
            aggregate: Sum over the examples (``(1, D)``).
            show_progress: Progress bar over batches.
            return_on_cpu: Return the result on the CPU (Captum's default).
            test: Test side (``test_loss_fn`` at :math:`w^*`) instead of the training
                side (``loss_fn``, right-hand sides :math:`r_k`).
        """
        out = sides.quantities(self, inputs_dataset, aggregate, show_progress, test)
        return out.cpu() if return_on_cpu else out

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
            aggregate: Sum over the test examples (the influence on a validation set).

        Returns:
            ``(n_test, n_train)`` (``(1, n_train)`` aggregated), or
            ``KMostInfluentialResults`` with ``k``.
        """
        if inputs is None:
            raise ArgumentError(
                "`inputs` argument is required. To compute self influence scores, use the "
                "`self_influence` method instead."
            )
        if k is None:
            return self._influence(inputs, show_progress, aggregate)
        return self._get_k_most_influential(inputs, k, proponents, show_progress, aggregate)

    def _blocks(self, inputs: Any, desc: str | None, aggregate: bool) -> Iterable[Tensor]:
        q = sides.quantities(self, inputs, aggregate, False, True)
        if self._cache is not None:
            yield from self._cache.scores(q)
            return
        bar = progress(
            local_batches(self.train_dataloader, self.device),
            desc is not None,
            desc or "",
            total=_length(self.train_dataloader),
        )
        blocks = [(i, q @ sides.train_rows(self, batch).T) for i, batch in bar]
        yield from gather_ordered(blocks)

    def _influence(  # type: ignore[override]
        self, inputs: Any, show_progress: bool = False, aggregate: bool = False
    ) -> Tensor:
        desc = f"Using {self.get_name()} to compute influence scores. Processing batch"
        out = torch.cat(list(self._blocks(inputs, desc if show_progress else None, aggregate)), 1)
        F.check_finite(out, "influence scores")
        return out

    def _get_k_most_influential(  # type: ignore[override]
        self,
        inputs: Any,
        k: int = 5,
        proponents: bool = True,
        show_progress: bool = False,
        aggregate: bool = False,
    ) -> KMostInfluentialResults:
        desc = (
            f"Using {self.get_name()} to perform computation for getting "
            f"{'proponents' if proponents else 'opponents'}. Processing training batches"
        )
        blocks = self._blocks(inputs, desc if show_progress else None, aggregate)
        return KMostInfluentialResults(*stream_topk(blocks, k, proponents))

    def self_influence(  # type: ignore[override]
        self,
        inputs_dataset: tuple[Any, ...] | DataLoader | None = None,
        show_progress: bool = False,
    ) -> Tensor:
        r"""Self influence :math:`\nabla l_k(w^*)^\top A^{-1} r_k` of every example ``(n,)``."""
        return sides.self_influence(self, inputs_dataset, show_progress)

    # ------------------------------------------------------------------ caching

    def _fingerprint(self) -> dict[str, Any]:
        rhs = (
            "plain"
            if self.variant == "plain"
            else ("exact" if self.variant == "exact" else "perturbed")
        )
        low = isinstance(self.inverse, LowRankInverse)
        return {
            "estimator": type(self).__name__,
            "checkpoint": file_digest(self.checkpoint),
            "right_hand_side": rhs,
            "rho": self.rho,
            "adaptive": self.adaptive,
            "parameters": self.names,
            "inverse": sides.inverse_setting(self) if low else "solved",
            "projection": projection_setting(self.sketch),
            "loss": [repr(self.loss_fn), self.reduction_type],
            "data": data_digest(self.train_data),
            "dtype": str(self.operator.mean_grad[self.names[0]].dtype),
        }

    def save_intermediate_quantities(self, directory: str | os.PathLike[str]) -> str:
        """Compute the training-side quantities and store them in ``directory``.

        One torch file per training batch plus a manifest fingerprinting the
        checkpoint (SHA-256), the settings the quantities depend on, the loss and the
        training data. With an iterative solver they are the right-hand sides
        :math:`r_k`, which curvature, damping, weight decay and the solver do not
        change; with ``solver="dense"`` they depend on the decomposition too.

        Returns:
            The directory.
        """
        parts = (
            (i, sides.train_rows(self, b))
            for i, b in local_batches(self.train_dataloader, self.device)
        )
        return save_quantities(directory, self._fingerprint(), parts)

    def load_intermediate_quantities(self, directory: str | os.PathLike[str]) -> Tensor:
        """The cached training side ``(n_train, D)``; refused if stale (``ValueError``)."""
        return open_quantities(directory, self._fingerprint()).load(self.device)

    def use_intermediate_quantities(self, directory: str | os.PathLike[str] | None) -> None:
        """Make ``influence`` read the training side from a cache (``None``: stop)."""
        self._cache = None if directory is None else open_quantities(directory, self._fingerprint())

    # ------------------------------------------------------------------ editing

    def parameter_change(
        self, indices: Sequence[int] | Tensor, flat: bool = False
    ) -> F.Params | Tensor:
        r""":math:`w_{-S} - w^* \approx A^{-1} \sum_{k \in S} r_k` (one solve).

        Args:
            indices: Training indices of the removed set :math:`S`.
            flat: Return a flat ``(P,)`` vector instead of a dict.
        """
        op = self.operator
        idx = check_indices(indices, self.n_train)
        size = self.batch_size or 64
        chunks = [idx[start : start + size] for start in range(0, len(idx), size)]
        width = 2 * op.dim if self.variant == "exact" else op.dim
        rhs = op.mean_grad[self.names[0]].new_zeros(width)
        for _, chunk in contiguous(chunks):
            batch = F.to_device(fetch_batch(self.train_data, chunk), self.device)
            rhs += sides.right_hand_sides(self, batch).sum(dim=0)
        all_reduce_sum(rhs)
        if self.variant == "exact":  # b + H_e (sum of d eps / d delta_k)
            b, d = rhs[: op.dim], rhs[op.dim :]
            rhs = b + op.he_product(d.unsqueeze(1)).squeeze(1)
        if isinstance(self.inverse, LowRankInverse):
            delta = self.inverse.solve(rhs.unsqueeze(1).to(self.inverse.left)).to(rhs)
        else:
            delta = self.inverse.solve(rhs.unsqueeze(1))
        delta = delta.squeeze(1)
        return delta if flat else F.unflatten(delta, {n: op.params[n] for n in self.names})

    def edited_model(self, indices: Sequence[int] | Tensor) -> nn.Module:
        r"""A new model at :math:`w^* + A^{-1}\sum_{k\in S} r_k`; the user's model is untouched."""
        delta = self.parameter_change(indices)
        return edited_copy(self.model, self.checkpoints_load_func, self.checkpoint, delta)  # type: ignore[arg-type]


def _rank(projection_dim: Any) -> int | None:
    if projection_dim is None:
        return None
    if (
        isinstance(projection_dim, bool)
        or not isinstance(projection_dim, int)
        or projection_dim < 1
    ):
        raise ValueError(f"`projection_dim` must be a positive int or None, got {projection_dim!r}")
    return projection_dim


def _length(data: Any) -> int | None:
    try:
        return len(data)
    except TypeError:
        return None
