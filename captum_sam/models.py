"""Reference models for the bundled experiments: logistic regression, MLP, CNNs, ResNet-18.

:func:`build_model` builds each by name with seeded initial weights. The ResNet-18
(:class:`ResNet18`) is written here in torch alone, so that it runs on installs without
torchvision; its parameter names are torchvision's, so a torchvision ``resnet18``
whose stem is changed the same way loads its ``state_dict``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["build_model", "training_dtype", "MODELS", "ResNet18", "BasicBlock"]

MODELS = ("logreg", "mlp", "cnn", "convnet", "resnet18")


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with BatchNorm and a shortcut (He et al., 2016).

    The shortcut is the identity, or a strided 1x1 convolution with BatchNorm
    (``downsample``) when the block changes the resolution or the channel count.

    Args:
        in_planes: Input channels.
        planes: Output channels.
        stride: Stride of the first convolution (and of the shortcut).
    """

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: Tensor) -> Tensor:
        """``(B, in_planes, H, W)`` -> ``(B, planes, H / stride, W / stride)``."""
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu(out + shortcut)


class ResNet18(nn.Module):
    """ResNet-18 with a stem for 32x32 images (as used for CIFAR).

    The ImageNet ResNet-18 of He et al. (2016) with its stem replaced: a 3x3 stride-1
    first convolution and no max-pool, so a 32x32 input keeps its resolution until
    ``layer2``. Four stages of two :class:`BasicBlock` each (``[2, 2, 2, 2]``) with
    ``width``, 2, 4 and 8 times ``width`` channels, global average pooling and a
    linear head ``fc``. Convolutions are initialised as torchvision does (Kaiming
    normal, ``fan_out``), BatchNorm with weight 1 and bias 0. 11.2 million parameters
    for ``width=64`` and 10 classes.

    Args:
        in_channels: Channels of the input images.
        num_classes: Number of output logits.
        width: Channels of the stem and of ``layer1`` (64 in the standard network).
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 10, width: int = 64) -> None:
        super().__init__()
        if width < 1 or in_channels < 1 or num_classes < 1:
            raise ValueError(
                f"`width`, `in_channels` and `num_classes` must be >= 1, got {width}, "
                f"{in_channels}, {num_classes}"
            )
        self.conv1 = nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        planes = [width, 2 * width, 4 * width, 8 * width]
        self.layer1 = self._stage(width, planes[0], stride=1)
        self.layer2 = self._stage(planes[0], planes[1], stride=2)
        self.layer3 = self._stage(planes[1], planes[2], stride=2)
        self.layer4 = self._stage(planes[2], planes[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(planes[3], num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    @staticmethod
    def _stage(in_planes: int, planes: int, stride: int) -> nn.Sequential:
        return nn.Sequential(BasicBlock(in_planes, planes, stride), BasicBlock(planes, planes, 1))

    def forward(self, x: Tensor) -> Tensor:
        """Images ``(B, in_channels, H, W)`` -> logits ``(B, num_classes)``."""
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.fc(torch.flatten(self.avgpool(out), 1))


def training_dtype(name: str) -> torch.dtype:
    """The dtype ``captum-sam`` trains model ``name`` in: float32 for ``resnet18``, else float64.

    Float64 convolutions through ResNet-18's 11 million parameters are several times
    slower on a CPU; the small models keep float64, in which the estimators are checked.
    """
    if name not in MODELS:
        raise ValueError(f"`model` must be one of {MODELS}, got {name!r}")
    return torch.float32 if name == "resnet18" else torch.float64


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
            (one tanh hidden layer), ``"cnn"`` (one ``hidden // 4``-channel 3x3
            convolution, tanh, 2x2 average pooling, linear head), ``"convnet"`` (one
            ``hidden``-channel 3x3 convolution, ReLU, 2x2 max-pooling, linear head:
            82,826 parameters on 3x32x32 images with the default ``hidden=32``) or
            ``"resnet18"`` (:class:`ResNet18`, standard widths; ``hidden`` is not used).
        image_shape: ``(channels, height, width)`` of one input.
        num_classes: Number of output logits.
        hidden: Hidden units (MLP) or channels (CNNs).
        seed: Seed of the initial weights (the global random state is left as it was).
        dtype: Parameter dtype. ``captum-sam`` trains ``resnet18`` in float32 (float64
            convolutions are several times slower on a CPU) and every other model in
            float64.

    Returns:
        The model; layers are named ``fc1``/``fc2`` (MLP), ``linear`` (logreg),
        ``conv``/``fc`` (the CNNs), as torchvision names them (ResNet-18: ``conv1``,
        ``layer1.0.conv1``, ..., ``fc``), for use with ``layers=``.
    """
    if name not in MODELS:
        raise ValueError(f"`model` must be one of {MODELS}, got {name!r}")
    c, h, w = image_shape
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        if name == "resnet18":
            return ResNet18(c, num_classes).to(dtype)
        model = nn.Sequential()
        if name == "logreg":
            model.add_module("flatten", nn.Flatten())
            model.add_module("linear", nn.Linear(c * h * w, num_classes))
        elif name == "mlp":
            model.add_module("flatten", nn.Flatten())
            model.add_module("fc1", nn.Linear(c * h * w, hidden))
            model.add_module("act", nn.Tanh())
            model.add_module("fc2", nn.Linear(hidden, num_classes))
        elif name == "cnn":
            model.add_module("conv", nn.Conv2d(c, hidden // 4 or 1, 3, padding=1))
            model.add_module("act", nn.Tanh())
            model.add_module("pool", nn.AvgPool2d(2))
            model.add_module("flatten", nn.Flatten())
            model.add_module("fc", nn.Linear((hidden // 4 or 1) * (h // 2) * (w // 2), num_classes))
        else:  # convnet
            model.add_module("conv", nn.Conv2d(c, hidden, 3, padding=1))
            model.add_module("act", nn.ReLU())
            model.add_module("pool", nn.MaxPool2d(2))
            model.add_module("flatten", nn.Flatten())
            model.add_module("fc", nn.Linear(hidden * (h // 2) * (w // 2), num_classes))
    finally:
        torch.random.set_rng_state(gen_state)
    return model.to(dtype)
