"""The generated CIFAR-shaped data and the data sets by name."""

import pytest
import torch
from sklearn.linear_model import LogisticRegression

from captum_sam.data import SYNTHETIC_CIFAR_SIZE, load_dataset, load_synthetic_cifar
from captum_sam.evaluation import config


def test_shapes_dtype_and_range():
    data = load_synthetic_cifar(n_train=50, n_val=20, n_test=30, dtype=torch.float32)
    x, y = data.train.tensors
    assert x.shape == (50, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.long
    assert data.val.tensors[0].shape == (20, 3, 32, 32)
    assert data.test.tensors[0].shape == (30, 3, 32, 32)
    assert data.image_shape == (3, 32, 32) and data.num_classes == 10
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    assert float(x.std()) > 0.05  # not a constant image


@pytest.mark.parametrize("n", [10, 57, 300])
def test_classes_are_balanced_in_every_split(n):
    data = load_synthetic_cifar(n_train=n, n_val=n, n_test=n)
    for split in (data.train, data.val, data.test):
        counts = torch.bincount(split.tensors[1], minlength=10)
        assert int(counts.max() - counts.min()) <= 1 and int(counts.sum()) == n


def test_deterministic_per_seed_and_the_test_set_does_not_depend_on_n_train():
    a = load_synthetic_cifar(n_train=40, n_val=10, n_test=20, seed=1)
    b = load_synthetic_cifar(n_train=40, n_val=10, n_test=20, seed=1)
    c = load_synthetic_cifar(n_train=40, n_val=10, n_test=20, seed=2)
    d = load_synthetic_cifar(n_train=80, n_val=10, n_test=20, seed=1)
    for x, y in zip(a.train.tensors, b.train.tensors):
        assert torch.equal(x, y)
    assert not torch.equal(a.train.tensors[0], c.train.tensors[0])
    assert torch.equal(a.test.tensors[0], d.test.tensors[0])


def test_label_noise_is_planted_and_recorded():
    data = load_synthetic_cifar(n_train=100, n_val=10, n_test=10, noise=0.2)
    assert int(data.noisy.sum()) == 20
    given = data.train.tensors[1]
    assert bool((given[data.noisy] != data.clean_labels[data.noisy]).all())
    assert torch.equal(given[~data.noisy], data.clean_labels[~data.noisy])


def test_a_logistic_regression_learns_it_well_above_chance():
    data = load_synthetic_cifar(n_train=300, n_val=10, n_test=200)
    x, y = data.train.tensors
    xt, yt = data.test.tensors
    clf = LogisticRegression(max_iter=100).fit(x.flatten(1).numpy(), y.numpy())
    assert clf.score(xt.flatten(1).numpy(), yt.numpy()) > 0.5  # chance is 0.1


def test_sizes_are_checked():
    with pytest.raises(ValueError, match="exceeds the 10000 examples of synthetic-cifar"):
        load_synthetic_cifar(n_train=9000, n_val=500, n_test=501)
    with pytest.raises(ValueError, match="`n_val` must be >= 1"):
        load_synthetic_cifar(n_val=0)


def test_the_torch_free_settings_agree_with_the_data_module():
    assert config.SYNTHETIC_CIFAR_SIZE == SYNTHETIC_CIFAR_SIZE
    data = load_dataset("synthetic-cifar", n_train=5, n_val=5)
    assert len(data.test) == config.default_n_test("synthetic-cifar")
    assert data.image_shape == config.IMAGE_SHAPES["synthetic-cifar"]
    digits = load_dataset("digits", n_train=5, n_val=5, n_test=5)
    assert digits.image_shape == config.IMAGE_SHAPES["digits"] and digits.name == "digits"


def test_load_dataset_names_what_is_missing():
    with pytest.raises(ValueError, match="needs `data_dir`"):
        load_dataset("mnist")
    with pytest.raises(ValueError, match="must be one of digits, synthetic-cifar"):
        load_dataset("imagenet")
