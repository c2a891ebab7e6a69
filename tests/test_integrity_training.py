"""train_sam, replay_trajectory and sam_fixed_point: loss shapes, NaN guards, train/eval flags."""

import copy
import dataclasses
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from captum_sam import load_trajectory, replay_trajectory, train_sam
from captum_sam.evaluation import GroundTruth, sam_fixed_point
from tests.helpers import (
    assert_unchanged,
    bn_model,
    ce_loss,
    linear_model,
    make_data,
    make_regression_data,
    mlp_model,
    mse_per_example,
    snapshot,
)

ARGS = dict(epochs=2, lr=0.2, rho=0.1, batch_size=4, seed=0)


def mean_ce(outputs, labels):
    """A plain function returning the batch *mean*: no `reduction` attribute to check."""
    return F.cross_entropy(outputs, labels)


def flags(model):
    return [m.training for m in model.modules()]


@pytest.fixture(scope="module")
def record(tmp_path_factory):
    out = tmp_path_factory.mktemp("rec") / "r"
    train_sam(mlp_model(), make_data(n=12), ce_loss(), **ARGS, record_dir=out)
    return load_trajectory(out)


# ----------------------------------------------------------------------- loss shape


def test_train_sam_refuses_a_mean_loss_before_any_update():
    model = mlp_model()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"`loss_fn` returned \(\) for a batch of 4 examples"):
        train_sam(model, make_data(n=12), mean_ce, **ARGS)
    assert_unchanged(model, before)
    # the same loss written per example trains exactly as nn.CrossEntropyLoss does
    ref = train_sam(mlp_model(), make_data(n=12), ce_loss(), **ARGS)
    got = train_sam(
        mlp_model(), make_data(n=12), lambda o, y: F.cross_entropy(o, y, reduction="none"), **ARGS
    )
    assert got.epoch_losses == ref.epoch_losses and got.epoch_losses[0] > 0.5


def test_replay_and_fixed_point_refuse_a_mean_loss(record):
    template = mlp_model(seed=5)
    before = snapshot(template)
    with pytest.raises(ValueError, match="`loss_fn` returned"):
        replay_trajectory(template, make_data(n=12), mean_ce, record, remove=[3])
    with pytest.raises(ValueError, match=r"`loss_fn` returned \(\) for a batch of 12"):
        sam_fixed_point(template, make_data(n=12), mean_ce, 0.1, 0.1)
    assert_unchanged(template, before)


def test_trailing_loss_dimensions_are_summed_also_with_removed_examples(tmp_path):
    data = make_regression_data(n=12, d=4, out=2)

    def squared(o, t):  # (B, 2): one loss per example and output
        return (o - t) ** 2

    a = train_sam(mlp_model(d=4, classes=2), data, squared, **ARGS, record_dir=tmp_path / "a")
    b = train_sam(mlp_model(d=4, classes=2), data, mse_per_example, **ARGS)
    torch.testing.assert_close(a.epoch_losses, b.epoch_losses, rtol=1e-12, atol=0)
    for p, q in zip(a.model.parameters(), b.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)
    # replay with weights (B,) on (B, 2) losses: the per-example sums are weighted
    got = replay_trajectory(mlp_model(d=4, classes=2), data, squared, a.record_dir, remove=[1, 6])
    ref = replay_trajectory(
        mlp_model(d=4, classes=2), data, mse_per_example, a.record_dir, remove=[1, 6]
    )
    for p, q in zip(got.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


# ----------------------------------------------------------------------- NaN / inf


def test_nan_features_raise_naming_the_step():
    x, y = make_data(n=12).tensors
    x = x.clone()
    x[7, 2] = float("nan")
    order = torch.randperm(12, generator=torch.Generator().manual_seed(0))
    step = int((order == 7).nonzero()) // 4
    model = mlp_model()
    with pytest.raises(ValueError, match=rf"epoch 0, step {step} \(at the weights w\)"):
        train_sam(model, TensorDataset(x, y), ce_loss(), **ARGS)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_nan_in_every_example_leaves_the_model_untouched():
    x, y = make_data(n=12).tensors
    model = mlp_model()
    before = snapshot(model)
    with pytest.raises(ValueError, match="loss is nan at train_sam epoch 0, step 0"):
        train_sam(model, TensorDataset(torch.full_like(x, float("nan")), y), ce_loss(), **ARGS)
    assert_unchanged(model, before)


def test_nan_gradient_with_a_finite_loss_is_refused():
    def singular(o, y):  # finite value, NaN gradient (0 * d sqrt(0))
        return ce_loss()(o, y) + 0.0 * torch.sqrt((o - o.detach()).abs()).sum(1)

    model = mlp_model()
    before = snapshot(model)
    with pytest.raises(ValueError, match="gradients contain NaN or inf at train_sam epoch 0"):
        train_sam(model, make_data(n=12), singular, **ARGS)
    assert_unchanged(model, before)


def test_failure_at_the_perturbed_weights_restores_w():
    calls = []

    def nan_at_second_pass(o, y):
        calls.append(1)
        losses = ce_loss()(o, y)
        return losses * float("nan") if len(calls) == 2 else losses

    model = mlp_model()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"step 0 \(at the SAM-perturbed weights w \+ eps\)"):
        train_sam(model, make_data(n=12), nan_at_second_pass, **ARGS)
    assert_unchanged(model, before)  # not left at w + eps


def test_replay_and_fixed_point_refuse_nan(record):
    x, y = make_data(n=12).tensors
    x = x.clone()
    x[record.steps[2].indices[0]] = float("nan")
    bad = TensorDataset(x, y)
    with pytest.raises(ValueError, match="not the training set"):  # recorded by content
        replay_trajectory(mlp_model(), bad, ce_loss(), record)
    unchecked = dataclasses.replace(record, data=None)  # a record without the data's hash
    with pytest.raises(ValueError, match=r"loss is nan at replay_trajectory step 2 \(epoch 0\)"):
        replay_trajectory(mlp_model(), bad, ce_loss(), unchecked)
    with pytest.raises(ValueError, match="residual F\\(w\\) is nan at Newton iteration 0"):
        sam_fixed_point(linear_model(), bad, ce_loss(), 0.1, 0.1)


# ----------------------------------------------------------------------- train/eval flags


def recording(loss, model, seen):
    def loss_fn(o, y):
        seen.append(flags(model))
        return loss(o, y)

    return loss_fn


def frozen_bn():
    model = bn_model()
    model.train()
    model.bn.eval()  # the user froze the BatchNorm's statistics
    return model


def test_a_frozen_batchnorm_stays_frozen_during_and_after_training():
    model = frozen_bn()
    stats = {k: v.clone() for k, v in model.bn.named_buffers()}
    before = flags(model)
    seen = []
    train_sam(model, make_data(n=12), recording(ce_loss(), model, seen), **ARGS)
    for k, v in stats.items():
        assert torch.equal(dict(model.bn.named_buffers())[k], v), f"running statistic {k} moved"
    assert flags(model) == before
    names = [n for n, _ in model.named_modules()]
    assert all(dict(zip(names, f))["bn"] is False for f in seen)
    assert all(all(t for n, t in zip(names, f) if n != "bn") for f in seen)


def test_replay_keeps_the_templates_frozen_module_and_reproduces_training(tmp_path):
    model = frozen_bn()
    template = copy.deepcopy(model)
    result = train_sam(model, make_data(n=12), ce_loss(), **ARGS, record_dir=tmp_path / "r")
    replica = replay_trajectory(template, make_data(n=12), ce_loss(), result.record_dir)
    assert flags(replica) == flags(template)
    for (n, p), q in zip(model.state_dict().items(), replica.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=n)


def test_a_model_in_eval_mode_trains_in_train_mode_and_comes_back_as_it_was():
    model = bn_model()
    model.eval()
    model.act.train()  # a flag of the user's that must survive
    before = snapshot(model)
    seen = []
    train_sam(model, make_data(n=12), recording(ce_loss(), model, seen), **ARGS)
    assert seen and all(all(f) for f in seen)  # nothing was frozen: all in train mode
    assert flags(model) == before["training"]


@pytest.mark.parametrize("setup", ["frozen_bn", "eval_with_a_train_child"])
def test_an_error_mid_training_restores_every_flag(setup):
    model = frozen_bn() if setup == "frozen_bn" else bn_model().eval()
    if setup != "frozen_bn":
        model.act.train()
    before = flags(model)
    calls = []

    def boom(o, y):
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("boom")
        return ce_loss()(o, y)

    with pytest.raises(RuntimeError, match="boom"):
        train_sam(model, make_data(n=12), boom, **ARGS)
    assert flags(model) == before


def test_fixed_point_and_ground_truth_keep_each_modules_flag():
    data = make_data(n=12)
    model = frozen_bn()
    before = snapshot(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tol may not be reached: flags are the point
        result = sam_fixed_point(model, data, ce_loss(), 0.1, 0.1, max_iter=2)
        assert flags(result.model) == before["training"]
        gt = GroundTruth(model, data, ce_loss(), "fixed_point", rho=0.1, weight_decay=0.1, tol=1)
        gt.evaluate([[0]], make_data(n=5, seed=1).tensors)
    assert_unchanged(model, before)
    with pytest.raises(ValueError, match="`loss_fn`"):
        sam_fixed_point(model, data, mean_ce, 0.1, 0.1)
    assert_unchanged(model, before)
