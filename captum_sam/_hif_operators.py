r"""SAM-HIF's linear operators: curvature products, :math:`J`, :math:`A` and its solves.

Vectors are flat ``(P, m)`` columns in the estimator's ``names`` order. Every
product of :math:`A` goes through ``torch.func`` (:func:`captum_sam.functional.hvp`,
:func:`~captum_sam.functional.ggn_vp`), except when the dense solver forms
:math:`A` for a model whose attributed parameters are all ``nn.Linear`` weights and
biases with ``curvature="ggn"``: then each generalised Gauss-Newton matrix comes
from layer inputs and output Jacobians (:func:`captum_sam.factored_ggn.linear_ggn`),
one matrix product over the data per pair of layers instead of :math:`P`
curvature-vector products, after a check against ``ggn_vp`` on a few examples.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.func import vmap
from torch.utils.data import DataLoader

from captum_sam import factored_ggn
from captum_sam import functional as F
from captum_sam.distributed import all_reduce_sum
from captum_sam.solvers import dense_matrix
from captum_sam.trajectory import fetch_batch


class HIFOperatorsMixin:
    r"""Products with :math:`A`, :math:`A^\top` and the curvature, and solves."""

    def _tree(self, columns: Tensor) -> F.Params:
        return F.unflatten(columns.T, {n: self.params[n] for n in self.names}, batch_dims=1)

    def _flat(self, tree: F.Params) -> Tensor:
        return F.flatten(tree, self.names, batch_dims=1).T

    def _curvature(
        self, point: F.Params, columns: Tensor, batches: Iterable[Any], scale: float
    ) -> Tensor:
        """Curvature of the summed loss at ``point`` times ``columns`` (``(P, m)``)."""
        if self._columns is not None:
            self._columns.update(columns.shape[1])
        vectors = self._tree(columns)
        product = F.hvp if self.curvature == "hessian" else F.ggn_vp
        out = scale * self._flat(
            product(self._loss, point, batches, vectors, batched=True, allow_empty=self._reduce())
        )
        return all_reduce_sum(out) if self._reduce() else out

    def _jvp_eps(self, columns: Tensor, batches: Iterable[Any], scale: float) -> Tensor:
        r""":math:`J v = d\epsilon/dw\, v` for every column."""
        hess_l = self._curvature(self.params, columns, batches, scale) / self.n_train
        return self._jvp_eps_given(columns, hess_l)

    def _jvp_eps_given(self, columns: Tensor | None, hess_l: Tensor) -> Tensor:
        r""":math:`J v` from ``v`` and :math:`\nabla^2 L(w^*) v` (both ``(P, m)``).

        The derivative of :math:`\epsilon(w; g) = \rho\, a \odot z / (\lVert z \rVert
        + 10^{-12})`, :math:`z = a \odot g` (:math:`a = |w|` for ASAM, 1 for SAM)
        along :math:`(\delta w, \delta g)` = (``columns``, ``hess_l``), in closed form:
        :math:`\delta a = \mathrm{sign}(w) \odot \delta w`,
        :math:`\delta z = \delta a \odot g + a \odot \delta g` and
        :math:`\delta\epsilon = \rho [(\delta a \odot z + a \odot \delta z) / N
        - a \odot z\, (z \cdot \delta z) / (\lVert z \rVert N^2)]` with
        :math:`N = \lVert z \rVert + 10^{-12}`: elementwise work and one reduction per
        column, the same numbers as ``jvp`` of
        :func:`~captum_sam.functional.sam_perturbation` (tested against it).
        ``columns=None`` means :math:`\delta w = 0`.
        """
        w, g = self._flat_point
        a = w.abs() if self.adaptive else torch.ones_like(w)
        z = a * g
        norm = torch.linalg.vector_norm(z)
        denom = norm + 1e-12
        dz = a * hess_l
        moved = a * dz
        if self.adaptive and columns is not None:
            da = torch.sign(w) * columns
            dz = dz + da * g
            moved = a * dz + da * z
        dnorm = (z.T @ dz) / norm if norm > 0 else torch.zeros_like(dz[:1])
        return self.rho * (moved / denom - (a * z) * (dnorm / denom**2))

    def _vjp_eps(self, columns: Tensor, batches: list[Any], scale: float) -> Tensor:
        """:math:`J^T u` for every column."""

        def one(u: F.Params) -> tuple[F.Params, F.Params]:
            return F.perturbation_vjp(self.params, self.mean_grad, u, self.rho, self.adaptive)

        dw, dg = vmap(one)(self._tree(columns))
        hess_dg = self._curvature(self.params, self._flat(dg), batches, scale) / self.n_train
        return self._flat(dw) + hess_dg

    def _regulariser(self) -> float:
        return self.n_train * (self.weight_decay + self.damping)

    def _apply(
        self, columns: Tensor, batches: Callable[[], Iterable[Any]], scale: float, transpose: bool
    ) -> Tensor:
        reg = self._regulariser() * columns
        if self.variant == "plain":
            return self._curvature(self.params, columns, batches(), scale) + reg
        if self.variant == "fast":
            return self._curvature(self.perturbed, columns, batches(), scale) + reg
        if not transpose:  # H_e (I + J) v
            moved = columns + self._jvp_eps(columns, batches(), scale)
            return self._curvature(self.perturbed, moved, batches(), scale) + reg
        he_u = self._curvature(self.perturbed, columns, batches(), scale)  # (I + J^T) H_e u
        return he_u + self._vjp_eps(he_u, batches(), scale) + reg

    def _matvec(self, columns: Tensor) -> Tensor:
        with F.eval_mode(self.model):
            return self._apply(columns, self._hessian_batches, self.hessian_scale, False)

    def _rmatvec(self, columns: Tensor) -> Tensor:
        with F.eval_mode(self.model):
            return self._apply(columns, self._hessian_batches, self.hessian_scale, True)

    def _sampled(self, transpose: bool) -> Callable[[Tensor, int], Tensor]:
        """Minibatch estimate of ``A`` (or ``A^T``) products for LiSSA, seeded by step."""
        data = self.hessian_dataloader
        dataset = data.dataset if isinstance(data, DataLoader) else None
        size = self.batch_size or 64

        def sampled(columns: Tensor, step: int) -> Tensor:
            if dataset is None:
                raise ValueError("LiSSA needs `hessian_dataset` to be a Dataset to sample from")
            m = len(dataset)  # type: ignore[arg-type]
            g = torch.Generator().manual_seed(self.solver_options.seed * 1_000_003 + step)
            idx = torch.randperm(m, generator=g)[: min(size, m)]
            batch = F.to_device(fetch_batch(dataset, idx), self.device)
            with F.eval_mode(self.model), self._local_mode():  # same minibatch everywhere
                return self._apply(columns, lambda: [batch], self.n_train / len(idx), transpose)

        return sampled

    def _solve(self, rhs: Tensor, transpose: bool, what: str) -> Tensor:
        if self.show_progress:
            from tqdm.auto import tqdm

            self._columns = tqdm(desc=f"SAM-HIF {self.variant}: {what} (matvec columns)")
        try:
            out = self.inverse.solve_transpose(rhs) if transpose else self.inverse.solve(rhs)
        finally:
            if self._columns is not None:
                self._columns.close()
            self._columns = None
        F.check_finite(out, f"inverse-HVP solutions ({what})")
        return out

    @property
    def last_residual(self) -> Tensor | None:
        """Relative residuals ``||A x - b|| / ||b||`` of the last solve, per column."""
        return self.inverse.last_residual

    def matrix(self) -> Tensor:
        """The dense :math:`A` ``(P, P)`` (formed on first use if the solver is dense)."""
        if self.inverse.method == "dense":
            return self.inverse.matrix()
        with F.eval_mode(self.model):
            formed = self._factored_matrix()
        if formed is not None:
            return formed
        return dense_matrix(
            self._matvec,
            self.dim,
            dtype=self.params[self.names[0]].dtype,
            device=self.device,
            chunk_size=self.solver_options.chunk_size,
        )

    # ------------------------------------------------------------------ factored GGN

    def _factored_curvature(self, point: F.Params) -> Tensor:
        """The GGN of the (rescaled) summed loss at ``point``, ``(P, P)``, from factors."""
        batches = self._hessian_batches()  # a rank without batches gets zeros
        total = factored_ggn.linear_ggn(
            self._factored_loss, point, batches, self._ggn_sites, self.names
        )
        total.mul_(self.hessian_scale)
        return all_reduce_sum(total) if self._reduce() else total

    def _factored_ok(self, point: F.Params) -> bool:
        """Whether the factored GGN applies: checked once, and all ranks agree."""
        if self._ggn_sites is None:
            return False
        if self._ggn_checked is None:
            first = next(iter(self._hessian_batches()), None)
            ok = first is None or factored_ggn.ggn_matches(
                self._factored_loss, point, first, self._ggn_sites, self.names
            )
            if self._reduce():
                ok = bool(all_reduce_sum(torch.tensor([0.0 if ok else 1.0]))[0] == 0)
            self._ggn_checked = ok
        return self._ggn_checked

    def _factored_matrix(self) -> Tensor | None:
        """:math:`A` formed from factored GGNs, or ``None`` when they do not apply."""
        point = self.params if self.variant == "plain" else self.perturbed
        if not self._factored_ok(point):
            return None
        g = self._factored_curvature(point)
        if self.variant in ("full", "exact"):  # H_e (I + J), J from H_0's columns
            he = g.clone()
            if self.inverse.method == "dense":  # kept for the exact right-hand sides
                self._dense_he = he
            g0_over_n = self._factored_curvature(self.params).div_(self.n_train)
            jac = torch.empty_like(g)
            step = self.solver_options.chunk_size
            for start in range(0, self.dim, step):
                cols = slice(start, min(start + step, self.dim))
                eye = g.new_zeros(self.dim, cols.stop - start)  # columns of the identity
                eye[cols].fill_diagonal_(1.0)
                jac[:, cols] = self._jvp_eps_given(eye, g0_over_n[:, cols])
            g = g.addmm_(he, jac)
        g.diagonal().add_(self._regulariser())
        return g

    def _he_product(self, columns: Tensor) -> Tensor:
        """:math:`H_e` times ``(P, m)`` columns (the formed matrix when there is one)."""
        if self._dense_he is not None:
            return self._dense_he @ columns
        return self._curvature(self.perturbed, columns, self._hessian_batches(), self.hessian_scale)
