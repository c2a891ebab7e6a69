"""Bad or unusual inputs get a clear error naming the argument, or a documented result."""

import os

import pytest
import torch
from torch.utils.data import TensorDataset

from captum_sam import SAMInfluenceFunction, SAMTracInCP, train_sam
from captum_sam.core.errors import ArgumentError
from tests.helpers import ce_loss, make_data, mlp_model


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    data = make_data(n=24, seed=4)
    x, y = data.tensors
    train = TensorDataset(x[:20], y[:20])
    model = mlp_model()
    out = tmp_path_factory.mktemp("inputs") / "r"
    train_sam(model, train, ce_loss(), epochs=2, lr=0.3, rho=0.1, batch_size=5, record_dir=out)
    return dict(model=model, train=train, test=(x[20:], y[20:]), dir=out)


def estimators(run, train=None):
    train = run["train"] if train is None else train
    return [
        SAMTracInCP(run["model"], train, str(run["dir"]), loss_fn=ce_loss(), batch_size=5),
        SAMTracInCP.from_trajectory(run["model"], train, run["dir"], loss_fn=ce_loss()),
        SAMInfluenceFunction(
            run["model"], train, run["dir"], loss_fn=ce_loss(), batch_size=5, projection_dim=None
        ),
    ]


def test_an_empty_test_batch_gives_an_empty_result(run):
    x, y = run["test"]
    empty = (x[:0], y[:0])
    for est in estimators(run):
        assert est.influence(empty).shape == (0, 20)
        top = est.influence(empty, k=3)
        assert top.indices.shape == (0, 3) and top.influence_scores.shape == (0, 3)
    gif = estimators(run)[0]
    assert gif.self_influence(empty).shape == (0,)
    assert torch.equal(gif.influence(empty, aggregate=True), torch.zeros(1, 20, dtype=x.dtype))


def test_a_bad_label_in_a_later_training_batch_names_the_batch(run):
    x, y = run["train"].tensors
    y = y.clone()
    y[17] = 99  # batch 3 of 4 (batch size 5): the first batch, the one validated, is fine
    bad = TensorDataset(x, y)
    gif = SAMTracInCP(run["model"], bad, str(run["dir"]), loss_fn=ce_loss(), batch_size=5, rho=0.0)
    with pytest.raises(ValueError, match="`train_dataset` batch 3"):
        gif.influence(run["test"])
    with pytest.raises(ValueError, match="`train_dataset` batch 3"):
        gif.self_influence()
    with pytest.raises(ValueError, match="`train_dataset` batch 3"):  # its mean gradient
        SAMInfluenceFunction(run["model"], bad, run["dir"], loss_fn=ce_loss(), batch_size=5)
    with pytest.raises(ValueError, match="`train_dataset` batch 3"):  # rho > 0: its eps
        SAMTracInCP(
            run["model"], bad, str(run["dir"]), loss_fn=ce_loss(), batch_size=5
        ).self_influence()


def test_layers_as_a_bare_string_is_refused(run):
    for cls_args in (
        lambda: SAMTracInCP(run["model"], run["train"], str(run["dir"]), layers="fc2"),
        lambda: SAMInfluenceFunction(run["model"], run["train"], run["dir"], layers="fc2"),
    ):
        with pytest.raises(ArgumentError, match=r"\['fc2'\]"):
            cls_args()


def test_user_forward_hooks_run_on_the_private_copy_as_documented(run):
    """Hooks are copied with the model and fire during attribution; the user's never do."""
    calls = []
    handle = run["model"].fc1.register_forward_hook(lambda m, a, o: calls.append(m))
    try:
        est = SAMTracInCP(
            run["model"], run["train"], str(run["dir"]), loss_fn=ce_loss(), batch_size=5
        )
        est.influence(run["test"])
    finally:
        handle.remove()
    mine = run["model"].fc1
    assert calls and all(m is not mine for m in calls)  # the copy ran it, never the user's module
    assert all(m is est.engines.loader.scratch.fc1 for m in calls)


def test_the_directory_of_a_record_can_be_listed_without_temporaries(run):
    assert not [f for f in os.listdir(run["dir"]) if f.startswith(".tmp")]
