r"""BatchNorm in eval mode as an elementwise layer site.

With running statistics a BatchNorm layer is a per-channel affine map of its input,
:math:`y_{itc} = \gamma_c \hat x_{itc} + \beta_c` with
:math:`\hat x_{itc} = (x_{itc} - \mu_c)/\sqrt{\sigma^2_c + \varepsilon}` at every
position :math:`t` (the spatial positions of ``BatchNorm2d``, none of ``BatchNorm1d`` on
``(B, C)``). Its per-example gradients are therefore sums over positions of
*elementwise* products,

.. math:: \nabla_\gamma l_i = \sum_t d_{it} \odot \hat x_{it}, \qquad
          \nabla_\beta l_i = \sum_t d_{it},

with ``a = x_hat (B, T, C)`` and ``d (B, T, C)`` the output gradients: the site
contract of :mod:`captum_sam.core.layers.sites` with :attr:`LayerType.diagonal` set.
They cost :math:`O(T C)` per example and are always formed (``(B, C)`` numbers), so a
ResNet's normalisation layers no longer push every parameter onto the ``vmap`` path.

:math:`\hat x` is computed inside the forward hook from the running statistics in
place there (those ``functional_call`` was given: the checkpoint's; under
``batchnorm="batch"`` SAM-GIF forms its gradients with ``vmap`` instead). A layer in
train mode normalises with the
statistics of the current batch, which couples the examples: it raises
:class:`~captum_sam.core.layers.sites.Unsupported` and the gradients are formed
instead. Layers without affine parameters or without running statistics are not
sites, nor are subclasses with their own ``forward`` (``SyncBatchNorm``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from captum_sam.core.layers.sites import LayerType, Unsupported, register

__all__ = ["BATCHNORM", "BatchNormType"]


class BatchNormType(LayerType):
    """``BatchNorm1d/2d/3d`` with affine parameters and running statistics, in eval mode."""

    kind = "batchnorm"
    diagonal = True

    def accepts(self, module: nn.Module) -> bool:  # noqa: D102 - see LayerType
        return (
            isinstance(module, _BatchNorm)
            and type(module).forward is _BatchNorm.forward
            and module.affine
            and module.track_running_stats
        )

    def at_call(self, module: nn.Module, x: Tensor) -> Tensor:
        r""":math:`\hat x`, normalised with the running statistics in place."""
        if module.training:
            raise Unsupported("a BatchNorm layer normalises with its batch's statistics")
        if x.dim() < 2:
            raise Unsupported("a BatchNorm layer sees an input without a batch dimension")
        shape = (1, -1) + (1,) * (x.dim() - 2)
        mean = module.running_mean.view(shape)  # type: ignore[union-attr]
        var = module.running_var.view(shape)  # type: ignore[union-attr]
        return (x - mean) * torch.rsqrt(var + module.eps)

    def inputs(self, module: nn.Module, x: Tensor) -> Tensor:
        r"""``(B, C, *positions)`` :math:`\hat x` as ``(B, T, C)`` rows."""
        return self.outputs(module, x)

    def outputs(self, module: nn.Module, y: Tensor) -> Tensor:
        """``(B, C, *positions)`` -> ``(B, T, C)`` (``T = 1`` for a ``(B, C)`` input)."""
        return y.unsqueeze(1) if y.dim() == 2 else y.flatten(2).mT


BATCHNORM = register(BatchNormType())
