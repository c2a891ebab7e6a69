r"""Sharpness-Aware Minimization (SAM) and its adaptive variant (ASAM).

The optimizer wraps any base optimizer class, with the API of the widely used
``SAM(params, base_optimizer, rho, adaptive)`` wrapper. One SAM step is two
forward-backward passes:

1. :meth:`SAM.first_step` moves the weights to :math:`w + \epsilon(w)` with
   :math:`\epsilon = \rho\, g / (\lVert g\rVert + 10^{-12})` (SAM) or
   :math:`\epsilon = \rho\, w^2 g / (\lVert |w| g\rVert + 10^{-12})` (ASAM), where
   :math:`g` is the current gradient;
2. :meth:`SAM.second_step` restores :math:`w` and applies the base optimizer with the
   gradient taken at the perturbed point.

The perturbation is computed by :func:`captum_sam.functional.sam_perturbation_list`,
the same function the attribution code uses, so attribution sees exactly the
:math:`w + \epsilon` that training saw.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch

from captum_sam.core import sam_perturbation_list
from captum_sam.core.sam import sam_grad_norm

__all__ = ["SAM"]


class SAM(torch.optim.Optimizer):
    """Sharpness-Aware Minimization around a base optimizer.

    The parameter groups are shared with the base optimizer, so learning-rate
    schedulers attached to the SAM instance act on the base optimizer too.

    Args:
        params: Parameters or parameter groups, as for any torch optimizer.
        base_optimizer: A ``torch.optim.Optimizer`` subclass (not an instance), for
            example ``torch.optim.SGD``.
        rho: Radius of the perturbation, ``rho >= 0``. ``rho = 0`` reproduces the
            base optimizer exactly.
        adaptive: Use ASAM's scale-invariant perturbation.
        **base_kwargs: Passed to ``base_optimizer`` (``lr``, ``momentum``,
            ``weight_decay``, ...).

    Example:
        >>> opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
        >>> loss_fn(model(x), y).backward()
        >>> opt.first_step(zero_grad=True)
        >>> loss_fn(model(x), y).backward()
        >>> opt.second_step(zero_grad=True)
    """

    def __init__(
        self,
        params: Iterable[Any],
        base_optimizer: type[torch.optim.Optimizer],
        rho: float = 0.05,
        adaptive: bool = False,
        **base_kwargs: Any,
    ) -> None:
        _check_rho(rho)
        if not (
            isinstance(base_optimizer, type) and issubclass(base_optimizer, torch.optim.Optimizer)
        ):
            raise TypeError(
                "`base_optimizer` must be a torch.optim.Optimizer subclass such as "
                f"torch.optim.SGD (the class, not an instance); got {base_optimizer!r}"
            )
        if not isinstance(adaptive, bool):
            raise TypeError(f"`adaptive` must be a bool, got {adaptive!r}")
        defaults = dict(rho=float(rho), adaptive=adaptive, **base_kwargs)
        super().__init__(params, defaults)  # (each group checked by add_param_group)
        self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group (as ``torch.optim.Optimizer``), refusing a bad ``rho``/``adaptive``."""
        _check_rho(param_group.get("rho", self.defaults["rho"]))
        adaptive = param_group.get("adaptive", self.defaults["adaptive"])
        if not isinstance(adaptive, bool):
            raise TypeError(f"`adaptive` must be a bool, got {adaptive!r}")
        super().add_param_group(param_group)

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """Move every parameter with a gradient to ``w + eps(w)``.

        Args:
            zero_grad: Clear the gradients afterwards.
        """
        weights, grads, groups = [], [], []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    weights.append(p)
                    grads.append(p.grad)
                    groups.append(group)
        if not weights:
            raise RuntimeError("SAM.first_step found no gradients: call loss.backward() first")
        rhos = [g["rho"] for g in groups]
        adaptives = [g["adaptive"] for g in groups]
        norm = sam_grad_norm(weights, grads, adaptives)
        if not bool(torch.isfinite(norm)):  # NaN/inf in a gradient (or an overflow)
            raise ValueError(
                f"SAM.first_step: the gradient norm is {float(norm)}: the gradients contain "
                "NaN or inf (check the batch, the loss and the learning rate); the weights "
                "were not moved"
            )
        perturbations = sam_perturbation_list(weights, grads, rhos, adaptives, norm)
        for p, e in zip(weights, perturbations):
            self.state[p]["old_p"] = p.detach().clone()
            p.add_(e)
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def restore(self) -> None:
        """Move the weights back from ``w + eps`` to ``w`` (after :meth:`first_step`)."""
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p)
                if state and "old_p" in state:
                    p.copy_(state.pop("old_p"))

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Restore ``w`` and take the base optimizer's step with the current gradient.

        Args:
            zero_grad: Clear the gradients afterwards.
        """
        self.restore()
        self.base_optimizer.step()
        if zero_grad:
            self.zero_grad()

    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:
        """Take one full SAM step, as the well-known wrapper's ``step(closure)``.

        Like that wrapper, it takes the gradients at ``w`` that are already there
        (``loss.backward(); optimizer.step(closure)``) and calls ``closure`` once, at
        ``w + eps``. When there are none (every gradient ``None`` or zero), it first
        calls ``closure`` at ``w`` to compute them, so a closure that zeroes the
        gradients, computes the loss and calls ``backward`` also works alone. The
        gradients are cleared afterwards, so the next step never reuses them.

        Args:
            closure: Computes the loss and calls ``backward`` (zeroing the gradients
                first or not: at ``w + eps`` they were cleared), returns the loss.

        Returns:
            The closure's loss at ``w`` when it was called there, else at ``w + eps``.

        Raises:
            ValueError: The gradients at ``w`` are not finite (the weights are not
                moved). If the closure raises at ``w + eps``, the weights are put back
                at ``w`` and no update is taken.
        """
        if closure is None:
            raise ValueError(
                "SAM.step needs a `closure` that computes the loss, calls backward and "
                "returns the loss; or call first_step() and second_step() yourself"
            )
        closure = torch.enable_grad()(closure)
        loss = None if self._has_gradients() else closure()
        self.first_step(zero_grad=True)
        try:
            perturbed = closure()
        except BaseException:
            self.restore()  # a failure at w + eps: back to w, no update
            raise
        self.second_step(zero_grad=True)
        return perturbed if loss is None else loss

    @torch.no_grad()
    def _has_gradients(self) -> bool:
        """Whether some parameter has a non-zero gradient (given by the caller at ``w``)."""
        return any(
            p.grad is not None and bool(p.grad.any())
            for group in self.param_groups
            for p in group["params"]
        )

    def state_dict(self) -> dict[str, Any]:
        """Return the base optimizer's state (momentum buffers, groups with rho)."""
        return self.base_optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state saved by :meth:`state_dict` into the base optimizer."""
        for group in state_dict.get("param_groups", []):
            if "rho" not in group or "adaptive" not in group:
                raise ValueError(
                    "`state_dict` param_groups lack 'rho'/'adaptive': it was not "
                    "saved from a SAM optimizer"
                )
            _check_rho(group["rho"])
        self.base_optimizer.load_state_dict(state_dict)
        self.param_groups = self.base_optimizer.param_groups


def _check_rho(rho: Any) -> None:
    if isinstance(rho, bool) or not isinstance(rho, (int, float)):
        raise TypeError(f"`rho` must be a number, got {type(rho).__name__}")
    if not math.isfinite(rho) or rho < 0:
        raise ValueError(f"`rho` must be a finite number >= 0, got {rho}")
