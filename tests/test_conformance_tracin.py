"""The SAM-GIF twins at ``rho=0`` against Captum's TracInCP, TracInCPFast, TracInCPFastRandProj.

Every twin gets the original model, every Captum class a deep copy; an autouse fixture
checks after every test that the original models (weights, ``requires_grad`` flags,
train/eval modes) are untouched. At ``rho > 0`` the fast twins are checked against a
brute-force float64 reference written with plain autograd.
"""

import os

import pytest
import torch
from captum.influence import TracInCP, TracInCPFast, TracInCPFastRandProj
from torch import nn
from torch.testing import assert_close
from torch.utils.data import DataLoader

from captum_sam import (
    ExactNearestNeighbors,
    SAMTracInCP,
    SAMTracInCPFast,
    SAMTracInCPFastRandProj,
)
from tests.conformance_common import (
    N_TEST,
    N_TRAIN,
    TIGHT,
    checkpoint_params,
    example_grads,
    loader,
    make_setting,
    sam_point,
    strip_lr_loader,
)
from tests.helpers import assert_unchanged, snapshot

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:captum\\.")

REDUCTIONS = [("none", False), ("sum", True), ("mean", True)]
TEST_LOSSES = {
    "ce": lambda r: nn.CrossEntropyLoss(reduction=r, label_smoothing=0.3),
    "mse": lambda r: nn.HuberLoss(reduction=r, delta=0.3),
}


@pytest.fixture(scope="module")
def settings(tmp_path_factory):
    root = tmp_path_factory.mktemp("tracin")
    return {
        "ce": make_setting(str(root / "ce")),
        "mse": make_setting(str(root / "mse"), loss="mse", seed=1),
        "packed": make_setting(str(root / "packed"), packed=True, seed=2),
        "lr": make_setting(str(root / "lr"), lr=0.5, seed=3),  # {"learning_rate": 0.5, ...}
    }


@pytest.fixture(autouse=True)
def models_untouched(settings):
    before = {name: snapshot(s.model) for name, s in settings.items()}
    yield
    for name, s in settings.items():
        assert_unchanged(s.model, before[name])


def captum_kw(s):
    """Captum's default loader for plain state dicts; one that strips a stored rate."""
    return {} if s.lr == 1.0 else {"checkpoints_load_func": strip_lr_loader}


def train_data(s, train_as):
    return s.train if train_as == "dataset" else loader(s.train)


def tracincp_pair(s, reduction, sample_wise, train_as="dataset", **kw):
    data, loss = train_data(s, train_as), s.loss_fn(reduction)
    ours = SAMTracInCP(
        s.model, data, s.ckpt_dir, loss_fn=loss, sample_wise_grads_per_batch=sample_wise,
        rho=0.0, **kw,
    )  # fmt: skip
    theirs = TracInCP(
        s.captum_model(), data, s.ckpt_dir, loss_fn=loss, batch_size=5,
        sample_wise_grads_per_batch=sample_wise, **captum_kw(s), **kw,
    )  # fmt: skip
    return ours, theirs


def fast_pair(s, reduction, train_as="dataset", **kw):
    data, loss = train_data(s, train_as), s.loss_fn(reduction)
    ours = SAMTracInCPFast(s.model, "fc2", data, s.ckpt_dir, loss_fn=loss, rho=0.0, **kw)
    theirs = TracInCPFast(
        s.captum_model(), "fc2", data, s.ckpt_dir, loss_fn=loss, batch_size=5,
        **captum_kw(s), **kw,
    )  # fmt: skip
    return ours, theirs


def assert_same_k_most(ours, theirs, inputs, k=4, **kw):
    for proponents in (True, False):
        a = ours.influence(inputs, k=k, proponents=proponents, **kw)
        b = theirs.influence(inputs, k=k, proponents=proponents, **kw)
        assert torch.equal(a.indices, b.indices), (proponents, a.indices, b.indices)
        assert_close(a.influence_scores, b.influence_scores, **TIGHT)


# ------------------------------------------------------------------ TracInCP


@pytest.mark.parametrize("test_as", ["tuple", "loader"])
@pytest.mark.parametrize("train_as", ["dataset", "loader"])
@pytest.mark.parametrize("reduction,sample_wise", REDUCTIONS)
@pytest.mark.parametrize("name", ["ce", "mse", "packed"])
def test_tracincp_influence(settings, name, reduction, sample_wise, train_as, test_as):
    s = settings[name]
    ours, theirs = tracincp_pair(s, reduction, sample_wise, train_as)
    inputs = s.test if test_as == "tuple" else s.test_loader()
    got = ours.influence(inputs)
    assert got.shape == (N_TEST, N_TRAIN) and got.dtype == torch.float64
    assert_close(got, theirs.influence(inputs), **TIGHT)


@pytest.mark.parametrize("reduction,sample_wise", REDUCTIONS)
@pytest.mark.parametrize("name", ["ce", "packed", "lr"])
def test_tracincp_aggregate_and_k_most(settings, name, reduction, sample_wise):
    s = settings[name]
    ours, theirs = tracincp_pair(s, reduction, sample_wise)
    for inputs in (s.test, s.test_loader()):
        got = ours.influence(inputs, aggregate=True)
        assert got.shape == (1, N_TRAIN)
        assert_close(got, theirs.influence(inputs, aggregate=True), **TIGHT)
    assert_same_k_most(ours, theirs, s.test_loader())
    assert_same_k_most(ours, theirs, s.test, aggregate=True)


@pytest.mark.parametrize("outer", [False, True])
@pytest.mark.parametrize("reduction,sample_wise", REDUCTIONS)
@pytest.mark.parametrize("name", ["mse", "lr"])
def test_tracincp_self_influence(settings, name, reduction, sample_wise, outer):
    s = settings[name]
    ours, theirs = tracincp_pair(s, reduction, sample_wise, "loader")
    for data in (None, s.test, s.test_loader()):
        got = ours.self_influence(data, outer_loop_by_checkpoints=outer)
        assert got.shape == (N_TRAIN if data is None else N_TEST,)
        assert_close(got, theirs.self_influence(data, outer_loop_by_checkpoints=outer), **TIGHT)


@pytest.mark.parametrize("reduction,sample_wise", REDUCTIONS)
@pytest.mark.parametrize("name", ["ce", "mse"])
def test_tracincp_test_loss_fn(settings, name, reduction, sample_wise):
    s = settings[name]
    test_loss = TEST_LOSSES[name](reduction)
    ours, theirs = tracincp_pair(s, reduction, sample_wise, test_loss_fn=test_loss)
    got = ours.influence(s.test)
    assert_close(got, theirs.influence(s.test), **TIGHT)
    assert_same_k_most(ours, theirs, s.test)
    default = SAMTracInCP(
        s.model, s.train, s.ckpt_dir, loss_fn=s.loss_fn(reduction),
        sample_wise_grads_per_batch=sample_wise, rho=0.0,
    ).influence(s.test)  # fmt: skip
    assert not torch.allclose(got, default, rtol=1e-3)  # test_loss_fn was really used


@pytest.mark.parametrize("sample_wise", [False, True])
@pytest.mark.parametrize("layers", [["fc2"], ["fc1"], ["fc1", "fc2"]])
def test_tracincp_layers(settings, layers, sample_wise):
    s = settings["ce"]
    reduction = "sum" if sample_wise else "none"
    ours, theirs = tracincp_pair(s, reduction, sample_wise, layers=layers)
    assert_close(ours.influence(s.test), theirs.influence(s.test), **TIGHT)
    assert_close(ours.self_influence(), theirs.self_influence(), **TIGHT)
    q = ours.compute_intermediate_quantities(s.test)
    width = sum(p.numel() for n, p in s.model.named_parameters() if n.split(".")[0] in layers)
    assert q.shape == (N_TEST, 3 * width)
    assert_close(q, theirs.compute_intermediate_quantities(s.test), **TIGHT)


@pytest.mark.parametrize("reduction,sample_wise", REDUCTIONS)
@pytest.mark.parametrize("name", ["ce", "packed", "lr"])
def test_tracincp_intermediate_quantities(settings, name, reduction, sample_wise):
    s = settings[name]
    ours, theirs = tracincp_pair(s, reduction, sample_wise)
    train_q = ours.compute_intermediate_quantities()
    assert_close(train_q, theirs.compute_intermediate_quantities(theirs.train_dataloader), **TIGHT)
    for aggregate in (False, True):
        for inputs in (s.test, s.test_loader()):
            got = ours.compute_intermediate_quantities(inputs, aggregate=aggregate)
            want = theirs.compute_intermediate_quantities(inputs, aggregate=aggregate)
            assert got.shape == want.shape == (1 if aggregate else N_TEST, want.shape[1])
            assert_close(got, want, **TIGHT)
        # documented: IQ(test, side="test") @ IQ(train).T == influence, whatever the rates
        test_q = ours.compute_intermediate_quantities(s.test, aggregate=aggregate, side="test")
        assert_close(test_q @ train_q.T, theirs.influence(s.test, aggregate=aggregate), **TIGHT)


def test_learning_rate_stored_with_the_state_dict(settings):
    s = settings["lr"]
    loss = s.loss_fn("none")
    with pytest.raises(RuntimeError, match="learning_rate"):  # why Captum needs a loader
        TracInCP(s.captum_model(), s.train, s.ckpt_dir, loss_fn=loss).influence(s.test)
    want = TracInCP(s.captum_model(), s.train, s.ckpt_dir, strip_lr_loader, loss_fn=loss).influence(
        s.test
    )
    for load in ({}, {"checkpoints_load_func": strip_lr_loader}):
        ours = SAMTracInCP(s.model, s.train, s.ckpt_dir, loss_fn=loss, rho=0.0, **load)
        assert_close(ours.influence(s.test), want, **TIGHT)

    # the stored rate 0.5 is really applied: a loader returning 1 doubles every score
    def rate_one(model, path):
        strip_lr_loader(model, path)
        return 1.0

    ones = TracInCP(s.captum_model(), s.train, s.ckpt_dir, rate_one, loss_fn=loss)
    assert_close(ones.influence(s.test), 2 * want, **TIGHT)
    fast = SAMTracInCPFast(s.model, "fc2", s.train, s.ckpt_dir, loss_fn=s.loss_fn("sum"), rho=0.0)
    captum_fast = TracInCPFast(
        s.captum_model(), "fc2", s.train, s.ckpt_dir, strip_lr_loader, loss_fn=s.loss_fn("sum")
    )
    assert_close(fast.influence(s.test), captum_fast.influence(s.test), **TIGHT)


# ------------------------------------------------------------------ TracInCPFast


@pytest.mark.parametrize("train_as", ["dataset", "loader"])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("name", ["ce", "mse", "packed", "lr"])
def test_fast_matches_captum(settings, name, reduction, train_as):
    s = settings[name]
    ours, theirs = fast_pair(s, reduction, train_as)
    want = theirs.influence(s.test)
    assert want.shape == (N_TEST, N_TRAIN)
    assert_close(ours.influence(s.test), want, **TIGHT)
    assert_close(ours.influence(s.test_loader()), want, **TIGHT)  # Captum: tuples only
    # documented (Captum's TracInCPFast has no quantities): test side @ train side.T
    test_q = ours.compute_intermediate_quantities(s.test, side="test")
    assert test_q.shape == (N_TEST, 3 * s.model.fc2.weight.numel())
    assert_close(test_q @ ours.compute_intermediate_quantities().T, want, **TIGHT)
    assert_same_k_most(ours, theirs, s.test)
    for outer in (False, True):
        for data in (None, s.test, s.test_loader()):
            assert_close(
                ours.self_influence(data, outer_loop_by_checkpoints=outer),
                theirs.self_influence(data, outer_loop_by_checkpoints=outer),
                **TIGHT,
            )


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("name", ["ce", "mse"])
def test_fast_test_loss_fn(settings, name, reduction):
    s = settings[name]
    test_loss = TEST_LOSSES[name](reduction)
    ours, theirs = fast_pair(s, reduction, test_loss_fn=test_loss)
    want = theirs.influence(s.test)
    assert_close(ours.influence(s.test), want, **TIGHT)
    assert not torch.allclose(want, fast_pair(s, reduction)[1].influence(s.test), rtol=1e-3)
    # RandProj's training embeddings use loss_fn (documented; Captum's use test_loss_fn),
    # so without projection its scores are TracInCPFast's
    rand = SAMTracInCPFastRandProj(
        s.model, "fc2", s.train, s.ckpt_dir, loss_fn=s.loss_fn(reduction),
        test_loss_fn=test_loss, rho=0.0, nearest_neighbors=ExactNearestNeighbors(),
    )  # fmt: skip
    assert_close(rand.influence(s.test, k=None), want, **TIGHT)


# ------------------------------------------------------------------ TracInCPFastRandProj


def index():
    """Captum's default index (Annoy, approximate) when installed, else the exact one."""
    try:
        import annoy  # noqa: F401
    except ImportError:
        return ExactNearestNeighbors()
    from captum.influence._utils.nearest_neighbors import AnnoyNearestNeighbors

    return AnnoyNearestNeighbors()


@pytest.mark.parametrize(
    "name,reduction,projection_dim,train_as",
    [("ce", "sum", None, "dataset"), ("lr", "mean", None, "loader"),
     ("ce", "mean", 100, "dataset"), ("lr", "sum", 4, "dataset"), ("ce", "mean", 9, "loader"),
     ("ce", "sum", 4, "seeded-loader")],
)  # fmt: skip
def test_rand_proj_matches_captum(settings, name, reduction, projection_dim, train_as):
    """Same seed, same projection: Captum draws it after opening the training DataLoader
    (one global draw, none when the loader has its own generator)."""
    s = settings[name]
    loss = s.loss_fn(reduction)
    data = {
        "dataset": lambda: s.train,
        "loader": lambda: loader(s.train),
        "seeded-loader": lambda: DataLoader(
            s.train, batch_size=4, generator=torch.Generator().manual_seed(7)
        ),
    }[train_as]
    ours = SAMTracInCPFastRandProj(
        s.model, "fc2", data(), s.ckpt_dir, loss_fn=loss, projection_dim=projection_dim,
        rho=0.0, nearest_neighbors=index(),
    )  # fmt: skip
    theirs = TracInCPFastRandProj(
        s.captum_model(), "fc2", data(), s.ckpt_dir, loss_fn=loss, batch_size=5,
        projection_dim=projection_dim, nearest_neighbors=index(), **captum_kw(s),
    )  # fmt: skip
    width = 3 * (12 if projection_dim in (None, 100) else int(projection_dim**0.5) ** 2)
    q = ours.compute_intermediate_quantities(s.test)
    assert q.shape == (N_TEST, width)
    assert_close(q, theirs.compute_intermediate_quantities(s.test_loader()), **TIGHT)
    assert_close(
        ours.compute_intermediate_quantities(s.test_loader()),
        theirs.compute_intermediate_quantities(s.test_loader()),
        **TIGHT,
    )
    scores = ours.influence(s.test, k=None)
    assert_close(scores, theirs.influence(s.test, k=None), **TIGHT)
    train_q = ours.compute_intermediate_quantities(s.train_loader(), side="train")
    assert_close(q @ train_q.T, scores, **TIGHT)  # the documented identity
    for proponents in (True, False):
        a = ours.influence(s.test, proponents=proponents)  # Captum's default k=5
        b = theirs.influence(s.test, proponents=proponents)
        assert a.indices.shape == (N_TEST, 5)
        assert torch.equal(a.indices, b.indices)
        assert_close(a.influence_scores, b.influence_scores)  # Annoy: float32 distances


# ------------------------------------------------------------------ progress and errors


@pytest.mark.parametrize("fast", [False, True])
def test_tracin_progress_texts(settings, capsys, fast):
    s = settings["ce"]
    est = fast_pair(s, "sum")[0] if fast else tracincp_pair(s, "none", False)[0]
    name = est.get_name()
    assert name == ("SAMTracInCPFast" if fast else "SAMTracInCP")
    capsys.readouterr()
    est.influence(s.test)
    est.self_influence()
    assert capsys.readouterr().err == ""  # no bar unless asked
    est.influence(s.test, show_progress=True)
    est.influence(s.test, k=2, show_progress=True)
    est.influence(s.test, k=2, proponents=False, show_progress=True)
    est.self_influence(show_progress=True)
    est.self_influence(show_progress=True, outer_loop_by_checkpoints=True)
    err = capsys.readouterr().err
    for text in (
        f"Using {name} to compute influence for training batches: 100%",
        f"Using {name} to perform computation for getting proponents. "
        "Processing training batches: 100%",
        f"Using {name} to perform computation for getting opponents. "
        "Processing training batches: 100%",
        f"Using {name} to compute self influence. Processing batch: 100%",
        f"Using {name} to compute self influence. Processing checkpoint: 100%",
    ):
        assert text in err, text


@pytest.mark.parametrize("cls", [SAMTracInCP, SAMTracInCPFast, SAMTracInCPFastRandProj])
def test_tracin_validation_errors(settings, tmp_path, cls):
    s = settings["ce"]
    fast = cls is not SAMTracInCP
    head = (s.model, "fc2") if fast else (s.model,)
    good = s.loss_fn("sum" if fast else "none")
    bad = s.loss_fn("none" if fast else "sum")
    nn_kw = {"nearest_neighbors": ExactNearestNeighbors()} if cls is SAMTracInCPFastRandProj else {}
    est = cls(*head, s.train, s.ckpt_dir, loss_fn=good, rho=0.0, **nn_kw)
    with pytest.raises(AssertionError, match="required") as err:
        est.influence(None)
    assert isinstance(err.value, ValueError)
    # a loss whose reduction does not fit sample_wise_grads_per_batch
    with pytest.raises(AssertionError, match="`loss_fn`") as err:
        cls(*head, s.train, s.ckpt_dir, loss_fn=bad, **nn_kw)
    assert isinstance(err.value, ValueError)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="Invalid checkpoints provided for TracIn class"):
        cls(*head, s.train, str(empty), loss_fn=good, **nn_kw)
    for size in (2.5, None, 0):  # Captum asserts an int: both an AssertionError and a ValueError
        with pytest.raises(AssertionError, match="`batch_size` must be a positive int") as err:
            cls(*head, s.train, s.ckpt_dir, loss_fn=good, batch_size=size, **nn_kw)
        assert isinstance(err.value, ValueError)
    if fast:
        with pytest.raises(ValueError, match='Invalid final_fc_layer str: "no_such_layer"'):
            cls(s.model, "no_such_layer", s.train, s.ckpt_dir, loss_fn=good, **nn_kw)
    if cls is SAMTracInCPFastRandProj:
        with pytest.raises(NotImplementedError), pytest.warns(UserWarning):
            est.self_influence()


def test_captum_raises_the_same_types(settings, tmp_path):
    """The exception types asserted above are Captum's (guards the test's premise)."""
    s = settings["ce"]
    with pytest.raises(AssertionError, match="required"):
        TracInCP(s.captum_model(), s.train, s.ckpt_dir, loss_fn=s.loss_fn("none")).influence(None)
    with pytest.raises(AssertionError, match="`loss_fn`"):
        TracInCP(s.captum_model(), s.train, s.ckpt_dir, loss_fn=s.loss_fn("sum"))
    os.makedirs(tmp_path / "empty")
    with pytest.raises(ValueError, match="Invalid checkpoints provided for TracIn class"):
        TracInCP(s.captum_model(), s.train, str(tmp_path / "empty"))
    with pytest.raises(ValueError, match='Invalid final_fc_layer str: "no_such_layer"'):
        TracInCPFast(
            s.captum_model(), "no_such_layer", s.train, s.ckpt_dir, loss_fn=s.loss_fn("sum")
        )
    rand = TracInCPFastRandProj(
        s.captum_model(),
        "fc2",
        s.train,
        s.ckpt_dir,
        loss_fn=s.loss_fn("sum"),
        nearest_neighbors=ExactNearestNeighbors(),
    )
    with pytest.raises(NotImplementedError), pytest.warns(UserWarning):
        rand.self_influence()


def test_layer_k_and_checkpoint_errors_have_captums_types(settings, tmp_path):
    """Each call fails (or works) for both with the same exception type."""
    import numpy as np

    s = settings["ce"]
    loss = s.loss_fn("none")

    def both(make):
        for who in ("ours", "captum"):
            make(who)

    def est(who, **kw):
        if who == "ours":
            return SAMTracInCP(s.model, s.train, s.ckpt_dir, loss_fn=loss, rho=0.0, **kw)
        return TracInCP(s.captum_model(), s.train, s.ckpt_dir, loss_fn=loss, **kw)

    with pytest.raises(AttributeError):  # a name that is no module
        both(lambda who: est(who, layers=["nope"]).influence(s.test))
    with pytest.raises(AssertionError):  # a module without parameters
        both(lambda who: est(who, layers=["act"]).influence(s.test))
    ours, theirs = est("ours"), est("captum")
    with pytest.raises(RuntimeError):
        ours.influence(s.test, k=-1)
    with pytest.raises(RuntimeError):
        theirs.influence(s.test, k=-1)
    for k in (2.0, "2"):  # not an integer: torch.topk's TypeError in Captum
        for who in (ours, theirs):
            with pytest.raises(TypeError):
                who.influence(s.test, k=k)
    for k in (0, np.int64(3), torch.tensor(3)):
        a, b = ours.influence(s.test, k=k), theirs.influence(s.test, k=k)
        assert a.indices.shape == b.indices.shape == (len(s.test[-1]), int(k))
        assert torch.equal(a.indices, b.indices)
    # a checkpoint that does not fit the model: load_state_dict's RuntimeError
    bad = tmp_path / "bad"
    bad.mkdir()
    torch.save({"fc2.weight": torch.zeros(3, 4)}, bad / "c.pt")
    for make in (
        lambda: SAMTracInCP(s.model, s.train, str(bad), loss_fn=loss, rho=0.0),
        lambda: TracInCP(s.captum_model(), s.train, str(bad), loss_fn=loss),
    ):
        with pytest.raises(RuntimeError):
            make().influence(s.test)

    # a custom loader's own exception reaches the caller unchanged
    def loader(model, path):
        return torch.load(path)["model_state_dict"]

    for cls, model in ((SAMTracInCP, s.model), (TracInCP, s.captum_model())):
        kw = {"rho": 0.0} if cls is SAMTracInCP else {}
        with pytest.raises(KeyError, match="model_state_dict"):
            cls(
                model, s.train, s.ckpt_dir, loss_fn=loss, checkpoints_load_func=loader, **kw
            ).influence(s.test)


def test_checkpoint_order_is_captums(settings):
    s = settings["ce"]
    paths = sorted(os.path.join(s.ckpt_dir, f) for f in os.listdir(s.ckpt_dir))
    loss = s.loss_fn("none")
    forms = (list, tuple, iter)  # Captum sorts a list only
    for form in forms:
        ours = SAMTracInCP(s.model, s.train, form(paths[::-1]), loss_fn=loss, rho=0.0)
        theirs = TracInCP(s.captum_model(), s.train, form(paths[::-1]), loss_fn=loss)
        assert ours.checkpoints == theirs.checkpoints
        assert ours.checkpoints == (paths if form is list else paths[::-1])


# ------------------------------------------------------------------ SAM at rho > 0


def fast_reference(s, reduction, rho):
    """Brute-force SAM-GIF of the final layer's weight, and its self influence.

    ``sum_c lr_c grad_W l(z; w_c) . grad_W l(z_k; w_c + eps_c)`` with
    ``eps_c = rho g / (||g|| + 1e-12)``, ``g`` the mean training gradient over ALL
    parameters, the move applied to all parameters; each loss is its example's alone.
    """
    loss = s.loss_fn(reduction)
    train = s.train.tensors
    every = [n for n, _ in s.model.named_parameters()]
    scores = torch.zeros(N_TEST, N_TRAIN, dtype=torch.float64)
    self_scores = torch.zeros(N_TRAIN, dtype=torch.float64)
    for path in s.ckpts:
        w, lr = checkpoint_params(s.model, path)
        g = example_grads(s.model, w, train, loss, every).mean(0)
        moved = sam_point(w, g, rho)
        test_g = example_grads(s.model, w, s.test, loss, ["fc2.weight"])
        train_g = example_grads(s.model, moved, train, loss, ["fc2.weight"])
        plain_g = example_grads(s.model, w, train, loss, ["fc2.weight"])
        scores += lr * test_g @ train_g.T
        self_scores += lr * (plain_g * train_g).sum(1)
    return scores, self_scores


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("name", ["lr", "mse"])
def test_fast_twins_at_rho_match_brute_force(settings, name, reduction):
    s, rho = settings[name], 0.2
    want, want_self = fast_reference(s, reduction, rho)
    loss = s.loss_fn(reduction)
    ours = SAMTracInCPFast(s.model, "fc2", s.train, s.ckpt_dir, loss_fn=loss, rho=rho)
    got = ours.influence(s.test)
    assert_close(got, want, **TIGHT)
    assert_close(ours.self_influence(), want_self, **TIGHT)
    plain = SAMTracInCPFast(s.model, "fc2", s.train, s.ckpt_dir, loss_fn=loss, rho=0.0)
    assert (got - plain.influence(s.test)).abs().max() > 1e-2 * want.abs().max()  # rho matters
    rand = SAMTracInCPFastRandProj(
        s.model, "fc2", s.train, s.ckpt_dir, loss_fn=loss, rho=rho,
        nearest_neighbors=ExactNearestNeighbors(),
    )  # fmt: skip
    assert_close(rand.influence(s.test, k=None), want, **TIGHT)
    top = rand.influence(s.test, k=3)
    assert torch.equal(top.indices, want.topk(3, dim=1).indices)


def test_rand_proj_default_index_is_captums_annoy(settings):
    pytest.importorskip("annoy")
    from captum.influence._utils.nearest_neighbors import AnnoyNearestNeighbors

    s = next(iter(settings.values()))
    rand = SAMTracInCPFastRandProj(
        s.model, "fc2", s.train, s.ckpt_dir, loss_fn=s.loss_fn("sum"), rho=0.0
    )
    assert isinstance(rand.nearest_neighbors, AnnoyNearestNeighbors)
