r"""The Captum-facing methods both SAM-HIF twins share (``InfluenceFunctionBase``'s contract).

:class:`SAMInfluenceBase` validates the common arguments (:meth:`_setup`), exposes
the operator's quantities, and implements ``influence``, ``self_influence``, the
intermediate quantities, caching and editing on top of the operator
(:class:`~captum_sam.hif.operator.SAMOperator`) and the inverse a subclass builds
(:class:`~captum_sam.hif.inverse.LowRankInverse` or
:class:`~captum_sam.hif.inverse.SolvedInverse`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from captum_sam import core as F
from captum_sam._captum import IntermediateQuantitiesInfluenceFunction, KMostInfluentialResults
from captum_sam.core.checkpoints import edited_copy
from captum_sam.core.data import (
    check_indices,
    empty_batch,
    empty_result,
    fetch_batch,
    local_batches,
    progress,
    stream_topk,
)
from captum_sam.core.distributed import all_reduce_sum, contiguous, gather_ordered
from captum_sam.core.errors import check_number, require_inputs
from captum_sam.core.store import (
    data_digest,
    file_digest,
    function_digest,
    model_digest,
    open_quantities,
    projection_setting,
    save_quantities,
)
from captum_sam.hif import dense, kfac_solve, sides, site_groups
from captum_sam.hif.damping import (
    AUTO,
    AutoDamping,
    auto_damping,
    check_damping,
    check_horizon,
)
from captum_sam.hif.inverse import LowRankInverse, SolvedInverse
from captum_sam.hif.operator import KRONECKER
from captum_sam.hif.setup import prepare, resolve_checkpoint
from captum_sam.hif.setup import solver_options as make_solver_options
from captum_sam.trajectory import sam_settings

__all__ = ["SAMInfluenceBase", "CAPTUM_ARGUMENTS", "SAM_ARGUMENTS", "pick"]

CAPTUM_ARGUMENTS = (
    "train_dataset", "checkpoints_load_func", "layers", "loss_fn", "batch_size",
    "hessian_dataset", "test_loss_fn", "sample_wise_grads_per_batch", "projection_dim",
    "seed", "hessian_reg", "hessian_inverse_tol", "projection_on_cpu", "show_progress",
)  # fmt: skip
"""Captum's ``InfluenceFunctionBase`` arguments shared by both twins (besides the model
and the checkpoint)."""

SAM_ARGUMENTS = (
    "rho", "adaptive", "weight_decay", "damping", "variant", "curvature", "solver",
    "solver_options", "rescale_hessian", "perturbation_scope", "factorize", "factors_dir",
    "batchnorm", "batchnorm_tolerance", "training_horizon", "kfac_samples",
)  # fmt: skip
"""SAM's own arguments (a twin passes those it has)."""


def pick(arguments: dict[str, Any], names: tuple[str, ...]) -> dict[str, Any]:
    """The entries of ``arguments`` (a constructor's ``locals()``) named in ``names``."""
    return {n: arguments[n] for n in names if n in arguments}


class SAMInfluenceBase(IntermediateQuantitiesInfluenceFunction):
    """Shared machinery of :class:`~captum_sam.SAMInfluenceFunction` and its Arnoldi twin."""

    inverse: LowRankInverse | SolvedInverse

    def _setup(
        self, model: nn.Module, checkpoint: Any, captum: dict[str, Any], sam: dict[str, Any]
    ) -> None:
        """Set Captum's and SAM's attributes and build the operator (not the inverse).

        ``captum``: Captum's arguments by name; ``sam``: ours.
        """
        sam["rho"], sam["adaptive"] = sam_settings(sam["rho"], sam["adaptive"], checkpoint)
        self.model = model
        self.checkpoint = resolve_checkpoint(checkpoint)
        self.checkpoints_load_func = captum["checkpoints_load_func"]
        self.loss_fn = captum["loss_fn"]
        test_loss_fn = captum["test_loss_fn"]
        self.test_loss_fn = self.loss_fn if test_loss_fn is None else test_loss_fn
        self.batch_size = captum["batch_size"]
        self.projection_dim, self.seed = _rank(captum["projection_dim"]), _seed(captum["seed"])
        self.hessian_reg = check_number("hessian_reg", captum["hessian_reg"])
        tol = captum["hessian_inverse_tol"]
        self.hessian_inverse_tol = None if tol is None else check_number("hessian_inverse_tol", tol)
        self.projection_on_cpu = captum["projection_on_cpu"]
        self.show_progress = captum["show_progress"]
        self.variant, self.curvature = sam["variant"], sam["curvature"]
        self.kfac_samples = check_kfac_samples(sam.get("kfac_samples"), sam["curvature"])
        if sam.get("factors_dir") is not None and sam["curvature"] not in KRONECKER:
            raise ValueError(
                "`factors_dir` caches K-FAC factors: it applies to curvature 'kfac' or "
                f"'ekfac', got curvature={sam['curvature']!r}"
            )
        self.adaptive = sam["adaptive"]
        self.solver_options = make_solver_options(sam.get("solver_options"))
        # None: 0 for hessian/ggn, the per-layer heuristic for K-FAC; "auto": the rule of
        # captum_sam.hif.damping (the per-layer heuristic for K-FAC)
        damping = check_damping(sam["damping"])
        auto = damping == AUTO
        horizon = check_horizon(sam.get("training_horizon"))
        if horizon is not None and (not auto or sam["curvature"] in KRONECKER):
            raise ValueError(
                "`training_horizon` is used by damping='auto' with curvature 'hessian' or "
                f"'ggn' only, got damping={sam['damping']!r}, curvature={sam['curvature']!r}"
            )
        self.operator = prepare(
            self, captum["train_dataset"], captum["layers"], captum["hessian_dataset"],
            captum["sample_wise_grads_per_batch"], sam["variant"], sam["curvature"],
            sam.get("solver", "auto"), sam["rho"], sam["adaptive"],
            {"weight_decay": sam["weight_decay"], "damping": damping if _fixed(damping) else 0.0,
             "hessian_reg": captum["hessian_reg"]},
            sam["rescale_hessian"], sam.get("sketch", (None, "gaussian", 0)),
            sam.get("factorize", True), self.solver_options,
            sam.get("perturbation_scope", "trainable"),
            (sam.get("batchnorm", "eval"), sam.get("batchnorm_tolerance", 0.1)),
        )  # fmt: skip
        self.rho = self.operator.rho
        self.weight_decay = float(sam["weight_decay"])
        kronecker = self.curvature in KRONECKER
        self.damping_auto = auto
        self.damping_rule: AutoDamping | None = None
        if auto and not kronecker:
            self.damping_rule = auto_damping(
                self.operator, self.solver_options.dense_max_dim, self.solver_options.chunk_size,
                self.solver_options.seed, horizon,
            )  # fmt: skip
            self.operator.regulariser += self.n_train * self.damping_rule.damping
        if auto:
            self.damping = AUTO
        else:
            self.damping = None if damping is None and kronecker else float(damping or 0.0)
        self.damping_used: float | dict[str, float] = (
            self.damping_rule.damping if self.damping_rule else self.damping  # type: ignore[assignment]
        )
        if kronecker:
            heuristic = damping is None or auto
            kfac_solve.attach(self, None if heuristic else self.damping, sam.get("factors_dir"))
        self._cache = None
        self._dense = None

    def _form(self, keep_he: bool) -> Tensor:
        bar = None
        if self.show_progress:
            from tqdm.auto import tqdm

            bar = tqdm(desc=f"Using {self.get_name()} to form A (curvature columns)")
        self.operator.columns_bar = bar
        try:
            return dense.dense_matrix(self.operator, self.solver_options.chunk_size, keep_he)
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
        require_inputs(inputs)
        if empty_batch(inputs):  # no test example: an empty result
            dtype = self.operator.mean_grad[self.names[0]].dtype
            return empty_result(self.n_train, k, aggregate, dtype)
        if k is None:
            return self._influence(inputs, show_progress, aggregate)
        return self._get_k_most_influential(inputs, k, proponents, show_progress, aggregate)

    def _blocks(self, inputs: Any, desc: str | None, aggregate: bool) -> Iterable[Tensor]:
        """``(n_test, batch)`` score blocks over the training batches, in order.

        Test rows above :data:`~captum_sam.hif.sides.TEST_BUDGET_BYTES` are taken in
        groups, one pass over the training data per group (one block of every score):
        groups of layers with a direct Kronecker inverse
        (:mod:`~captum_sam.hif.site_groups`), of rows otherwise.
        """
        budget = sides.TEST_BUDGET_BYTES
        plan = None
        if not aggregate and self._cache is None:
            plan = site_groups.plan(self, inputs, budget)
        if plan is not None:
            yield site_groups.scores(self, inputs, plan, lambda: self._train_batches(desc))
            return
        groups = [
            self._train_blocks(q, desc)
            for q in sides.test_row_groups(self, inputs, aggregate, budget)
        ]
        if len(groups) == 1:
            yield from groups[0]
        else:
            yield torch.cat([torch.cat(blocks, 1) for blocks in groups])

    def _train_batches(self, desc: str | None) -> Iterable[tuple[int, tuple[Any, ...]]]:
        """This rank's numbered training batches, with a progress bar when ``desc``."""
        return progress(
            local_batches(self.train_dataloader, self.device),
            desc is not None,
            desc or "",
            total=_length(self.train_dataloader),
        )

    def _train_blocks(self, q: Tensor, desc: str | None) -> list[Tensor]:
        """Blocks of the test rows ``q`` ``(m, width)`` over the training data."""
        if self._cache is not None:
            return self._cache.scores(q)
        blocks = list(sides.score_blocks(self, q, self._train_batches(desc)))
        return gather_ordered(blocks)

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
        if empty_batch(inputs_dataset):
            return torch.zeros(0, dtype=self.operator.mean_grad[self.names[0]].dtype)
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
            "model": model_digest(self.model),
            "checkpoint": file_digest(self.checkpoint),
            "right_hand_side": rhs,
            "rho": self.rho,
            "adaptive": self.adaptive,
            "perturbation_scope": self.perturbation_scope,
            "parameters": self.names,
            "inverse": sides.inverse_setting(self) if low else "solved",
            "projection": projection_setting(self.sketch),
            "loss": [*function_digest(self.loss_fn), self.reduction_type],
            "data": data_digest(self.train_dataloader),
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
        r""":math:`w_{-S} - w^* \approx A^{-1} \sum_{k \in S} (r_k + \lambda w^*)` (one solve).

        The prediction of training on the kept examples only (:doc:`/math`, "Model
        editing"): besides each removed example's right-hand side :math:`r_k`, its
        share :math:`\lambda w^*` of the weight decay, which the kept examples' mean no
        longer balances (zero when ``weight_decay=0``).

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
        if self.weight_decay:  # the weight decay the removed examples' gradients balanced
            rhs[: op.dim] += len(idx) * self.weight_decay * F.flatten(op.params, self.names)
        if self.variant == "exact":  # b + H_e (sum of d eps / d delta_k)
            b, d = rhs[: op.dim], rhs[op.dim :]
            rhs = b + op.he_product(d.unsqueeze(1)).squeeze(1)
        if isinstance(self.inverse, LowRankInverse):
            delta = self.inverse.solve(rhs.unsqueeze(1).to(self.inverse.left)).to(rhs)
        else:
            with sides.solve_bar(self, "the parameter change"):
                delta = self.inverse.solve(rhs.unsqueeze(1))
        delta = delta.squeeze(1)
        return delta if flat else F.unflatten(delta, {n: op.params[n] for n in self.names})

    def edited_model(self, indices: Sequence[int] | Tensor) -> nn.Module:
        r"""A new model at :math:`w^*` plus :meth:`parameter_change`; the user's is untouched."""
        delta = self.parameter_change(indices)
        return edited_copy(self.model, self.checkpoints_load_func, self.checkpoint, delta)  # type: ignore[arg-type]


def _fixed(damping: float | str | None) -> bool:
    return damping is not None and damping != AUTO


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


def _seed(seed: Any) -> int:
    """``seed`` as ``int()`` makes it of a number (as Captum's ``torch.manual_seed``).

    Anything else is a ``TypeError``.
    """
    import numbers

    if isinstance(seed, bool) or not isinstance(seed, numbers.Real):
        if getattr(seed, "ndim", None) == 0:
            return _seed(seed.item())  # a 0-d tensor
        raise TypeError(f"`seed` must be an int, got {seed!r}")
    return int(seed)


def check_kfac_samples(samples: Any, curvature: Any) -> int | None:
    """Validate ``kfac_samples``: ``None`` or an int >= 1, with a Kronecker curvature only."""
    if samples is None:
        return None
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(f"`kfac_samples` must be None or an int >= 1, got {samples!r}")
    if curvature not in KRONECKER:
        raise ValueError(
            f"`kfac_samples` applies to curvature 'kfac' or 'ekfac', got curvature={curvature!r}"
        )
    return samples
