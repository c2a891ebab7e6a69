"""The reference models: shapes, parameter counts, torchvision's ResNet-18, seeded init."""

import pytest
import torch
from torch import nn

from captum_sam.models import MODELS, ResNet18, build_model, training_dtype


def n_params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", MODELS)
def test_every_model_maps_images_to_logits(name):
    dtype = training_dtype(name)
    model = build_model(name, (3, 32, 32), 10, dtype=dtype)
    out = model(torch.rand(2, 3, 32, 32, dtype=dtype))
    assert out.shape == (2, 10) and out.dtype == dtype


def test_convnet_parameter_count_in_closed_form():
    # conv: 3 -> 32 channels, 3x3 kernels + bias; fc: 32 x 16 x 16 features -> 10 + bias
    expected = (3 * 9 * 32 + 32) + (32 * 16 * 16 * 10 + 10)
    assert n_params(build_model("convnet", (3, 32, 32), 10)) == expected == 82_826
    assert build_model("convnet", (3, 32, 32), 10).conv.weight.shape == (32, 3, 3, 3)


def test_resnet18_keeps_32x32_resolution_until_layer2():
    model = ResNet18(3, 10, width=8).double().eval()
    seen = {}
    for name in ("layer1", "layer2", "layer3", "layer4"):
        getattr(model, name).register_forward_hook(
            lambda m, i, o, name=name: seen.__setitem__(name, tuple(o.shape[1:]))
        )
    model(torch.rand(2, 3, 32, 32, dtype=torch.float64))
    assert seen == {
        "layer1": (8, 32, 32),
        "layer2": (16, 16, 16),
        "layer3": (32, 8, 8),
        "layer4": (64, 4, 4),
    }


def test_resnet18_equals_torchvision_with_the_same_stem():
    torchvision = pytest.importorskip("torchvision")
    ours = build_model("resnet18", (3, 32, 32), 10, seed=3, dtype=torch.float32)
    theirs = torchvision.models.resnet18(num_classes=10)
    theirs.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
    theirs.maxpool = nn.Identity()
    assert n_params(ours) == n_params(theirs) == 11_173_962
    theirs.load_state_dict(ours.state_dict(), strict=True)  # same names and shapes
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    ours.eval(), theirs.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x))


@pytest.mark.parametrize("name", ["convnet", "resnet18"])
def test_seeded_init_is_reproducible_and_leaves_the_global_rng_alone(name):
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    a = build_model(name, (3, 32, 32), 10, seed=5)
    b = build_model(name, (3, 32, 32), 10, seed=5)
    c = build_model(name, (3, 32, 32), 10, seed=6)
    assert torch.equal(torch.random.get_rng_state(), state)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa if sa[k].is_floating_point())


def test_unknown_model_names_are_refused():
    with pytest.raises(ValueError, match="`model` must be one of"):
        build_model("vgg", (3, 32, 32), 10)
    with pytest.raises(ValueError, match="`model` must be one of"):
        training_dtype("vgg")
