r"""``nn.Conv2d`` as a layer site: unfolded patches and output-gradient rows.

A convolution with ``groups=1`` is a linear layer applied at every output position
:math:`t` (``T = H' W'`` of them) to the input patch there, flattened in the order of
:func:`torch.nn.functional.unfold` (input channel, then kernel row, then kernel
column), which is the order of ``weight.reshape(C_out, -1)``. So with
``a (B, T, C_in kh kw)`` the unfolded patches (the module's ``kernel_size``,
``stride``, ``padding``, ``dilation``) and ``d (B, T, C_out)`` the gradient of the
loss in the output at each position,

.. math:: \nabla_W l_i = \Big(\sum_t d_{it} a_{it}^\top\Big)
          \text{ reshaped to } (C_{out}, C_{in}, k_h, k_w),
          \qquad \nabla_b l_i = \sum_t d_{it}.

Only zero padding is supported (``padding_mode="zeros"``; ``padding="same"`` and
``"valid"`` included); other padding modes, grouped or depthwise convolutions and
subclasses that override ``forward`` are not sites (their gradients are formed with
``vmap`` instead).
"""

from __future__ import annotations

import torch.nn.functional as nnf
from torch import Tensor, nn

from captum_sam.core.layers.sites import LayerType, Unsupported, register

__all__ = ["CONV2D", "Conv2dType", "conv_padding"]


def conv_padding(module: nn.Conv2d) -> tuple[int, int, int, int]:
    """Zero padding ``(left, right, top, bottom)`` the convolution applies to its input.

    ``padding="same"`` pads ``dilation * (k - 1)`` in all per dimension, the odd one
    on the right (bottom), as ``torch.nn.functional.conv2d`` does.
    """
    padding = module.padding
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0, 0, 0)
        total = [d * (k - 1) for d, k in zip(module.dilation, module.kernel_size)]
        (top, left) = (t // 2 for t in total)
        return (left, total[1] - left, top, total[0] - top)
    return (padding[1], padding[1], padding[0], padding[0])


class Conv2dType(LayerType):
    """``nn.Conv2d`` with ``groups=1`` and zero padding; ``T`` = output positions ``H' W'``."""

    kind = "conv2d"

    def accepts(self, module: nn.Module) -> bool:  # noqa: D102 - see LayerType
        return (
            isinstance(module, nn.Conv2d)
            and type(module).forward is nn.Conv2d.forward
            and module.groups == 1
            and module.padding_mode == "zeros"
        )

    def inputs(self, module: nn.Module, x: Tensor) -> Tensor:
        """Patches ``(B, H' W', C_in kh kw)`` of a ``(B, C_in, H, W)`` input.

        The same numbers as :func:`torch.nn.functional.unfold`, built from ``kh kw``
        strided slices of the padded input (one copy each) instead of ``im2col``,
        which is several times slower on CPUs. The result is a transposed view of a
        contiguous ``(B, C_in kh kw, H' W')`` tensor (what the batched products want).
        """
        if x.dim() != 4:
            raise Unsupported("a convolution sees an input without a batch dimension")
        left, right, top, bottom = conv_padding(module)  # type: ignore[arg-type]
        if left or right or top or bottom:
            x = nnf.pad(x, (left, right, top, bottom))
        (kh, kw), (sh, sw), (dh, dw) = module.kernel_size, module.stride, module.dilation
        rows = (x.shape[2] - dh * (kh - 1) - 1) // sh + 1
        cols = (x.shape[3] - dw * (kw - 1) - 1) // sw + 1
        out = x.new_empty(x.shape[0], x.shape[1], kh * kw, rows, cols)
        for i in range(kh):
            for j in range(kw):
                top_i, left_j = i * dh, j * dw
                out[:, :, i * kw + j].copy_(
                    x[
                        :,
                        :,
                        top_i : top_i + sh * (rows - 1) + 1 : sh,
                        left_j : left_j + sw * (cols - 1) + 1 : sw,
                    ]
                )
        return out.reshape(x.shape[0], -1, rows * cols).mT

    def outputs(self, module: nn.Module, y: Tensor) -> Tensor:
        """``(B, C_out, H', W')`` -> ``(B, H' W', C_out)``."""
        return y.flatten(2).mT


CONV2D = register(Conv2dType())
