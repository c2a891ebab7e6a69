r"""The twin of Captum's ``ArnoldiInfluenceFunction``: a Krylov low-rank inverse of :math:`A`.

Captum's ``ArnoldiInfluenceFunction`` (Schioppa et al. 2022) runs ``arnoldi_dim``
steps of the Arnoldi iteration on the Hessian from a seeded random start, keeps the
top ``projection_dim`` eigenpairs of its restriction to the Krylov subspace (after
adding ``hessian_reg``, dropping eigenvalues at or below ``hessian_inverse_tol``) and
embeds every example as :math:`g^\top V \Lambda^{-1/2}`. :class:`SAMArnoldiInfluenceFunction`
does the same on SAM-HIF's symmetric matrix :math:`A` (``fast``: the curvature at
:math:`w^* + \epsilon^*`; ``plain``: at :math:`w^*`, Captum's), with the training side's
gradients at the variant's point. The start vector is drawn as Captum draws it
(``torch.manual_seed(seed)`` then one ``randn`` per attributed parameter, on the CPU).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from captum_sam.core.checkpoints import checkpoints_load_func
from captum_sam.core.data import progress
from captum_sam.core.errors import ArgumentError
from captum_sam.hif.base import CAPTUM_ARGUMENTS, SAM_ARGUMENTS, SAMInfluenceBase, pick
from captum_sam.hif.inverse import LowRankInverse, orient

__all__ = ["SAMArnoldiInfluenceFunction", "arnoldi_iteration", "distill"]


def arnoldi_iteration(
    matvec: Callable[[Tensor], Tensor], start: Tensor, steps: int, tol: float, show_progress: bool
) -> tuple[Tensor, Tensor]:
    """Arnoldi iteration (Trefethen & Bau, ch. 33) as Captum runs it.

    Args:
        matvec: ``(P, 1) -> (P, 1)`` products with the matrix.
        start: ``(P,)`` start vector.
        steps: Iterations at most (``arnoldi_dim``).
        tol: Stop when the next basis vector's norm falls below this.
        show_progress: Progress bar over iterations.

    Returns:
        ``(Q, H)``: the basis as columns ``(P, k)`` and the ``(k, k - 1)`` Hessenberg
        matrix, the same slices Captum's ``_parameter_arnoldi`` returns.
    """
    basis = [start / start.norm()]
    hess = start.new_zeros(steps + 1, steps)
    k = 0
    for k in progress(range(1, steps + 1), show_progress, "Running Arnoldi Iteration for step"):
        v = matvec(basis[k - 1].unsqueeze(1)).squeeze(1)
        for i in range(k):
            hess[i, k - 1] = basis[i] @ v
            v = v - hess[i, k - 1] * basis[i]
        hess[k, k - 1] = v.norm()
        if hess[k, k - 1] < tol:
            break
        basis.append(v / hess[k, k - 1])
    return torch.stack(basis[:k], dim=1), hess[:k, : k - 1]


def distill(basis: Tensor, hess: Tensor, k: int | None, tol: float | None) -> tuple[Tensor, Tensor]:
    """Top eigenpairs of the restriction, in the original coordinates (Captum's distill).

    Returns:
        ``(values (r,), vectors (P, r))``, ascending.

    Raises:
        ValueError: An empty basis, or no eigenvalue above ``tol`` (Captum's messages).
    """
    basis, hess = basis[:, :-1], hess[:-1]
    if basis.shape[1] == 0:
        raise ArgumentError(
            "Arnoldi basis is empty. Consider increasing the `arnoldi_tol` argument"
        )
    values, vectors = torch.linalg.eig(hess)
    values, vectors = values.real, vectors.real
    order = torch.argsort(values)
    values, vectors = values[order], vectors[:, order]
    keep = values > (0.0 if tol is None else tol)
    values, vectors = values[keep], vectors[:, keep]
    if k is not None:
        values, vectors = values[-k:], vectors[:, -k:]
    if len(values) == 0:
        raise ArgumentError(
            "Restriction of Hessian to Krylov subspace has no positive eigenvalues, so "
            "cannot take its square root."
        )
    return values, basis @ orient(vectors)


class SAMArnoldiInfluenceFunction(SAMInfluenceBase):
    r"""SAM-HIF with Captum's Arnoldi low-rank inverse (Captum's ``ArnoldiInfluenceFunction``).

    The first eighteen arguments are ``ArnoldiInfluenceFunction``'s, with its
    meanings and defaults (``batch_size`` excepted); the rest are keyword-only and SAM's
    own (see :class:`~captum_sam.SAMInfluenceFunction`).

    Args:
        model: The model (never modified).
        train_dataset: Training Dataset, or a DataLoader iterating it in order.
        checkpoint: The trained weights (a file or a record directory).
        checkpoints_load_func: ``load(model, path) -> learning_rate``.
        layers: Attributed module names.
        loss_fn: Training loss.
        batch_size: Batch size for Datasets.
        hessian_dataset: Data for the curvature (summed, as in Captum).
        test_loss_fn: Loss for test examples.
        sample_wise_grads_per_batch: Captum's switch for reducing losses.
        projection_dim: Eigenpairs kept (the embedding width).
        seed: Seed of the Arnoldi start vector.
        arnoldi_dim: Arnoldi iterations at most (one pass over the curvature data each).
        arnoldi_tol: Stop when the next basis vector's norm falls below this.
        hessian_reg: Added to the diagonal of :math:`A`.
        hessian_inverse_tol: Eigenvalues at or below this are dropped.
        projection_on_cpu: Keep the embedding matrix on the CPU.
        show_progress: Progress bars for the iteration.
        rho: SAM radius of training (0 with ``variant="plain"`` is Captum's). Default ``None``: the
            recorded run's or 0.05 (:func:`~captum_sam.trajectory.sam_settings`).
        adaptive: ASAM. Default ``None``: as for ``rho`` (else ``False``).
        weight_decay: :math:`\lambda`, enters as :math:`n\lambda`.
        damping: :math:`d`, enters as :math:`n d`; ``"auto"`` chooses it from the
            curvature (see :class:`~captum_sam.SAMInfluenceFunction`, ``damping_used``).
        variant: ``"fast"`` (default) or ``"plain"``: the Arnoldi iteration needs a
            symmetric :math:`A`.
        curvature: ``"hessian"`` or ``"ggn"`` (K-FAC's eigenpairs are exact: use
            :class:`~captum_sam.SAMInfluenceFunction` for ``"kfac"``/``"ekfac"``).
        rescale_hessian: Scale a ``hessian_dataset``'s curvature by ``n/m``.
        perturbation_scope: See :class:`~captum_sam.SAMInfluenceFunction`.
        batchnorm: See :class:`~captum_sam.SAMInfluenceFunction`.
        batchnorm_tolerance: See :class:`~captum_sam.SAMInfluenceFunction`.

    Where the gradients are taken: as :class:`~captum_sam.SAMInfluenceFunction` (with
    ``layers``, at the full perturbed point, derivatives with respect to the attributed
    parameters).
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
        projection_dim: int = 50,
        seed: int = 0,
        arnoldi_dim: int = 200,
        arnoldi_tol: float = 1e-1,
        hessian_reg: float = 1e-3,
        hessian_inverse_tol: float = 1e-4,
        projection_on_cpu: bool = True,
        show_progress: bool = False,
        *,
        rho: float | None = None,
        adaptive: bool | None = None,
        weight_decay: float = 0.0,
        damping: float | str = 0.0,
        variant: str = "fast",
        curvature: str = "hessian",
        rescale_hessian: bool = False,
        perturbation_scope: str = "trainable",
        batchnorm: str = "eval",
        batchnorm_tolerance: float | None = 0.1,
    ) -> None:
        if variant not in ("fast", "plain"):
            raise ValueError(
                f"`variant` must be 'fast' or 'plain' for the Arnoldi iteration (a "
                f"symmetric A), got {variant!r}; use SAMInfluenceFunction for {variant!r}"
            )
        if curvature in ("kfac", "ekfac"):
            raise ArgumentError(
                f"curvature={curvature!r} gives A's eigenpairs exactly (in each layer's "
                "Kronecker eigenbasis), no Arnoldi iteration needed: use "
                f"SAMInfluenceFunction(curvature={curvature!r}, projection_dim=...)"
            )
        if isinstance(arnoldi_dim, bool) or not isinstance(arnoldi_dim, int) or arnoldi_dim < 1:
            raise ValueError(f"`arnoldi_dim` must be a positive int, got {arnoldi_dim!r}")
        arguments = dict(locals())
        self._setup(
            model, checkpoint, pick(arguments, CAPTUM_ARGUMENTS), pick(arguments, SAM_ARGUMENTS)
        )
        self.arnoldi_dim, self.arnoldi_tol = arnoldi_dim, float(arnoldi_tol)
        self.solver = self.method = "arnoldi"
        self.sketch = None
        self.operator.dense_curvature = None  # formed by damping="auto"; unused here
        self.inverse = self._build_inverse()
        self.R = self.inverse.left

    def _build_inverse(self) -> LowRankInverse:
        op = self.operator
        like = op.mean_grad[self.names[0]]
        gen = torch.Generator().manual_seed(self.seed)
        start = torch.cat(
            [
                torch.randn(op.params[n].shape, generator=gen, dtype=like.dtype).reshape(-1)
                for n in self.names
            ]
        ).to(like.device)
        bar = None
        if self.show_progress:
            from tqdm.auto import tqdm

            bar = tqdm(desc="processing `hessian_dataset` batch (curvature columns)")
        op.columns_bar = bar
        try:
            basis, hess = arnoldi_iteration(
                op.matvec, start, self.arnoldi_dim, self.arnoldi_tol, self.show_progress
            )
        finally:
            op.columns_bar = None
            if bar is not None:
                bar.close()
        values, vectors = distill(basis, hess, self.projection_dim, self.hessian_inverse_tol)
        scaled = vectors * values.rsqrt().unsqueeze(0)
        return self._to_projection_device(LowRankInverse(scaled, scaled, values))

    def _fingerprint(self) -> dict[str, Any]:
        out = super()._fingerprint()
        out["arnoldi"] = [self.arnoldi_dim, self.arnoldi_tol, self.seed]
        return out
