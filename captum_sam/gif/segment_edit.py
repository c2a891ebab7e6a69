r"""Segment-wise edits of checkpoint-form SAM-GIF (SOURCE, Bae et al. 2024, at SAM's points).

First-order GIF adds every checkpoint's contribution :math:`c_l G_S` up, as if no later
training step reacted to it. Between two checkpoints training takes :math:`K` steps of
size :math:`\eta`; with the curvature held at checkpoint :math:`l`'s perturbed weights
:math:`w_l + \epsilon_l`, the linearised steps
:math:`\delta_{k+1} = (I - \eta \tilde H_l)\,\delta_k + f_l` (with
:math:`\tilde H_l = H_l + \lambda I` the mean training-loss curvature plus weight decay)
sum in closed form over the segment:

.. math::

    \delta_{l} = a(\tilde H_l)\, \delta_{l-1} + b(\tilde H_l)\, F_l,\quad
    a(x) = (1 - \tau_l x / K)^K,\quad b(x) = \frac{1 - a(x)}{\tau_l x},

where :math:`\tau_l = \eta K = c_l n` is the segment's training time (the checkpoint
weight :math:`c_l = \eta/|B|` of a segment that is one pass over the :math:`n` training
examples) and :math:`F_l` the segment's whole forcing: :math:`c_l G_S` with
:math:`G_S = \sum_{k \in S} \nabla l_k(w_l + \epsilon_l)` for ``removal="zero_weight"``,
and :math:`c_l (G_S - |S|\,\bar g_l)` for ``removal="renormalise"`` (the kept
examples' mean: each batch loses :math:`S`'s share and its mean moves by it, with
:math:`\bar g_l` the mean training gradient). ``steps_per_checkpoint=None`` takes
:math:`K \to \infty` (gradient flow): :math:`a(x) = e^{-\tau_l x}`. With zero
curvature :math:`a = b = 1` and the sum is first-order GIF again.

:math:`a(\tilde H)v` and :math:`b(\tilde H)v` are evaluated with Lanczos on curvature
products over the training set (no ``P x P`` matrix): :math:`f(\tilde H) v \approx
\|v\| Q f(T) e_1`. The SAM step's Jacobian also carries :math:`H\,d\epsilon/dw`; like
SAM-HIF(Fast) this form drops it (the curvature is taken at the perturbed weights).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from captum_sam import core as F
from captum_sam.core.data import local_batches, progress
from captum_sam.core.distributed import all_reduce_sum
from captum_sam.core.errors import check_number, user_stacklevel
from captum_sam.gif.points import WeightPoints
from captum_sam.gif.terms import Term, check_finite_terms

__all__ = ["SegmentEdit", "SEGMENT_CURVATURES", "segment_functions", "krylov_functions"]

SEGMENT_CURVATURES = ("ggn", "hessian")
# relative a-posteriori error of a Lanczos evaluation above which a warning is given
KRYLOV_TOLERANCE = 1e-3
# ... and below which the Lanczos iteration stops early
STOP_TOLERANCE = 1e-7


def segment_functions(
    tau: float, steps: int | None
) -> tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]]:
    r"""``(a, b)`` of one segment as functions of the curvature's eigenvalues.

    :math:`a(x) = (1 - \tau x/K)^K` (:math:`e^{-\tau x}` for ``steps=None``) carries
    an earlier change through the segment; :math:`b(x) = (1 - a(x))/(\tau x)` (1 at
    :math:`x = 0`) spreads the segment's forcing over its steps.
    """

    def a(x: Tensor) -> Tensor:
        if steps is None:
            return torch.exp(-tau * x)
        return (1 - tau * x / steps) ** steps

    def b(x: Tensor) -> Tensor:
        y = tau * x
        if steps is None:
            out = -torch.expm1(-y) / y
        else:
            out = (1 - a(x)) / y
        # small |tau x|: the first terms of the series, 1 - y/2 (K -> inf) or
        # 1 - (K-1) y / (2K)
        half = 0.5 if steps is None else (steps - 1) / (2 * steps)
        return torch.where(y.abs() < 1e-6, 1 - half * y, out)

    return a, b


def krylov_functions(
    matvec: Callable[[Tensor], Tensor],
    vectors: Tensor,
    fns: Sequence[Callable[[Tensor], Tensor]],
    max_steps: int,
    tol: float = STOP_TOLERANCE,
    check_every: int = 5,
) -> tuple[Tensor, Tensor]:
    r""":math:`f_j(C) v_j` for every column :math:`v_j` of ``vectors`` ``(P, m)``, by Lanczos.

    ``C`` is symmetric, given by ``matvec`` (``(P, m) -> (P, m)``); each column runs its
    own Lanczos recurrence (full reorthogonalisation), all in lockstep so that one
    product serves every column. The result of column :math:`j` is
    :math:`\|v_j\| Q_j f_j(T_j) e_1`; its a-posteriori relative error estimate is
    :math:`\beta_k |e_k^\top f_j(T_j) e_1| / \|f_j(T_j) e_1\|` (0 once its Krylov space
    is invariant). Iteration stops when every estimate is below ``tol`` (checked every
    ``check_every`` steps) or after ``max_steps``.

    Returns:
        ``(results (P, m), errors (m,))``.
    """
    dim, m = vectors.shape
    norms = vectors.norm(dim=0)
    live = norms > 0
    q = torch.where(live, vectors / torch.where(live, norms, 1.0), 0.0)
    basis, alphas, betas = [q], [], []
    lengths = torch.zeros(m, dtype=torch.long)
    last = torch.zeros(m, dtype=vectors.dtype)
    for step in range(min(max_steps, dim)):
        w = matvec(q)
        alphas.append((q * w).sum(0) * live)
        lengths += live.long()
        stacked = torch.stack(basis)  # (k, P, m)
        for _ in range(2):  # twice is enough (Giraud et al. 2005)
            w = w - torch.einsum("kpm,km->pm", stacked, torch.einsum("kpm,pm->km", stacked, w))
        beta = w.norm(dim=0) * live
        invariant = beta <= 1e-10 * torch.clamp(alphas[-1].abs(), min=1.0)
        last = torch.where(live, beta, last) * ~(live & invariant)
        live = live & ~invariant
        if not bool(live.any()):
            break
        final = step + 1 == min(max_steps, dim)
        if final or (step + 1) % check_every == 0:
            _, errors = _evaluate(basis, alphas, betas, lengths, last, norms, fns)
            if final or bool((errors < tol).all()):
                break
        betas.append(beta)
        q = torch.where(live, w / torch.where(live, beta, 1.0), 0.0)
        basis.append(q)
    return _evaluate(basis, alphas, betas, lengths, last, norms, fns)


def _evaluate(
    basis: list[Tensor],
    alphas: list[Tensor],
    betas: list[Tensor],
    lengths: Tensor,
    last: Tensor,
    norms: Tensor,
    fns: Sequence[Callable[[Tensor], Tensor]],
) -> tuple[Tensor, Tensor]:
    """Results and error estimates of :func:`krylov_functions` from its recurrences."""
    out = torch.zeros_like(basis[0])
    errors = torch.zeros(len(fns), dtype=torch.float64)
    for j, fn in enumerate(fns):
        k = int(lengths[j])
        if k == 0 or float(norms[j]) == 0.0:
            continue
        tri = torch.diag(torch.stack([a[j] for a in alphas[:k]]))
        if k > 1:
            off = torch.stack([b[j] for b in betas[: k - 1]])
            tri = tri + torch.diag(off, 1) + torch.diag(off, -1)
        theta, vecs = torch.linalg.eigh(tri)
        coeff = vecs @ (fn(theta) * vecs[0])  # f(T) e_1
        size = float(coeff.norm())
        errors[j] = float(last[j]) * float(coeff[-1].abs()) / size if size > 0 else 0.0
        q = torch.stack([b[:, j] for b in basis[:k]], dim=1)
        out[:, j] = norms[j] * (q @ coeff)
    return out, errors


@dataclass
class SegmentEdit:
    """The segment-wise parameter change of a checkpoint-form estimator.

    Args:
        points: Checkpoint weights and dataset perturbations.
        terms: One term per checkpoint, in training order.
        train_data: The training batches (streamed; this rank's share).
        n_train: :math:`n`.
        device: Where the model lives.
    """

    points: WeightPoints
    terms: list[Term]
    train_data: Any
    n_train: int
    device: torch.device

    def change(
        self,
        removed: Sequence[int],
        removal: str,
        curvature: str,
        steps_per_checkpoint: int | None,
        weight_decay: float,
        krylov_steps: int,
        show_progress: bool = False,
    ) -> Tensor:
        """Flat ``(P,)`` estimate of :math:`w_{-S} - w_T` over the attributed parameters."""
        if self.points.perturbation != "dataset":
            raise ValueError(
                "method='segment' needs perturbation='dataset' (one perturbation per "
                f"checkpoint), got perturbation={self.points.perturbation!r}"
            )
        delta: Tensor | None = None
        worst = 0.0
        for term in progress(self.terms, show_progress, "Segment edit, checkpoint"):
            point, floss = self._point(term)
            forcing = self._forcing(point, floss, removed, removal, term)
            matvec = self._curvature(point, floss, curvature, weight_decay)
            tau = term.coefficient * self.n_train
            a, b = segment_functions(tau, steps_per_checkpoint)
            if delta is None:
                out, err = krylov_functions(matvec, forcing.unsqueeze(1), [b], krylov_steps)
            else:
                out, err = krylov_functions(
                    matvec, torch.stack([forcing, delta], dim=1), [b, a], krylov_steps
                )
            worst = max(worst, float(err.max()))
            delta = check_finite_terms(out.sum(1), "the segment parameter change", [term])
        if worst > KRYLOV_TOLERANCE:
            warnings.warn(
                f"segment edit: the Lanczos evaluation did not converge in krylov_steps="
                f"{krylov_steps} (estimated relative error {worst:.2e}); raise `krylov_steps`",
                RuntimeWarning,
                stacklevel=user_stacklevel(),
            )
        assert delta is not None
        return delta

    # ------------------------------------------------------------------ pieces

    def _point(self, term: Term) -> tuple[F.Params, F.FunctionalLoss]:
        r"""The perturbed weights :math:`w_l + \epsilon_l` and the loss bound there."""
        eps = self.points.eps([term])
        moved, frozen = self.points.moved([term], eps)  # type: ignore[arg-type]
        point = {n: v[0] for n, v in moved.items()}
        return point, self.points.loss.bind({n: v[0] for n, v in frozen.items()})

    def _batches(self) -> Iterable[Any]:
        return (b for _, b in local_batches(self.train_data, self.device))

    def _flat(self, tree: F.Params) -> Tensor:
        return F.flatten(tree, self.points.names)

    def _forcing(
        self,
        point: F.Params,
        floss: F.FunctionalLoss,
        removed: Sequence[int],
        removal: str,
        term: Term,
    ) -> Tensor:
        """:math:`F_l`: the segment's total change of the steps (flat)."""
        members = sorted(removed)
        total = torch.zeros_like(self._flat(point))
        for start in range(0, len(members), 256):
            batch = self.points.fetch(members[start : start + 256])
            total += self._flat(F.grad_sum(floss, point, [batch], "train_dataset")[0])
        if removal == "renormalise":
            mean_sum, count = F.grad_sum(floss, point, self._batches(), "train_dataset")
            mean_sum = all_reduce_sum(self._flat(mean_sum))
            count = int(all_reduce_sum(torch.tensor([float(count)], dtype=torch.float64))[0])
            total -= len(members) * mean_sum / count
        return check_finite_terms(term.coefficient * total, "training gradients", [term])

    def _curvature(
        self, point: F.Params, floss: F.FunctionalLoss, curvature: str, weight_decay: float
    ) -> Callable[[Tensor], Tensor]:
        """``(P, m) -> (P, m)``: the mean training-loss curvature plus weight decay."""
        product = F.hvp if curvature == "hessian" else F.ggn_vp
        names, n = self.points.names, self.n_train

        def matvec(columns: Tensor) -> Tensor:
            tree = F.unflatten(columns.T, point, batch_dims=1)
            out = product(floss, point, self._batches(), tree, batched=True, allow_empty=True)
            summed = all_reduce_sum(F.flatten(out, names, batch_dims=1).T)
            return summed / n + weight_decay * columns

        return matvec


def check_segment_options(
    curvature: Any, steps_per_checkpoint: Any, weight_decay: Any, krylov_steps: Any
) -> None:
    """Validate the options of ``method="segment"``."""
    if curvature not in SEGMENT_CURVATURES:
        raise ValueError(f"`curvature` must be one of {SEGMENT_CURVATURES}, got {curvature!r}")
    if steps_per_checkpoint is not None and (
        isinstance(steps_per_checkpoint, bool)
        or not isinstance(steps_per_checkpoint, int)
        or steps_per_checkpoint < 1
    ):
        raise ValueError(
            f"`steps_per_checkpoint` must be a positive int or None, got {steps_per_checkpoint!r}"
        )
    check_number("weight_decay", weight_decay)
    if isinstance(krylov_steps, bool) or not isinstance(krylov_steps, int) or krylov_steps < 1:
        raise ValueError(f"`krylov_steps` must be a positive int, got {krylov_steps!r}")
