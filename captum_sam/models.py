"""Small reference models for the bundled experiments (logistic regression, MLP, CNN)."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["build_model", "MODELS"]

MODELS = ("logreg", "mlp", "cnn")


def build_model(
    name: str,
    image_shape: tuple[int, int, int],
    num_classes: int,
    hidden: int = 32,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
) -> nn.Module:
    """Build one of the reference models with seeded initial weights.

    Args:
        name: ``"logreg"`` (multinomial logistic regression, convex), ``"mlp"``
            (one tanh hidden layer) or ``"cnn"`` (one convolution, average pooling,
            linear head).
        image_shape: ``(channels, height, width)`` of one input.
        num_classes: Number of output logits.
        hidden: Hidden units (MLP) or channels (CNN).
        seed: Seed of the initial weights.
        dtype: Parameter dtype.

    Returns:
        The model; layers are named ``fc1``/``fc2`` (MLP), ``linear`` (logreg),
        ``conv``/``fc`` (CNN), for use with ``layers=``.
    """
    c, h, w = image_shape
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        if name == "logreg":
            model = nn.Sequential()
            model.add_module("flatten", nn.Flatten())
            model.add_module("linear", nn.Linear(c * h * w, num_classes))
        elif name == "mlp":
            model = nn.Sequential()
            model.add_module("flatten", nn.Flatten())
            model.add_module("fc1", nn.Linear(c * h * w, hidden))
            model.add_module("act", nn.Tanh())
            model.add_module("fc2", nn.Linear(hidden, num_classes))
        elif name == "cnn":
            model = nn.Sequential()
            model.add_module("conv", nn.Conv2d(c, hidden // 4 or 1, 3, padding=1))
            model.add_module("act", nn.Tanh())
            model.add_module("pool", nn.AvgPool2d(2))
            model.add_module("flatten", nn.Flatten())
            model.add_module("fc", nn.Linear((hidden // 4 or 1) * (h // 2) * (w // 2), num_classes))
        else:
            raise ValueError(f"`model` must be one of {MODELS}, got {name!r}")
    finally:
        torch.random.set_rng_state(gen_state)
    return model.to(dtype)
