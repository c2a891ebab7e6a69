"""Data sets that need no download: scikit-learn's digits, a generated CIFAR-shaped set.

:func:`load_digits_data` splits scikit-learn's bundled 8x8 digits;
:func:`load_synthetic_cifar` generates a learnable stand-in for CIFAR-10 (3x32x32
images, 10 classes) from a seed; :func:`plant_label_noise` flips a fraction of the
training labels. Torchvision's MNIST and CIFAR-10 are supported from files already on
disk (:func:`load_torchvision`); nothing is ever downloaded.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.data import TensorDataset

__all__ = [
    "SplitData",
    "load_digits_data",
    "load_synthetic_cifar",
    "plant_label_noise",
    "load_torchvision",
    "load_dataset",
    "SYNTHETIC_CIFAR_SIZE",
]

SYNTHETIC_CIFAR_SIZE = 10_000
"""Most examples :func:`load_synthetic_cifar` generates for one split (train + val + test)."""


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


def load_synthetic_cifar(
    n_train: int = 1000,
    n_val: int = 300,
    n_test: int = 1000,
    noise: float = 0.0,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
) -> SplitData:
    r"""A generated, learnable stand-in for CIFAR-10: 3x32x32 images of 10 classes.

    Each class :math:`c` has a smooth colour template :math:`T_c` (a random 4x4 grid
    per channel, bilinearly upsampled to 32x32, unit standard deviation), the same for
    every seed. An example of class :math:`y` is

    .. math::
        x = \operatorname{clip}_{[0, 1]}\big(0.5 + 0.15\,(a\, \operatorname{shift}_{d}(T_y)
            + D + 0.5\, \xi)\big)

    with a contrast :math:`a \sim U(0.5, 1.5)`, a circular shift :math:`d` of up to
    3 pixels in each direction, a smooth class-independent distractor :math:`D`
    (drawn like a template) and white noise :math:`\xi`. A linear model learns it in
    part; a convolutional network, which can undo the shifts, learns it better. The
    classes are balanced within each split; train, validation and test are drawn from
    separate streams of the seed, so the test set does not depend on ``n_train``.
    Nothing is downloaded and torchvision is not needed.

    Args:
        n_train: Training examples.
        n_val: Validation examples.
        n_test: Test examples.
        noise: Fraction of training labels flipped to another class.
        seed: Seed of the examples and of the noise (the templates are fixed).
        dtype: Floating dtype of the features, shape ``(n, 3, 32, 32)``.

    Raises:
        ValueError: A size below 1, or more than :data:`SYNTHETIC_CIFAR_SIZE` examples
            in all.
    """
    sizes = {"n_train": n_train, "n_val": n_val, "n_test": n_test}
    _check_sizes(sizes, SYNTHETIC_CIFAR_SIZE, "synthetic-cifar")
    templates = _smooth_fields(10, torch.Generator().manual_seed(20240315))
    splits = [
        _synthetic_examples(templates, n, torch.Generator().manual_seed(seed + 1_000_003 * k))
        for k, n in enumerate(sizes.values())
    ]
    (x_tr, y_tr), val, test = [(x.to(dtype), y) for x, y in splits]
    return _assemble((x_tr, y_tr), val, test, noise, seed, 10, "synthetic-cifar")


def _smooth_fields(n: int, generator: torch.Generator) -> Tensor:
    """``(n, 3, 32, 32)`` random fields, smooth at a scale of 8 pixels, unit std each."""
    coarse = torch.randn(n, 3, 4, 4, generator=generator, dtype=torch.float64)
    fields = torch.nn.functional.interpolate(coarse, size=(32, 32), mode="bilinear")
    fields = fields - fields.mean(dim=(1, 2, 3), keepdim=True)
    return fields / fields.std(dim=(1, 2, 3), keepdim=True)


def _synthetic_examples(
    templates: Tensor, n: int, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """``n`` examples of :func:`load_synthetic_cifar`: float64 images and balanced labels."""
    labels = (torch.arange(n) % templates.shape[0])[torch.randperm(n, generator=generator)]
    contrast = 0.5 + torch.rand(n, 1, 1, 1, generator=generator, dtype=torch.float64)
    shift = torch.randint(-3, 4, (2, n), generator=generator)
    pixels = torch.arange(32)
    rows = (pixels - shift[0, :, None]) % 32  # (n, 32)
    cols = (pixels - shift[1, :, None]) % 32
    shifted = templates[
        labels[:, None, None, None],
        torch.arange(3)[None, :, None, None],
        rows[:, None, :, None],
        cols[:, None, None, :],
    ]
    distractor = _smooth_fields(n, generator)
    white = torch.randn(n, 3, 32, 32, generator=generator, dtype=torch.float64)
    images = 0.5 + 0.15 * (contrast * shifted + distractor + 0.5 * white)
    return images.clamp(0.0, 1.0), labels


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
    if not os.path.exists(expected):
        raise FileNotFoundError(
            f"{name} files not found under --data-dir {root!r}: expected {expected!r} "
            "(the layout torchvision writes with download=True, files extracted; nothing "
            "is downloaded here)"
        )

    def tensors(ds: object) -> tuple[Tensor, Tensor]:
        data = torch.as_tensor(ds.data)  # type: ignore[attr-defined]
        x = data.to(dtype) / 255.0
        x = x.unsqueeze(1) if x.dim() == 3 else x.permute(0, 3, 1, 2)
        y = torch.as_tensor(ds.targets, dtype=torch.long)  # type: ignore[attr-defined]
        if x.dim() != 4 or len(x) != len(y) or len(y) == 0:
            raise ValueError(f"{len(x)} images of shape {tuple(x.shape[1:])}, {len(y)} labels")
        if int(y.min()) < 0 or int(y.max()) > 9:
            raise ValueError(f"labels outside 0-9 (from {int(y.min())} to {int(y.max())})")
        return x, y

    try:  # files on disk are untrusted: any failure to read them is the data's
        sets = [classes[name](root, train=flag, download=False) for flag in (True, False)]
        (x_tr, y_tr), (x_te, y_te) = tensors(sets[0]), tensors(sets[1])
    except Exception as err:  # torchvision raises RuntimeError, AssertionError, IndexError...
        said = (str(err).splitlines() or [""])[0]
        said = said.replace(" You can use download=True to download it", "")  # not here
        raise ValueError(
            f"{name} files under --data-dir {root!r} could not be read (corrupt, truncated "
            f"or incomplete): {type(err).__name__}: {said} (nothing is downloaded here: put "
            "torchvision's extracted files there)"
        ) from err
    _check_sizes({"n_train": n_train, "n_val": n_val}, x_tr.shape[0], name + " train")
    _check_sizes({"n_test": n_test}, x_te.shape[0], name + " test")
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(x_tr.shape[0], generator=g)[: n_train + n_val]
    tr, va = pick[:n_train], pick[n_train:]
    te = torch.randperm(x_te.shape[0], generator=g)[:n_test]
    return _assemble(
        (x_tr[tr], y_tr[tr]), (x_tr[va], y_tr[va]), (x_te[te], y_te[te]), noise, seed, 10, name
    )


def load_dataset(
    name: str,
    data_dir: str | os.PathLike[str] | None = None,
    n_train: int = 1000,
    n_val: int = 300,
    n_test: int | None = None,
    noise: float = 0.0,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
) -> SplitData:
    """One of the data sets of ``captum-sam`` by name (what ``--dataset`` selects).

    Args:
        name: ``"digits"`` (:func:`load_digits_data`), ``"synthetic-cifar"``
            (:func:`load_synthetic_cifar`), ``"mnist"`` or ``"cifar10"``
            (:func:`load_torchvision`, from ``data_dir``).
        data_dir: The torchvision root of ``"mnist"`` and ``"cifar10"``.
        n_train: Training examples.
        n_val: Validation examples.
        n_test: Test examples; ``None``: the rest of digits, 200 of synthetic-cifar,
            1000 of MNIST/CIFAR-10.
        noise: Fraction of training labels flipped.
        seed: Seed of the split (or the generated examples) and of the noise.
        dtype: Floating dtype of the features.
    """
    if name == "digits":
        return load_digits_data(n_train, n_val, n_test, noise, seed, dtype)
    if name == "synthetic-cifar":
        n_test = 200 if n_test is None else n_test
        return load_synthetic_cifar(n_train, n_val, n_test, noise, seed, dtype)
    if name in ("mnist", "cifar10"):
        if data_dir is None:
            raise ValueError(f"dataset {name!r} needs `data_dir`, the folder of its files")
        n_test = 1000 if n_test is None else n_test
        return load_torchvision(name, data_dir, n_train, n_val, n_test, noise, seed, dtype)
    raise ValueError(f"`name` must be one of digits, synthetic-cifar, mnist, cifar10; got {name!r}")
