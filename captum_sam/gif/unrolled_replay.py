r"""The linearised replay of a recorded SAM run: parameter changes and exact derivatives.

With :math:`s_t = (w_t, m_t)` the optimizer state (weights and, with momentum, SGD's
buffers) and :math:`s_{t+1} = \Phi_t(s_t; a)` the recorded SAM-SGD step
(:func:`~captum_sam.gif.unrolled_step.sam_sgd_step`) with per-example weights :math:`a`,
removing a set :math:`S` changes the state by

.. math:: \delta s_{t+1} = J_t\, \delta s_t + \big(\Phi_t(s_t; a^{-S}) - \Phi_t(s_t; 1)\big),
          \qquad J_t = \partial \Phi_t / \partial s \text{ at } (s_t, 1),

the linearised replay: every step's change is carried through the Jacobians of all later
steps (the SAM perturbation :math:`\epsilon(w)` and the momentum included), while the
removal itself enters exactly at the recorded point. :math:`J_t \delta s_t` is one
``torch.func.jvp`` through the step. :math:`a^{-S}` is the kept mask (``"renormalise"``:
the step averages over the kept examples and a batch left empty is skipped, i.e. trained
without :math:`S`; ``"zero_weight"``: still divided by :math:`|B_t|`).

The adjoint (reverse) pass gives the exact derivative of a test loss
:math:`L(w_T)` with respect to every training example's weight in one sweep:
:math:`\lambda_T = (\nabla L(w_T), 0)`, :math:`\lambda_t = J_t^\top \lambda_{t+1}` and
:math:`\partial L / \partial a_k = \sum_{t: k \in B_t} (\partial \Phi_t / \partial a_k)^\top
\lambda_{t+1}`, each step one ``torch.func.vjp`` (``vmap``-ed over test examples).

The recorded states :math:`s_t` are recreated by re-running the recorded steps from the
initial checkpoint (exact up to floating-point rounding; compared with the recorded final
checkpoint) and kept in memory: ``T x P`` numbers (twice that with momentum).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import grad, jvp, vjp, vmap
from torch.utils.data import Dataset

from captum_sam.core.data import fetch_batch, progress
from captum_sam.core.errors import user_stacklevel
from captum_sam.core.losses import FunctionalLoss, to_device
from captum_sam.core.params import Params
from captum_sam.gif.unrolled_step import (
    REMOVALS,
    State,
    sam_sgd_step,
    sgd_settings,
    zero_state,
)
from captum_sam.trajectory import Trajectory

__all__ = ["UnrolledReplay", "check_removal"]

_STATEFUL = (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd)


def check_removal(removal: Any) -> str:
    """Validate the removal convention (``"renormalise"`` or ``"zero_weight"``)."""
    if removal not in REMOVALS:
        raise ValueError(f"`removal` must be one of {REMOVALS}, got {removal!r}")
    return removal


class UnrolledReplay:
    """Linearised replay and its adjoint over a recorded trajectory (see the module).

    Args:
        model: A model with the recorded architecture (copied, never modified).
        train_data: The map-style training set the trajectory indexes into.
        loss: Training loss ``(loss_fn, reduction)`` as for :class:`FunctionalLoss`.
        test_loss: Test loss ``(loss_fn, reduction)``.
        trajectory: The recorded run (its base optimizer must be SGD).
        load_func: ``load(model, path)`` for the recorded checkpoints.
    """

    def __init__(
        self,
        model: nn.Module,
        train_data: Dataset,
        loss: tuple[Callable[..., Tensor] | None, str],
        test_loss: tuple[Callable[..., Tensor] | None, str],
        trajectory: Trajectory,
        load_func: Callable[[nn.Module, str], Any],
    ) -> None:
        bad = [n for n, m in model.named_modules() if isinstance(m, _STATEFUL)]
        if bad:
            raise ValueError(
                f"`model` has BatchNorm or Dropout modules {bad[:3]}: the unrolled replay needs "
                "a training step that is a pure function of the weights"
            )
        self.sgd = sgd_settings(trajectory.optimizer)
        self.trajectory, self.train_data, self.load_func = trajectory, train_data, load_func
        self.scratch = copy.deepcopy(model).eval()
        load_func(self.scratch, trajectory.initial.path)
        self.names = [n for n, p in self.scratch.named_parameters() if p.requires_grad]
        frozen = {n: p.detach() for n, p in self.scratch.named_parameters() if not p.requires_grad}
        frozen.update({n: b.detach() for n, b in self.scratch.named_buffers()})
        self.loss = FunctionalLoss(self.scratch, loss[0], frozen, loss[1])
        self.test_loss = FunctionalLoss(self.scratch, test_loss[0], frozen, test_loss[1])
        self.device = next(self.scratch.parameters()).device
        self._states: list[State] | None = None

    # ------------------------------------------------------------------ the recorded run

    def batch(self, t: int) -> tuple[Any, ...]:
        """The recorded batch of step ``t`` on the model's device."""
        return self.batch_of(self.trajectory.steps[t].indices)

    def step_fn(self, t: int, batch: tuple[Any, ...], normalise: str) -> Callable[..., State]:
        """``(state, a) -> next state`` of recorded step ``t`` under a normalisation."""
        step = self.trajectory.steps[t]
        norm = None if normalise == "renormalise" else float(len(step.indices))
        return lambda s, a: sam_sgd_step(
            self.loss, s, a, batch, norm, step.lr, step.rho, step.adaptive, self.sgd, t == 0
        )

    def states(self, show_progress: bool = False) -> list[State]:
        """The states :math:`s_0 .. s_T`, recreated once by re-running the recorded steps."""
        if self._states is not None:
            return self._states
        w = {n: p.detach().clone() for n, p in self.scratch.named_parameters() if n in self.names}
        state: State = {"w": w}
        if self.sgd.momentum:
            state["buf"] = {n: torch.zeros_like(v) for n, v in w.items()}
        states = [state]
        steps = progress(range(len(self.trajectory.steps)), show_progress, "re-running steps")
        for t in steps:
            batch = self.batch(t)
            ones = torch.ones(batch[-1].shape[0], dtype=w[self.names[0]].dtype, device=self.device)
            nxt = self.step_fn(t, batch, "zero_weight")(states[-1], ones)
            states.append({k: {n: x.detach() for n, x in v.items()} for k, v in nxt.items()})
        self._check_final(states[-1]["w"])
        self._states = states
        return states

    def _check_final(self, w: Params) -> None:
        final = copy.deepcopy(self.scratch)
        self.load_func(final, self.trajectory.final.path)
        ref = {n: p.detach() for n, p in final.named_parameters()}
        err = max(float((w[n] - ref[n]).abs().max()) for n in self.names)
        scale = max(float(ref[n].abs().max()) for n in self.names)
        tol = 1e-8 if w[self.names[0]].dtype == torch.float64 else 1e-4
        if not err <= tol * (1 + scale):
            warnings.warn(
                f"re-running the recorded steps ends {err:.3g} (max abs) away from the recorded "
                "final checkpoint: the run is not reproduced, the linearised replay is "
                "taken around the re-run",
                stacklevel=user_stacklevel(),
            )

    def final(self) -> Params:
        """The re-run final weights :math:`w_T`."""
        return self.states()[-1]["w"]

    # ------------------------------------------------------------------ forward

    def change(
        self,
        removed: Sequence[int],
        removal: str,
        strength: float = 1.0,
        show_progress: bool = False,
    ) -> Params:
        r"""Linearised :math:`w_{-S} - w_T` (every trainable parameter, name -> tensor).

        ``strength`` scales the removal (the weights of :math:`S` become
        ``1 - strength``); 1 removes :math:`S`.
        """
        states = self.states(show_progress)
        gone = set(int(i) for i in removed)
        delta = zero_state(states[0])
        steps = progress(range(len(self.trajectory.steps)), show_progress, "linearised replay")
        for t in steps:
            idx = self.trajectory.steps[t].indices
            mask = torch.tensor([i in gone for i in idx], device=self.device)
            batch = self.batch(t)
            dtype = states[t]["w"][self.names[0]].dtype
            ones = torch.ones(len(idx), dtype=dtype, device=self.device)
            step = self.step_fn(t, batch, removal)
            new, delta = jvp(step, (states[t], ones), (delta, torch.zeros_like(ones)))
            if bool(mask.any()):
                a = ones - strength * mask.to(dtype)
                if removal == "renormalise" and not float(a.sum()) > 0:
                    forced = states[t]  # every example removed: the step is skipped
                else:
                    forced = step(states[t], a)
                delta = {
                    k: {n: delta[k][n] + forced[k][n] - new[k][n] for n in v}
                    for k, v in delta.items()
                }
        return {n: delta["w"][n].detach() for n in self.names}

    # ------------------------------------------------------------------ adjoint

    def batch_of(self, indices: Sequence[int]) -> tuple[Any, ...]:
        """Training examples ``indices`` as one batch on the model's device."""
        return to_device(fetch_batch(self.train_data, list(indices)), self.device)

    def gradients(
        self, batch: tuple[Any, ...], loss: FunctionalLoss, aggregate: bool = False
    ) -> Params:
        """Loss gradients at :math:`w_T`: ``(m, *shape)`` per name (``m = 1`` aggregated)."""
        w = self.final()
        if aggregate:
            g = grad(lambda p: loss.summed_loss(p, batch))(w)
            return {n: v.unsqueeze(0) for n, v in g.items()}

        def one(p: Params, *example: Any) -> Tensor:
            return loss.example_loss(p, example[:-1], example[-1])

        return vmap(grad(one), in_dims=(None, *[0] * len(batch)))(w, *batch)

    def adjoint(self, cotangent: Params, normalise: str, show_progress: bool = False) -> Tensor:
        r"""``(m, n_train)`` derivatives :math:`\partial L_j / \partial a_k` of ``m`` losses.

        Args:
            cotangent: :math:`\nabla L_j(w_T)` per name, with a leading dimension ``m``.
            normalise: ``"renormalise"`` (example weights inside the kept-count mean) or
                ``"zero_weight"`` (weights over a fixed :math:`|B_t|`).
            show_progress: Progress bar over the steps (in reverse).
        """
        states = self.states(show_progress)
        m = next(iter(cotangent.values())).shape[0]
        lam: State = {"w": dict(cotangent)}
        if self.sgd.momentum:
            lam["buf"] = {n: torch.zeros_like(v) for n, v in cotangent.items()}
        dtype = cotangent[self.names[0]].dtype
        out = torch.zeros(m, self.trajectory.n_train, dtype=dtype, device=self.device)
        steps = progress(
            range(len(self.trajectory.steps) - 1, -1, -1), show_progress, "adjoint replay"
        )
        for t in steps:
            idx = self.trajectory.steps[t].indices
            ones = torch.ones(len(idx), dtype=dtype, device=self.device)
            _, pull = vjp(self.step_fn(t, self.batch(t), normalise), states[t], ones)
            lam, da = vmap(pull)(lam)
            out.index_add_(1, torch.tensor(idx, device=self.device), da)
        return out

    def scores(
        self,
        batches: Iterable[tuple[Any, ...]],
        normalise: str,
        aggregate: bool,
        chunk: int,
        show_progress: bool = False,
    ) -> Tensor:
        r"""``(n_test, n_train)`` scores :math:`-\partial L(z) / \partial a_k` (positive: helpful).

        Test examples are swept ``chunk`` at a time (one adjoint pass per chunk).
        """
        rows = []
        for batch in batches:
            batch = to_device(tuple(batch), self.device)
            n = batch[-1].shape[0]
            parts = [batch] if aggregate else [
                tuple(x[i : i + chunk] for x in batch) for i in range(0, n, chunk)
            ]  # fmt: skip
            for part in parts:
                cot = self.gradients(part, self.test_loss, aggregate)
                rows.append(-self.adjoint(cot, normalise, show_progress))
        if not rows:
            raise ValueError("`inputs` is empty")
        out = torch.cat(rows)
        return out.sum(dim=0, keepdim=True) if aggregate else out
