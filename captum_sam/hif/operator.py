r"""SAM-HIF's linear operator :math:`A` and its pieces: curvature products, :math:`J`, solves.

Vectors are flat ``(P, m)`` columns in the attributed parameters' order. Every product
goes through ``torch.func`` (:func:`captum_sam.core.hvp`, :func:`captum_sam.core.ggn_vp`),
except when :math:`A` is formed for a model whose attributed parameters are all
``nn.Linear`` weights and biases with ``curvature="ggn"``: then each generalised
Gauss-Newton matrix comes from layer inputs and output Jacobians
(:func:`captum_sam.core.layers.linear_ggn.linear_ggn`), after a check against
``ggn_vp`` on a few examples.

With the summed training loss :math:`S`, :math:`H_e` its curvature at
:math:`w^* + \epsilon^*`, :math:`H_0` at :math:`w^*` and the regulariser
:math:`r = n(\lambda + d) + \text{hessian\_reg}`:

* ``plain``: :math:`A = H_0 + r I`;  ``fast``: :math:`A = H_e + r I`;
* ``full`` / ``exact``: :math:`A = H_e (I + J) + r I` with
  :math:`J = d\epsilon/dw` (not symmetric).

With ``curvature="kfac"``/``"ekfac"`` every curvature product (:math:`H_e`, and the
:math:`H_0` inside :math:`J`) is the fitted block-diagonal Kronecker-factored matrix
(:class:`~captum_sam.hif.kfac.KroneckerCurvature`, no pass over the data); blocks
between attributed and other parameters are zero, so :math:`J`'s norm term has no
contribution from the rows of ``extra`` parameters.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.func import vmap
from torch.utils.data import DataLoader

from captum_sam import core as F
from captum_sam.core.data import fetch_batch, local_batches, on_device
from captum_sam.core.distributed import all_reduce_sum, is_distributed

__all__ = ["SAMOperator", "VARIANTS", "CURVATURES", "SYMMETRIC", "KRONECKER"]

VARIANTS = ("fast", "full", "exact", "plain")
CURVATURES = ("hessian", "ggn", "kfac", "ekfac")
KRONECKER = ("kfac", "ekfac")
SYMMETRIC = ("fast", "plain")


@dataclass
class SAMOperator:
    r"""Products with :math:`A`, :math:`A^\top`, :math:`H_e` and :math:`J`.

    Args:
        loss: The training loss bound to the non-attributed parameters.
        names: Attributed parameter names.
        params: :math:`w^*` (attributed).
        mean_grad: :math:`g_0 = \nabla L(w^*)` (attributed).
        rho: SAM radius.
        adaptive: ASAM.
        variant: One of :data:`VARIANTS`.
        curvature: One of :data:`CURVATURES`.
        n_train: :math:`n`.
        regulariser: :math:`r`, added as :math:`r I` (a ``(P, 1)`` tensor: one value per
            coordinate, e.g. K-FAC's per-layer damping).
        hessian_data: Batches of the curvature.
        hessian_scale: Factor on every curvature product (1, or ``n/m`` when a
            ``hessian_dataset`` of ``m`` examples is rescaled).
        sample_size: Minibatch size of LiSSA's sampled products.
        seed: Seed of LiSSA's minibatches.
        device: Where the model lives.
        ggn_sites: Linear layers for the factored GGN, or ``None``.
        extra: Perturbed but not attributed parameters at :math:`w^*` (the rest of the
            perturbation's scope; empty when the attributed parameters are all of it).
        extra_grad: :math:`g_0` on ``extra``.
        kronecker: With ``curvature="kfac"``/``"ekfac"``, the fitted curvatures by
            point: ``{"params": ..., "perturbed": ...}`` (those the variant needs).

    The perturbation is the training's, over the scope (attributed and ``extra``):
    its norm involves the full :math:`g_0`, and it moves ``extra`` too
    (:attr:`moved_loss` holds them at their perturbed values). :math:`J` is the
    attributed block :math:`\partial\epsilon_A/\partial w_A` of its derivative
    (``extra`` held fixed), whose norm term needs the curvature's rows of ``extra``.
    """

    loss: F.FunctionalLoss
    names: list[str]
    params: F.Params
    mean_grad: F.Params
    rho: float
    adaptive: bool
    variant: str
    curvature: str
    n_train: int
    regulariser: float | Tensor
    hessian_data: Any
    hessian_scale: float
    sample_size: int
    seed: int
    device: torch.device
    ggn_sites: Any = None
    columns_bar: Any = None  # a tqdm bar counting matvec columns while solving
    local: bool = False  # True: curvature products on all data, on this rank alone
    dense_he: Tensor | None = None  # H_e, kept when A is formed densely
    dense_curvature: Tensor | None = None  # C at `point`, formed by damping="auto"
    _ggn_checked: bool | None = None
    extra: F.Params = field(default_factory=dict)
    extra_grad: F.Params = field(default_factory=dict)
    kronecker: dict[str, Any] | None = None
    eps: F.Params = field(init=False)
    eps_extra: F.Params = field(init=False)
    perturbed: F.Params = field(init=False)
    moved_loss: F.FunctionalLoss = field(init=False)
    scope_loss: F.FunctionalLoss = field(init=False)
    dim: int = field(init=False)
    _flat_point: tuple[Tensor, Tensor] = field(init=False)

    def __post_init__(self) -> None:
        full = {**self.params, **self.extra}
        eps = F.sam_perturbation(
            full, {**self.mean_grad, **self.extra_grad}, self.rho, self.adaptive
        )
        self.eps = {n: eps[n] for n in self.names}
        self.eps_extra = {n: eps[n] for n in self.extra}
        self.perturbed = F.tree_add(self.params, self.eps)
        frozen = self.loss.frozen
        self.moved_loss = self.loss.bind(
            {n: v + self.eps_extra[n] if n in self.extra else v for n, v in frozen.items()}
        )
        # the loss as a function of the whole scope (attributed and extra)
        self.scope_loss = self.loss.bind({n: v for n, v in frozen.items() if n not in self.extra})
        self.dim = sum(self.params[n].numel() for n in self.names)
        # (P, 1) columns of w* and g0 for the closed-form derivative of eps
        self._flat_point = tuple(  # type: ignore[assignment]
            F.flatten(t, self.names).unsqueeze(1) for t in (self.params, self.mean_grad)
        )
        # the extra parameters' share of the norm ||a g|| and of u = a^2 g
        if self.extra:
            names = list(self.extra)
            w, g = (F.flatten(t, names) for t in (self.extra, self.extra_grad))
            a = w.abs() if self.adaptive else torch.ones_like(w)
            self._extra_z2 = (a * g).square().sum()
            self._extra_u = F.unflatten(a * a * g, self.extra)
        else:
            self._extra_z2, self._extra_u = None, None

    def rhs_extra_dot(self, batch: Any, own: Tensor) -> Tensor | None:
        r"""The extra parameters' share of :math:`z \cdot \delta z` for the exact variant.

        For example :math:`k`, :math:`\delta g = g_k / n` over the whole scope, so the
        share is :math:`(u \cdot g_k - u_A \cdot g_{k,A}) / n` with :math:`u = a^2 g_0`;
        :math:`u \cdot g_k` is one forward-mode derivative per example (no full
        per-example gradient is formed). ``own``: the attributed gradients ``(B, P)``.
        Returns ``(1, B)``, or ``None`` without extra parameters.
        """
        if not self.extra:
            return None
        w, g = self._flat_point
        a = w.abs() if self.adaptive else torch.ones_like(w)
        u_attr = F.unflatten((a * a * g).squeeze(1), self.params)
        full = {**self.params, **self.extra}
        direction = {**u_attr, **self._extra_u}  # type: ignore[dict-item]
        total = F.per_example_directional(self.scope_loss, full, batch, direction)
        return ((total - own @ (a * a * g).squeeze(1)) / self.n_train).unsqueeze(0)

    def loss_at(self, point: F.Params) -> F.FunctionalLoss:
        """The loss whose non-attributed parameters match ``point`` (moved at the perturbed one)."""
        return self.moved_loss if point is self.perturbed else self.loss

    @property
    def symmetric(self) -> bool:
        """Whether :math:`A` is symmetric."""
        return self.variant in SYMMETRIC

    @property
    def point(self) -> F.Params:
        r"""Where the curvature of :math:`A` is taken (:math:`w^*` or :math:`w^*+\epsilon^*`)."""
        return self.params if self.variant == "plain" else self.perturbed

    # ------------------------------------------------------------------ data

    def reduce(self) -> bool:
        """Whether curvature products are split over ranks and summed."""
        return is_distributed() and not self.local

    def hessian_batches(self) -> Iterable[tuple[Any, ...]]:
        """This rank's curvature batches (all of them outside a process group)."""
        if self.reduce():
            return (b for _, b in local_batches(self.hessian_data, self.device))
        return on_device(self.hessian_data, self.device)

    def indexed_hessian_batches(self) -> Iterable[tuple[int, tuple[Any, ...]]]:
        """:meth:`hessian_batches` with each batch's index in the whole curvature set."""
        if self.reduce():
            return local_batches(self.hessian_data, self.device)
        return enumerate(on_device(self.hessian_data, self.device))

    @contextlib.contextmanager
    def local_mode(self) -> Iterator[None]:
        """Solve on this rank alone (ranks solving different right-hand sides)."""
        self.local = True
        try:
            yield
        finally:
            self.local = False

    # ------------------------------------------------------------------ products

    def tree(self, columns: Tensor) -> F.Params:
        """``(P, m)`` columns as a dict of ``(m, *shape)`` tensors."""
        return F.unflatten(columns.T, {n: self.params[n] for n in self.names}, batch_dims=1)

    def flat(self, tree: F.Params) -> Tensor:
        """A dict of ``(m, *shape)`` tensors as ``(P, m)`` columns."""
        return F.flatten(tree, self.names, batch_dims=1).T

    def curvature_product(
        self, point: F.Params, columns: Tensor, batches: Iterable[Any], scale: float
    ) -> Tensor:
        """Curvature of the summed loss at ``point`` times ``columns`` (``(P, m)``)."""
        if self.columns_bar is not None:
            self.columns_bar.update(columns.shape[1])
        if self.kronecker is not None:  # fitted, scale included: no data
            return self.kronecker["perturbed" if point is self.perturbed else "params"].product(
                columns
            )
        product = F.hvp if self.curvature == "hessian" else F.ggn_vp
        out = scale * self.flat(
            product(
                self.loss_at(point), point, batches, self.tree(columns), batched=True,
                allow_empty=self.reduce(),
            )
        )  # fmt: skip
        return all_reduce_sum(out) if self.reduce() else out

    def _scope_product(
        self, columns: Tensor, batches: Iterable[Any], scale: float
    ) -> tuple[Tensor, Tensor]:
        """Curvature at :math:`w^*` over the scope times ``(v, 0)``: rows ``(A, extra)``.

        Returns the attributed rows ``(P, m)`` and ``u_extra . rows_extra`` ``(1, m)``.
        """
        if self.columns_bar is not None:
            self.columns_bar.update(columns.shape[1])
        full = {**self.params, **self.extra}
        vec = self.tree(columns)
        m = columns.shape[1]
        vec.update({n: v.new_zeros(m, *v.shape) for n, v in self.extra.items()})
        product = F.hvp if self.curvature == "hessian" else F.ggn_vp
        out = product(self.scope_loss, full, batches, vec, batched=True, allow_empty=self.reduce())
        rows = scale * self.flat({n: out[n] for n in self.names})
        extra = scale * sum(
            (out[n] * self._extra_u[n]).reshape(m, -1).sum(1)
            for n in self.extra  # type: ignore[index]
        ).unsqueeze(0)
        if self.reduce():
            rows, extra = all_reduce_sum(rows), all_reduce_sum(extra)
        return rows, extra

    def jvp_eps(self, columns: Tensor, batches: Iterable[Any], scale: float) -> Tensor:
        r""":math:`J v = d\epsilon_A/dw_A\, v` for every column."""
        if not self.extra or self.kronecker is not None:  # no curvature rows of extra
            hess_l = self.curvature_product(self.params, columns, batches, scale) / self.n_train
            return self.jvp_eps_given(columns, hess_l)
        rows, extra = self._scope_product(columns, batches, scale)
        return self.jvp_eps_given(columns, rows / self.n_train, extra / self.n_train)

    def jvp_eps_given(
        self, columns: Tensor | None, hess_l: Tensor, extra_dot: Tensor | None = None
    ) -> Tensor:
        r""":math:`J v` from ``v`` and :math:`\nabla^2 L(w^*) v` (both ``(P, m)``).

        The derivative of :math:`\epsilon(w; g) = \rho\, a \odot z / (\lVert z \rVert
        + 10^{-12})`, :math:`z = a \odot g` (:math:`a = |w|` for ASAM, 1 for SAM)
        along :math:`(\delta w, \delta g)` = (``columns``, ``hess_l``), in closed form:
        :math:`\delta a = \mathrm{sign}(w) \odot \delta w`,
        :math:`\delta z = \delta a \odot g + a \odot \delta g` and
        :math:`\delta\epsilon = \rho [(\delta a \odot z + a \odot \delta z) / N
        - a \odot z\, (z \cdot \delta z) / (\lVert z \rVert N^2)]` with
        :math:`N = \lVert z \rVert + 10^{-12}`. ``columns=None`` means
        :math:`\delta w = 0`. With parameters outside the attributed ones in the
        perturbation's scope, :math:`\lVert z \rVert` runs over the whole scope and
        ``extra_dot`` ``(1, m)`` is their share :math:`z_B \cdot \delta z_B` of
        :math:`z \cdot \delta z` (:math:`\delta z_B = a_B \odot \delta g_B`,
        :math:`w_B` held fixed).
        """
        w, g = self._flat_point
        a = w.abs() if self.adaptive else torch.ones_like(w)
        z = a * g
        squared = z.square().sum()
        if self._extra_z2 is not None:  # the norm runs over the whole scope
            squared = squared + self._extra_z2
        norm = squared.sqrt()
        denom = norm + 1e-12
        dz = a * hess_l
        moved = a * dz
        if self.adaptive and columns is not None:
            da = torch.sign(w) * columns
            dz = dz + da * g
            moved = a * dz + da * z
        zdz = z.T @ dz
        if extra_dot is not None:  # z_B . dz_B of the extra parameters (w_B fixed)
            zdz = zdz + extra_dot
        dnorm = zdz / norm if norm > 0 else torch.zeros_like(dz[:1])
        return self.rho * (moved / denom - (a * z) * (dnorm / denom**2))

    def vjp_eps(self, columns: Tensor, batches: list[Any], scale: float) -> Tensor:
        """:math:`J^T u` for every column."""
        full = {**self.params, **self.extra}
        grads = {**self.mean_grad, **self.extra_grad}

        def one(u: F.Params) -> tuple[F.Params, F.Params]:
            u = {**u, **{n: torch.zeros_like(v) for n, v in self.extra.items()}}
            return F.perturbation_vjp(full, grads, u, self.rho, self.adaptive)

        dw, dg = vmap(one)(self.tree(columns))
        dw = {n: dw[n] for n in self.names}
        if not self.extra or self.kronecker is not None:  # block-diagonal: H[A, extra] = 0
            hess_dg = self.curvature_product(self.params, self.flat(dg), batches, scale)
            return self.flat(dw) + hess_dg / self.n_train
        # H_L[A, scope] dg: the scope's curvature at w*, attributed rows
        product = F.hvp if self.curvature == "hessian" else F.ggn_vp
        out = product(self.scope_loss, full, batches, dg, batched=True, allow_empty=self.reduce())
        rows = scale * self.flat({n: out[n] for n in self.names})
        if self.reduce():
            rows = all_reduce_sum(rows)
        return self.flat(dw) + rows / self.n_train

    def apply(
        self, columns: Tensor, batches: Callable[[], Iterable[Any]], scale: float, transpose: bool
    ) -> Tensor:
        """``A`` (or ``A^T``) times ``columns`` over the given data."""
        reg = self.regulariser * columns
        if self.variant in SYMMETRIC:
            return self.curvature_product(self.point, columns, batches(), scale) + reg
        if not transpose:  # H_e (I + J) v
            moved = columns + self.jvp_eps(columns, batches(), scale)
            return self.curvature_product(self.perturbed, moved, batches(), scale) + reg
        he_u = self.curvature_product(self.perturbed, columns, batches(), scale)  # (I + J^T) H_e u
        return he_u + self.vjp_eps(he_u, batches(), scale) + reg

    def matvec(self, columns: Tensor) -> Tensor:
        """:math:`A` times ``(P, m)`` columns over the curvature data."""
        return self.apply(columns, self.hessian_batches, self.hessian_scale, False)

    def rmatvec(self, columns: Tensor) -> Tensor:
        r""":math:`A^\top` times ``(P, m)`` columns."""
        return self.apply(columns, self.hessian_batches, self.hessian_scale, True)

    def sampled(self, transpose: bool) -> Callable[[Tensor, int], Tensor]:
        """Minibatch estimate of ``A`` (or ``A^T``) products for LiSSA, seeded by step."""
        data = self.hessian_data
        dataset = data.dataset if isinstance(data, DataLoader) else None

        def sampled(columns: Tensor, step: int) -> Tensor:
            if dataset is None:
                raise ValueError("LiSSA needs `hessian_dataset` to be a Dataset to sample from")
            m = len(dataset)  # type: ignore[arg-type]
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
            idx = torch.randperm(m, generator=g)[: min(self.sample_size, m)]
            batch = F.to_device(fetch_batch(dataset, idx), self.device)
            scale = self.hessian_scale * m / len(idx)
            with self.local_mode():  # same minibatch everywhere
                return self.apply(columns, lambda: [batch], scale, transpose)

        return sampled

    def he_product(self, columns: Tensor) -> Tensor:
        """:math:`H_e` times ``(P, m)`` columns (the formed matrix when there is one)."""
        if self.dense_he is not None:
            return self.dense_he @ columns
        return self.curvature_product(
            self.perturbed, columns, self.hessian_batches(), self.hessian_scale
        )
