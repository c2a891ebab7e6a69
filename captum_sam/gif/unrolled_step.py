r"""One recorded SAM-SGD step as a pure function, for the unrolled (linearised) replay.

:func:`sam_sgd_step` maps the optimizer state :math:`s_t = (w_t, m_t)` (weights, and the
SGD momentum buffer when the run used momentum) and per-example weights :math:`a` of the
recorded batch :math:`B_t` to :math:`s_{t+1}`, exactly as :class:`~captum_sam.SAM` around
``torch.optim.SGD`` does:

.. math:: g(w) = \nabla_w \frac{\sum_{i \in B_t} a_i l_i(w)}{N},\quad
          \epsilon = \epsilon(w; g(w)),\quad d = g(w + \epsilon) + \lambda w,

then ``SGD``'s momentum (``buf = d`` on the run's first step, else
``mu * buf + (1 - dampening) * d``; Nesterov ``d + mu * buf``) and
:math:`w_{t+1} = w_t - \eta_t d`. The normaliser is :math:`N = |B_t|` (``"zero_weight"``)
or :math:`N = \sum_i a_i` (``"renormalise"``: the mean over the kept examples). Being a
pure function of ``(state, a)``, its Jacobians (``torch.func.jvp`` / ``vjp``) include
how the perturbation :math:`\epsilon(w)` and the momentum carry a change forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.func import grad

from captum_sam.core.losses import FunctionalLoss
from captum_sam.core.params import Params
from captum_sam.core.sam import sam_perturbation

__all__ = ["REMOVALS", "SGDSettings", "sam_sgd_step", "sgd_settings", "zero_state"]

REMOVALS = ("renormalise", "zero_weight")

State = dict[str, Params]  # {"w": weights} or {"w": weights, "buf": momentum buffers}


@dataclass(frozen=True)
class SGDSettings:
    """The base ``torch.optim.SGD``'s recorded hyperparameters (``lr`` comes per step)."""

    momentum: float = 0.0
    dampening: float = 0.0
    weight_decay: float = 0.0
    nesterov: bool = False


def sgd_settings(optimizer: dict[str, Any]) -> SGDSettings:
    """The recorded base optimizer's settings (a trajectory's ``optimizer`` field).

    Raises:
        ValueError: The base optimizer is not SGD, or it maximised.
    """
    base = optimizer.get("base", "")
    if base != "torch.optim.sgd.SGD":
        raise ValueError(
            f"the unrolled replay supports SGD base optimizers, the record used {base!r}"
        )
    hyper = dict(optimizer.get("hyperparameters", {}))
    if hyper.get("maximize", False):
        raise ValueError("the recorded SGD optimizer maximised: not supported")
    return SGDSettings(
        float(hyper.get("momentum", 0.0) or 0.0),
        float(hyper.get("dampening", 0.0) or 0.0),
        float(hyper.get("weight_decay", 0.0) or 0.0),
        bool(hyper.get("nesterov", False)),
    )


def batch_gradient(
    loss: FunctionalLoss, w: Params, batch: tuple[Any, ...], a: Tensor, norm: float | None
) -> Params:
    r"""Gradient of :math:`\sum_i a_i l_i(w) / N` (``norm=None``: :math:`N = \sum_i a_i`)."""

    def weighted(p: Params) -> Tensor:
        total = (a * loss.batch_losses(p, batch)).sum()
        return total / (a.sum() if norm is None else norm)

    return grad(weighted)(w)


def sam_sgd_step(
    loss: FunctionalLoss,
    state: State,
    a: Tensor,
    batch: tuple[Any, ...],
    norm: float | None,
    lr: float,
    rho: float,
    adaptive: bool,
    sgd: SGDSettings,
    first: bool,
) -> State:
    """One SAM-SGD step ``state -> state`` (see the module); ``first``: the run's first step.

    Args:
        loss: The per-example training loss at a parameter dict.
        state: ``{"w": weights}`` plus ``"buf"`` (momentum buffers) when ``sgd.momentum``.
        a: Per-example weights ``(|B_t|,)`` of the batch.
        batch: The recorded batch ``(features..., labels)``.
        norm: ``|B_t|`` (``"zero_weight"``) or ``None`` (``sum(a)``, ``"renormalise"``).
        lr: The step's learning rate.
        rho: The step's SAM radius.
        adaptive: ASAM.
        sgd: The base optimizer's settings.
        first: Whether this is the first step of the run (SGD initialises its buffer).

    Returns:
        The next state, with the keys of ``state``.
    """
    w = state["w"]
    g0 = batch_gradient(loss, w, batch, a, norm)
    eps = sam_perturbation(w, g0, rho, adaptive)
    g = batch_gradient(loss, {n: w[n] + eps[n] for n in w}, batch, a, norm)
    d = {n: g[n] + sgd.weight_decay * w[n] for n in w} if sgd.weight_decay else g
    buf = None
    if sgd.momentum:
        mu, damp = sgd.momentum, sgd.dampening
        buf = d if first else {n: mu * state["buf"][n] + (1 - damp) * d[n] for n in w}
        d = {n: d[n] + mu * buf[n] for n in w} if sgd.nesterov else buf
    out: State = {"w": {n: w[n] - lr * d[n] for n in w}}  # key order as the input's
    if buf is not None:
        out["buf"] = buf
    return out


def zero_state(state: State) -> State:
    """A state of zeros shaped like ``state``."""
    return {k: {n: torch.zeros_like(t) for n, t in v.items()} for k, v in state.items()}
