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
        wide = est.influence(empty, k=50)  # as wide as any batch's: min(k, n_train)
        assert (
            wide.indices.shape == (0, 20) == est.influence((x[:1], y[:1]), k=50).indices[:0].shape
        )
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


# ------------------------------------------------ broadcast losses, checkpoints, flags


def _regression(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(16, 5, dtype=torch.float64)
    model = torch.nn.Linear(5, 1).double()
    ckpt = str(tmp_path / "w.pt")
    torch.save(model.state_dict(), ckpt)
    return model, x, x.sum(1), ckpt


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_labels_broadcast_against_the_outputs_are_refused(tmp_path, reduction):
    model, x, y, ckpt = _regression(tmp_path)
    mse = torch.nn.MSELoss(reduction=reduction)
    wise = reduction != "none"
    good = SAMTracInCP(
        model, TensorDataset(x, y[:, None]), [ckpt], loss_fn=mse, batch_size=8,
        sample_wise_grads_per_batch=wise,
    )  # fmt: skip
    assert good.influence((x[:3], y[:3, None])).shape == (3, 16)
    with pytest.raises(ValueError, match="train_dataset.*shape") as err:  # (8, 1) vs (8,)
        SAMTracInCP(
            model, TensorDataset(x, y), [ckpt], loss_fn=mse, batch_size=8,
            sample_wise_grads_per_batch=wise,
        ).influence((x[:3], y[:3]))  # fmt: skip
    assert "labels" in str(err.value)
    if reduction == "none":
        with pytest.raises(ValueError, match=r"\(8, 8\)"):
            train_sam(model, TensorDataset(x, y), mse, epochs=1, lr=0.01, rho=0.05, batch_size=8)


def test_a_custom_loss_that_reshapes_its_labels_is_accepted(tmp_path):
    model, x, y, ckpt = _regression(tmp_path)

    def loss(out, lab):  # outputs (B, 1), labels (B,): no broadcast inside
        return (out.squeeze(1) - lab) ** 2

    est = SAMTracInCP(model, TensorDataset(x, y), [ckpt], loss_fn=loss, batch_size=8)
    ref = SAMTracInCP(
        model, TensorDataset(x, y[:, None]), [ckpt], loss_fn=torch.nn.MSELoss(reduction="none"),
        batch_size=8,
    )  # fmt: skip
    torch.testing.assert_close(est.influence((x[:3], y[:3])), ref.influence((x[:3], y[:3, None])))


def test_a_checkpoint_that_does_not_fit_leaves_the_model_untouched(tmp_path):
    from captum_sam import checkpoints_load_func, load_checkpoint

    model = mlp_model()
    other = mlp_model()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    state = other.state_dict()
    last = list(state)[-1]
    cases = {
        "lacks": {k: v for k, v in state.items() if k != last},
        "does not have": {**state, "extra.weight": torch.zeros(2)},
        "other shapes": {**state, last: torch.zeros(3, 7)},
    }
    for words, bad in cases.items():
        for layout in (bad, {"model_state": bad, "learning_rate": 0.1, "step": 2}):
            path = str(tmp_path / "c.pt")
            torch.save(layout, path)
            before = {k: v.clone() for k, v in model.state_dict().items()}
            with pytest.raises(ValueError, match=f"c.pt.*{words}"):
                checkpoints_load_func(model, path)
            for k, v in model.state_dict().items():
                assert torch.equal(v, before[k]), (words, k)
    fields = {
        "holds no parameters": {"model_state": "weights", "learning_rate": 0.1},
        "not a state dict": {"model_state": {"w": [1, 2]}, "learning_rate": 0.1},
        "'step'": {"model_state": state, "learning_rate": 0.1, "step": -5.5},
    }
    for words, bad in fields.items():
        path = str(tmp_path / "f.pt")
        torch.save(bad, path)
        with pytest.raises(ValueError, match=f"f.pt.*{words}"):
            load_checkpoint(path)


def test_accuracy_restores_every_sub_module_flag():
    from captum_sam.evaluation.metrics import accuracy

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.5), torch.nn.Linear(4, 3))
    model.train()
    model[1].eval()  # a user's choice
    flags = [m.training for m in model.modules()]
    accuracy(model, (torch.randn(6, 4), torch.zeros(6, dtype=torch.long)))
    assert [m.training for m in model.modules()] == flags


# ------------------------------------------------ rho from the record, warned losses


def test_rho_and_adaptive_default_to_the_recorded_runs(run, tmp_path):
    from captum_sam import SAMArnoldiInfluenceFunction, SAMTracInCPFast
    from captum_sam.trajectory import DEFAULT_RHO

    kw = dict(loss_fn=ce_loss(), batch_size=5)
    fast_kw = dict(loss_fn=torch.nn.CrossEntropyLoss(reduction="sum"), batch_size=5)
    made = [
        SAMTracInCP(run["model"], run["train"], str(run["dir"]), **kw),
        SAMTracInCPFast(run["model"], "fc2", run["train"], str(run["dir"]), **fast_kw),
        SAMInfluenceFunction(run["model"], run["train"], run["dir"], projection_dim=None, **kw),
        SAMArnoldiInfluenceFunction(run["model"], run["train"], run["dir"], **kw),
    ]
    for est in made:  # the run was trained at rho 0.1, SAM
        assert (est.rho, est.adaptive) == (0.1, False), type(est).__name__
    # the record's rho gives the scores of rho=0.1 given explicitly
    given = SAMTracInCP(run["model"], run["train"], str(run["dir"]), rho=0.1, **kw)
    torch.testing.assert_close(made[0].influence(run["test"]), given.influence(run["test"]))
    with pytest.warns(UserWarning, match=r"`rho`=0.3 differs from the \[0.1\] recorded") as got:
        est = SAMTracInCP(run["model"], run["train"], str(run["dir"]), rho=0.3, **kw)
    assert got[0].filename == __file__  # the warning names the caller's line
    assert est.rho == 0.3
    with pytest.warns(UserWarning, match="`adaptive`=True differs"):
        SAMInfluenceFunction(run["model"], run["train"], run["dir"], adaptive=True, **kw)
    # plain checkpoints carry no rho: the documented default
    ckpt = str(tmp_path / "plain.pt")
    torch.save(run["model"].state_dict(), ckpt)
    plain = SAMTracInCP(run["model"], run["train"], [ckpt], **kw)
    assert (plain.rho, plain.adaptive) == (DEFAULT_RHO, False) == (0.05, False)


def test_a_record_with_several_rhos_needs_rho_given(tmp_path):
    from torch.utils.data import DataLoader

    from captum_sam import SAM, IndexedDataset, TrajectoryRecorder

    data = make_data(n=12, seed=1)
    model = mlp_model()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    rec = TrajectoryRecorder(tmp_path / "r", model, opt, n_train=len(data), save_every=1)
    rec.start()
    for step, (idx, x, y) in enumerate(DataLoader(IndexedDataset(data), batch_size=6)):
        opt.param_groups[0]["rho"] = 0.05 * (step + 1)
        ce_loss()(model(x), y).mean().backward()
        opt.first_step(zero_grad=True)
        ce_loss()(model(x), y).mean().backward()
        opt.second_step(zero_grad=True)
        rec.record_step(idx, epoch=0)
    rec.finish()
    with pytest.raises(ValueError, match=r"`rho` is not given.*\[0.05, 0.1\]"):
        SAMTracInCP(model, data, str(tmp_path / "r"), loss_fn=ce_loss())
    est = SAMTracInCP(model, data, str(tmp_path / "r"), loss_fn=ce_loss(), rho=0.1)
    assert est.rho == 0.1  # given: used (a warning says the record differs)


def test_a_class_weighted_mean_loss_warns_that_its_weights_cancel(run):
    weighted = torch.nn.CrossEntropyLoss(weight=torch.rand(3, dtype=torch.float64) + 0.5)
    unweighted = torch.nn.CrossEntropyLoss(reduction="mean")
    kw = dict(sample_wise_grads_per_batch=True, batch_size=5, rho=0.0)
    with pytest.warns(UserWarning, match="class-weighted loss with reduction='mean'") as got:
        est = SAMTracInCP(run["model"], run["train"], str(run["dir"]), loss_fn=weighted, **kw)
    assert got[0].filename == __file__
    ref = SAMTracInCP(run["model"], run["train"], str(run["dir"]), loss_fn=unweighted, **kw)
    torch.testing.assert_close(est.influence(run["test"]), ref.influence(run["test"]))


def test_a_streamed_training_set_is_refused_by_name(run):
    from torch.utils.data import DataLoader, IterableDataset

    x, y = run["train"].tensors

    class Stream(IterableDataset):
        def __iter__(self):
            yield from zip(x, y)

    for data in (Stream(), DataLoader(Stream(), batch_size=5)):
        with pytest.raises(ValueError, match="`train_dataset` is an IterableDataset"):
            SAMTracInCP(run["model"], data, str(run["dir"]), loss_fn=ce_loss(), batch_size=5)
        with pytest.raises(ValueError, match="`train_dataset` is an IterableDataset"):
            SAMInfluenceFunction(run["model"], data, run["dir"], loss_fn=ce_loss(), batch_size=5)
