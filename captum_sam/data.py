"""Data sets that need no download: scikit-learn's digits, and planted label noise.

Torchvision's MNIST and CIFAR-10 are supported from files already on disk
(:func:`load_torchvision`); nothing is ever downloaded.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.data import TensorDataset

__all__ = ["SplitData", "load_digits_data", "plant_label_noise", "load_torchvision"]


@dataclass
class SplitData:
    """Train / validation / test splits with the record of planted label noise.

    Attributes:
        train: ``TensorDataset(features, labels)`` with the (possibly noisy) labels.
        val: Validation split (clean labels).
        test: Test split (clean labels).
        noisy: Bool mask ``(n_train,)`` of training examples whose label was flipped.
        clean_labels: The true training labels ``(n_train,)``.
        image_shape: ``(channels, height, width)`` of one example.
        num_classes: Number of classes.
        name: Data set name.
    """

    train: TensorDataset
    val: TensorDataset
    test: TensorDataset
    noisy: Tensor
    clean_labels: Tensor
    image_shape: tuple[int, int, int]
    num_classes: int
    name: str


def plant_label_noise(
    labels: Tensor, fraction: float, num_classes: int, seed: int = 0
) -> tuple[Tensor, Tensor]:
    """Flip the labels of a random ``fraction`` of examples to another class.

    Args:
        labels: Integer labels ``(n,)``.
        fraction: Fraction of examples to corrupt, in ``[0, 1)``.
        num_classes: Number of classes.
        seed: Seed of the choice of examples and of the wrong classes.

    Returns:
        ``(noisy_labels, mask)``: every flipped label differs from the original.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"`noise` fraction must be in [0, 1), got {fraction}")
    g = torch.Generator().manual_seed(seed)
    n = labels.shape[0]
    k = int(round(fraction * n))
    chosen = torch.randperm(n, generator=g)[:k]
    shift = torch.randint(1, num_classes, (k,), generator=g)
    noisy = labels.clone()
    noisy[chosen] = (labels[chosen] + shift) % num_classes
    mask = torch.zeros(n, dtype=torch.bool)
    mask[chosen] = True
    return noisy, mask


def _assemble(
    train: tuple[Tensor, Tensor],
    val: tuple[Tensor, Tensor],
    test: tuple[Tensor, Tensor],
    noise: float,
    seed: int,
    num_classes: int,
    name: str,
) -> SplitData:
    noisy_y, mask = plant_label_noise(train[1], noise, num_classes, seed + 1)
    return SplitData(
        train=TensorDataset(train[0], noisy_y),
        val=TensorDataset(*val),
        test=TensorDataset(*test),
        noisy=mask,
        clean_labels=train[1].clone(),
        image_shape=tuple(train[0].shape[1:]),  # type: ignore[arg-type]
        num_classes=num_classes,
        name=name,
    )


def _check_sizes(sizes: dict[str, int], available: int, name: str) -> None:
    for arg, value in sizes.items():
        if value < 1:
            raise ValueError(f"`{arg}` must be >= 1, got {value}")
    if sum(sizes.values()) > available:
        raise ValueError(
            f"{' + '.join(sizes)} = {sum(sizes.values())} exceeds the {available} "
            f"examples of {name}"
        )


def load_digits_data(
    n_train: int = 1000,
    n_val: int = 300,
    n_test: int | None = None,
    noise: float = 0.0,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
) -> SplitData:
    """Scikit-learn's bundled 8x8 digits (1797 images), split and optionally noised.

    Features are pixel intensities scaled to ``[0, 1]``, shape ``(1, 8, 8)``.

    Args:
        n_train: Training examples.
        n_val: Validation examples.
        n_test: Test examples (default: the rest).
        noise: Fraction of training labels flipped to another class.
        seed: Seed of the split and of the noise.
        dtype: Floating dtype of the features.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images / 16.0, dtype=dtype).unsqueeze(1)
    y = torch.tensor(digits.target, dtype=torch.long)
    n = x.shape[0]
    n_test = n - n_train - n_val if n_test is None else n_test
    _check_sizes({"n_train": n_train, "n_val": n_val, "n_test": n_test}, n, "digits")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    cut = [n_train, n_train + n_val, n_train + n_val + n_test]
    tr, va, te = perm[: cut[0]], perm[cut[0] : cut[1]], perm[cut[1] : cut[2]]
    return _assemble((x[tr], y[tr]), (x[va], y[va]), (x[te], y[te]), noise, seed, 10, "digits")


def load_torchvision(
    name: str,
    data_dir: str | os.PathLike[str],
    n_train: int = 1000,
    n_val: int = 300,
    n_test: int = 1000,
    noise: float = 0.0,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
) -> SplitData:
    """MNIST or CIFAR-10 from torchvision files already in ``data_dir`` (no download).

    Args:
        name: ``"mnist"`` or ``"cifar10"``.
        data_dir: The ``root`` given to the torchvision data set.
        n_train: Training examples (drawn from the official training split).
        n_val: Validation examples (also from the training split).
        n_test: Test examples (from the official test split).
        noise: Fraction of training labels flipped.
        seed: Seed of the subsets and noise.
        dtype: Floating dtype of the features.

    Raises:
        FileNotFoundError: The files are not there; the message names what is
            expected.
    """
    try:
        import torchvision
    except ImportError as err:  # pragma: no cover - depends on the install
        raise ImportError("--data-dir needs torchvision: pip install 'captum-sam[vision]'") from err
    name = name.lower()
    classes = {"mnist": torchvision.datasets.MNIST, "cifar10": torchvision.datasets.CIFAR10}
    if name not in classes:
        raise ValueError(f"`name` must be one of {sorted(classes)}, got {name!r}")
    root = os.fspath(data_dir)
    expected = {
        "mnist": os.path.join(root, "MNIST", "raw", "train-images-idx3-ubyte"),
        "cifar10": os.path.join(root, "cifar-10-batches-py", "data_batch_1"),
    }[name]
    if not os.path.exists(expected) and not os.path.exists(expected + ".gz"):
        raise FileNotFoundError(
            f"{name} files not found under --data-dir {root!r}: expected {expected!r} "
            "(the layout torchvision writes with download=True; nothing is downloaded "
            "here)"
        )
    sets = [classes[name](root, train=flag, download=False) for flag in (True, False)]

    def tensors(ds: object) -> tuple[Tensor, Tensor]:
        data = torch.as_tensor(ds.data)  # type: ignore[attr-defined]
        x = data.to(dtype) / 255.0
        x = x.unsqueeze(1) if x.dim() == 3 else x.permute(0, 3, 1, 2)
        return x, torch.as_tensor(ds.targets, dtype=torch.long)  # type: ignore[attr-defined]

    (x_tr, y_tr), (x_te, y_te) = tensors(sets[0]), tensors(sets[1])
    _check_sizes({"n_train": n_train, "n_val": n_val}, x_tr.shape[0], name + " train")
    _check_sizes({"n_test": n_test}, x_te.shape[0], name + " test")
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(x_tr.shape[0], generator=g)[: n_train + n_val]
    tr, va = pick[:n_train], pick[n_train:]
    te = torch.randperm(x_te.shape[0], generator=g)[:n_test]
    return _assemble(
        (x_tr[tr], y_tr[tr]), (x_tr[va], y_tr[va]), (x_te[te], y_te[te]), noise, seed, 10, name
    )
