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
when :math:`z_k` is removed (positive = helpful), up to the weight decay's share
(one constant per test example, :doc:`/math`); ``parameter_change`` includes it.
With ``rho=0`` and ``variant="plain"`` this is Captum's ``NaiveInfluenceFunction``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from captum_sam import core as F
from captum_sam.core.checkpoints import checkpoints_load_func
from captum_sam.core.errors import ArgumentError
from captum_sam.hif import dense, kfac_solve, sides
from captum_sam.hif.base import CAPTUM_ARGUMENTS, SAM_ARGUMENTS, SAMInfluenceBase, pick
from captum_sam.hif.inverse import LowRankInverse, SolvedInverse
from captum_sam.solvers import InverseOperator, SolverOptions

__all__ = ["SAMInfluenceFunction"]


class SAMInfluenceFunction(SAMInfluenceBase):
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
        rho: SAM radius of training (0 with ``variant="plain"`` is Captum's). Default ``None``: the
            recorded run's or 0.05 (:func:`~captum_sam.trajectory.sam_settings`).
        adaptive: ASAM. Default ``None``: as for ``rho`` (else ``False``).
        weight_decay: :math:`\lambda` of the training objective (enters as
            :math:`n\lambda`).
        damping: Extra :math:`d`, added as :math:`n d I`. ``None`` (default): 0 for
            ``"hessian"``/``"ggn"`` (so that ``rho=0``, ``variant="plain"`` is Captum's
            ``NaiveInfluenceFunction``); for ``"kfac"``/``"ekfac"`` each layer's
            :math:`n d_l` is 0.1 times the mean eigenvalue of its curvature block
            (kronfluence's rule). ``"auto"``: :math:`n d` is 0.1 times the mean
            eigenvalue of the curvature :math:`C` at :math:`A`'s point plus
            :math:`\max(0, -\lambda_{\min}(C))` (:mod:`captum_sam.hif.damping`; the
            per-layer rule for K-FAC). ``damping_used`` reports the value(s) used,
            ``damping_auto`` whether they were chosen automatically and
            ``damping_rule`` the rule's inputs.
        variant: ``"fast"`` (default: symmetric, so Captum's symmetric embeddings
            hold), ``"full"`` (the paper's SAM-HIF), ``"exact"`` or ``"plain"``.
        curvature: ``"hessian"``, ``"ggn"`` (generalised Gauss-Newton, positive
            semi-definite), or its block-diagonal Kronecker-factored approximations
            ``"kfac"`` and ``"ekfac"`` (eigenvalue-corrected), fitted once per point
            (:math:`w^*+\epsilon^*` for ``fast``/``full``/``exact``, :math:`w^*` for
            ``plain`` and for :math:`J`) for ``nn.Linear`` and ``nn.Conv2d`` layers only:
            any other attributed parameter raises ``ValueError`` (attribute supported
            layers with ``layers``). ``fast``/``plain`` are then inverted exactly per
            layer; ``full``/``exact`` use GMRES preconditioned by the K-FAC inverse
            (``projection_dim=None``). See :mod:`captum_sam.hif.kfac`.
        solver: ``"auto"`` (``"dense"`` when ``projection_dim`` is set or ``P`` is
            small, else ``"cg"``/``"gmres"``), ``"dense"`` (Captum's decomposition),
            or an iterative solver of :data:`captum_sam.solvers.METHODS` (solves
            exactly, needs ``projection_dim=None``).
        solver_options: :class:`~captum_sam.solvers.SolverOptions` or a dict.
        rescale_hessian: Multiply the curvature of a ``hessian_dataset`` of ``m``
            examples by ``n/m`` (an estimate of the full-data curvature) instead of
            summing it as Captum does.
        perturbation_scope: ``"trainable"`` (default: :math:`\epsilon^*` from the mean
            gradient of every trainable parameter, applied to all of them, as in
            training, also when ``layers`` attributes fewer) or ``"attributed"`` (the
            attributed parameters alone, an approximation for a large frozen backbone).
        sketch_dim: If given, test and train intermediate quantities are projected to
            this many dimensions by a seeded random projection that preserves inner
            products in expectation (:class:`~captum_sam.core.projection.RandomProjection`).
        sketch: ``"gaussian"`` or ``"rademacher"``.
        sketch_seed: Seed of the sketch.
        factorize: Use layer factors where they apply: with ``curvature="ggn"`` and
            ``nn.Linear`` models, form GGN matrices from them (checked against
            ``ggn_vp`` first); for every model whose attributed parameters all sit in
            ``nn.Linear``, ``nn.Conv2d`` or eval-mode BatchNorm layers, form per-example
            gradients from layer inputs and output gradients instead of ``vmap``
            (checked against ``vmap`` on the first batch of each loss). ``False``:
            always ``vmap``.
        factors_dir: With ``"kfac"``/``"ekfac"``, a directory caching the fitted
            factors and eigendecompositions (one file and verified manifest per kind
            and point, :mod:`captum_sam.hif.kfac_store`): reused when they match the
            checkpoint, data and settings, refused with an error naming the file and
            field when stale or tampered. ``None``: no cache.
        training_horizon: With ``damping="auto"``, the training run's
            :math:`T = \sum_t \eta_t`
            (:func:`captum_sam.hif.damping.training_horizon` reads it from a record):
            the damping is then at least :math:`1/T`, the implicit damping of a run
            that stopped before a minimum (see :mod:`captum_sam.hif.damping`). ``None``
            (default): a model at a minimum.
        batchnorm: ``"eval"`` only (running statistics; see BatchNorm in the mathematics page):
            ``"batch"`` needs recorded batches, which only
            :meth:`SAMTracInCP.from_trajectory <captum_sam.SAMTracInCP.from_trajectory>`
            has, and raises ``ValueError`` here.
        batchnorm_tolerance: For a model with BatchNorm, warn when the mean loss at the
            checkpoint in eval mode and in train mode (batch statistics, first four
            batches of ``train_dataset``) differ by more than this fraction; ``None``
            skips the check.
        kfac_samples: With ``curvature="kfac"``/``"ekfac"``: ``None`` (default) fits the
            factors from the exact square roots of each example's loss Hessian in the
            model output (``C`` backward passes per example for ``C`` outputs, per pass
            over the data); ``k``: from ``k`` random-sign combinations of them
            (``k`` backward passes, seeded by ``seed``), an unbiased estimate of the
            same factors (kronfluence's sampled Fisher, without a likelihood).

    Where the gradients are taken: test gradients at :math:`w^*`; the curvature of
    ``fast``/``full``/``exact`` and their training gradients :math:`b_k` at
    :math:`w^* + \epsilon^*`, ``plain``'s at :math:`w^*`. With ``layers``, derivatives
    and curvature are with respect to the attributed parameters, the others held at
    their (perturbed) values; :math:`\epsilon^*` is still the training's, over every
    trainable parameter (``perturbation_scope``), and :math:`J` is its attributed block.

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
        rho: float | None = None,
        adaptive: bool | None = None,
        weight_decay: float = 0.0,
        damping: float | str | None = None,
        variant: str = "fast",
        curvature: str = "hessian",
        solver: str = "auto",
        solver_options: SolverOptions | dict[str, Any] | None = None,
        rescale_hessian: bool = False,
        perturbation_scope: str = "trainable",
        sketch_dim: int | None = None,
        sketch: str = "gaussian",
        sketch_seed: int = 0,
        factorize: bool = True,
        factors_dir: str | os.PathLike[str] | None = None,
        batchnorm: str = "eval",
        batchnorm_tolerance: float | None = 0.1,
        training_horizon: float | None = None,
        kfac_samples: int | None = None,
    ) -> None:
        arguments = dict(locals())
        sam = pick(arguments, SAM_ARGUMENTS)
        sam["sketch"] = (sketch_dim, sketch, sketch_seed)
        self._setup(model, checkpoint, pick(arguments, CAPTUM_ARGUMENTS), sam)
        self.solver = solver
        self.inverse = self._build_inverse(solver)
        if self.method != "dense":  # only the dense solver reuses the curvature "auto" formed
            self.operator.dense_curvature = None
        sides.check_sketch(self)

    # ------------------------------------------------------------------ the inverse

    def _build_inverse(self, solver: str) -> LowRankInverse | SolvedInverse:
        """Captum's low-rank decomposition, or a solver (see :mod:`captum_sam.hif.inverse`).

        ``solver="dense"`` decomposes :math:`A` when a rank (``projection_dim``) or a
        tolerance (``hessian_inverse_tol``) is set, Captum's semantics; with both
        ``None`` it solves exactly with LU factors instead.
        """
        op = self.operator
        kronecker = op.kronecker is not None
        if kronecker and solver == "lissa":
            raise ArgumentError(
                f"solver='lissa' samples minibatch curvature products, which "
                f"curvature={self.curvature!r} (fitted once) does not have: use solver='auto'"
            )
        if kronecker and solver == "auto" and op.symmetric:  # exact, in the eigenbasis
            self.method, self._dense = "kronecker", None
            return self._kronecker_inverse()
        decompose = self.projection_dim is not None or self.hessian_inverse_tol is not None
        chosen = ""
        if solver == "auto":
            small = op.dim <= self.solver_options.dense_max_dim and not kronecker
            solver = (
                "dense"
                if self.projection_dim is not None or small
                else ("cg" if op.symmetric else "gmres")
            )
            chosen = " (chosen by solver='auto')"
        if solver == "dense" and decompose and self.sketch is not None:  # before A is formed
            iterative = "cg" if op.symmetric else "gmres"
            raise ArgumentError(
                f"`sketch_dim` projects P-wide quantities, but solver='dense'{chosen} with "
                "projection_dim or hessian_inverse_tol set keeps a low-rank inverse whose "
                f"quantities are already small: pass solver={iterative!r} and "
                "projection_dim=None"
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
        if kronecker and not op.symmetric and solver in ("gmres", "bicgstab"):
            pre = self._kronecker_inverse().inverse.solve  # (K_e + r I)^{-1}
            like = op.mean_grad[op.names[0]]
            solved = kfac_solve.PreconditionedSolver(
                op.matvec, op.rmatvec, pre, op.dim, solver, self.solver_options, like.dtype,
                self.device,
            )  # fmt: skip
            return SolvedInverse(solved, F.check_finite)  # type: ignore[arg-type]
        inverse = InverseOperator(
            op.matvec, op.dim, method=solver, symmetric=op.symmetric,
            rmatvec=None if op.symmetric else op.rmatvec,
            sampled_matvec=op.sampled(transpose=False),
            sampled_rmatvec=None if op.symmetric else op.sampled(transpose=True),
            options=self.solver_options, dtype=op.mean_grad[op.names[0]].dtype,
            device=self.device, dense_builder=lambda: dense.known_matrix(op, keep_he=exact),
        )  # fmt: skip
        return SolvedInverse(inverse, F.check_finite)

    def _kronecker_inverse(self) -> LowRankInverse | SolvedInverse:
        r""":math:`(K + r I)^{-1}` at :math:`A`'s point (the preconditioner of full/exact).

        With ``projection_dim`` (symmetric variants), Captum's top eigen-directions of
        :math:`K + r I` above ``hessian_inverse_tol``; otherwise the inverse in the
        Kronecker eigenbasis, eigenvalues at or below ``hessian_inverse_tol`` dropped.
        """
        op = self.operator
        curvature = op.kronecker["params" if self.variant == "plain" else "perturbed"]
        shift = self.kronecker_shift
        if self.projection_dim is not None and op.symmetric:
            low = kfac_solve.kronecker_low_rank(
                curvature, shift, self.projection_dim, self.hessian_inverse_tol
            )
            return self._to_projection_device(low)
        tol = self.hessian_inverse_tol if op.symmetric else None
        exact = kfac_solve.KroneckerInverse(curvature, shift, tol)
        return SolvedInverse(exact, F.check_finite)  # type: ignore[arg-type]
