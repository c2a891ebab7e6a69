"""The SAM-HIF twins at ``rho=0``, ``variant="plain"`` against Captum's Naive and Arnoldi IF.

Every twin gets the original model, every Captum class a deep copy; an autouse fixture
checks after every test that the original models are untouched. Hessian-dataset
rescaling and the SAM variant at ``rho > 0`` are checked against dense float64
references written with plain autograd.
"""

import pytest
import torch
from captum.influence._core.arnoldi_influence_function import ArnoldiInfluenceFunction
from captum.influence._core.influence_function import NaiveInfluenceFunction
from torch import nn
from torch.testing import assert_close

from captum_sam import SAMArnoldiInfluenceFunction, SAMInfluenceFunction
from tests.conformance_common import (
    N_HESSIAN,
    N_TEST,
    N_TRAIN,
    TIGHT,
    checkpoint_params,
    example_grads,
    loader,
    make_setting,
    sam_point,
    summed_loss_hessian,
)
from tests.helpers import assert_unchanged, snapshot

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:captum\\.")

REDUCTIONS = [("none", False), ("sum", True), ("mean", True)]
# Arnoldi: Captum adds hessian_reg to the Krylov restriction, we add it to the operator;
# equal in exact arithmetic, so the same seed gives the same basis up to rounding. The
# largest difference seen is 1.3e-9 on O(1) scores (attributing one layer), hence an
# absolute tolerance a little above it.
ARNOLDI = dict(rtol=1e-8, atol=3e-9)
TOLS = {"naive": TIGHT, "arnoldi": ARNOLDI}
ARNOLDI_DIM = 12


@pytest.fixture(scope="module")
def settings(tmp_path_factory):
    root = tmp_path_factory.mktemp("influence")
    return {
        "ce": make_setting(str(root / "ce"), seed=4),
        "mse": make_setting(str(root / "mse"), loss="mse", seed=5),
        "packed": make_setting(str(root / "packed"), packed=True, seed=6),
    }


@pytest.fixture(autouse=True)
def models_untouched(settings):
    before = {name: snapshot(s.model) for name, s in settings.items()}
    yield
    for name, s in settings.items():
        assert_unchanged(s.model, before[name])


def pair(kind, s, reduction="none", sample_wise=False, train_as="dataset", captum=True, **kw):
    """Ours (original model, rho=0, plain) and Captum's (a copy; None unless ``captum``)."""
    data = s.train if train_as == "dataset" else loader(s.train)
    args = dict(loss_fn=s.loss_fn(reduction), sample_wise_grads_per_batch=sample_wise, **kw)
    if kind == "arnoldi":
        args.setdefault("arnoldi_dim", ARNOLDI_DIM)
        ours_cls, captum_cls = SAMArnoldiInfluenceFunction, ArnoldiInfluenceFunction
    else:
        ours_cls, captum_cls = SAMInfluenceFunction, NaiveInfluenceFunction
    ours = ours_cls(s.model, data, s.ckpts[-1], rho=0.0, variant="plain", **args)
    if not captum:
        return ours, None
    theirs = captum_cls(s.captum_model(), data, s.ckpts[-1], batch_size=5, **args)
    return ours, theirs


KINDS = ["naive", "arnoldi"]


@pytest.mark.parametrize("data_as", [("dataset", "tuple"), ("loader", "loader")])
@pytest.mark.parametrize("reduction,sample_wise", REDUCTIONS)
@pytest.mark.parametrize("name", ["ce", "mse", "packed"])
@pytest.mark.parametrize("kind", KINDS)
def test_influence_matches_captum(settings, kind, name, reduction, sample_wise, data_as):
    s = settings[name]
    train_as, test_as = data_as
    ours, theirs = pair(kind, s, reduction, sample_wise, train_as)
    inputs = s.test if test_as == "tuple" else s.test_loader()
    got = ours.influence(inputs)
    assert got.shape == (N_TEST, N_TRAIN) and got.dtype == torch.float64
    assert_close(got, theirs.influence(inputs), **TOLS[kind])


@pytest.mark.parametrize("reduction,sample_wise", REDUCTIONS)
@pytest.mark.parametrize("kind", KINDS)
def test_k_most_self_influence_and_quantities(settings, kind, reduction, sample_wise):
    s, tol = settings["packed"], TOLS[kind]
    ours, theirs = pair(kind, s, reduction, sample_wise)
    for proponents in (True, False):
        a = ours.influence(s.test_loader(), k=4, proponents=proponents)
        b = theirs.influence(s.test_loader(), k=4, proponents=proponents)
        assert torch.equal(a.indices, b.indices)
        assert_close(a.influence_scores, b.influence_scores, **tol)
    for data in (None, s.test, s.test_loader()):
        assert_close(ours.self_influence(data), theirs.self_influence(data), **tol)
    for test in (False, True):
        for aggregate in (False, True):
            for data in (s.test, s.test_loader()):
                got = ours.compute_intermediate_quantities(data, aggregate=aggregate, test=test)
                want = theirs.compute_intermediate_quantities(data, aggregate=aggregate, test=test)
                assert got.shape == want.shape
                assert_close(got, want, **tol)
    # documented: IQ(test, test=True) @ IQ(train).T == influence
    train_q = ours.compute_intermediate_quantities(s.train_loader())
    test_q = ours.compute_intermediate_quantities(s.test, test=True)
    assert_close(test_q @ train_q.T, ours.influence(s.test), **TIGHT)


@pytest.mark.parametrize("reduction,sample_wise", [("none", False), ("mean", True)])
@pytest.mark.parametrize("name", ["ce", "mse"])
@pytest.mark.parametrize("kind", KINDS)
def test_test_loss_fn(settings, kind, name, reduction, sample_wise):
    s = settings[name]
    test_loss = (
        nn.CrossEntropyLoss(reduction=reduction, label_smoothing=0.3)
        if name == "ce"
        else nn.HuberLoss(reduction=reduction, delta=0.3)
    )
    ours, theirs = pair(kind, s, reduction, sample_wise, test_loss_fn=test_loss)
    got = ours.influence(s.test)
    assert_close(got, theirs.influence(s.test), **TOLS[kind])
    for test in (False, True):
        assert_close(
            ours.compute_intermediate_quantities(s.test, test=test),
            theirs.compute_intermediate_quantities(s.test, test=test),
            **TOLS[kind],
        )
    assert not torch.allclose(
        got, pair(kind, s, reduction, sample_wise, captum=False)[0].influence(s.test)
    )


@pytest.mark.parametrize("sample_wise", [False, True])
@pytest.mark.parametrize("layers", [["fc2"], ["fc1"]])
@pytest.mark.parametrize("kind", KINDS)
def test_layers(settings, kind, layers, sample_wise):
    s = settings["ce"]
    reduction = "sum" if sample_wise else "none"
    ours, theirs = pair(kind, s, reduction, sample_wise, layers=layers)
    assert_close(ours.influence(s.test), theirs.influence(s.test), **TOLS[kind])
    assert_close(ours.self_influence(), theirs.self_influence(), **TOLS[kind])


# ------------------------------------------------------------------ Hessian options


@pytest.mark.parametrize("kind", KINDS)
def test_hessian_dataset_is_summed_not_rescaled(settings, kind):
    s = settings["ce"]
    assert len(s.hessian) == N_HESSIAN != N_TRAIN
    ours, theirs = pair(kind, s, hessian_dataset=s.hessian, hessian_reg=0.0)
    want = theirs.influence(s.test)
    assert_close(ours.influence(s.test), want, **TOLS[kind])
    # rescale_hessian=True multiplies the curvature by n/m: every score by m/n
    cls = type(ours)
    rescaled = cls(
        s.model, s.train, s.ckpts[-1], loss_fn=s.loss_fn("none"), hessian_dataset=s.hessian,
        hessian_reg=0.0, rescale_hessian=True, rho=0.0, variant="plain",
        **({"arnoldi_dim": ARNOLDI_DIM} if kind == "arnoldi" else {}),
    )  # fmt: skip
    assert_close(rescaled.influence(s.test), want * N_HESSIAN / N_TRAIN, **TOLS[kind])


def dense_scores(model, params, point, s, matrix, tol, loss):
    """``g_test(w)^T A^+ g_k(point)`` with A's eigenvalues at or below ``tol`` dropped."""
    every = list(params)
    values, vectors = torch.linalg.eigh(matrix)
    keep = values > tol
    inverse = (vectors[:, keep] / values[keep]) @ vectors[:, keep].T
    test_g = example_grads(model, params, s.test, loss, every)
    train_g = example_grads(model, point, s.train.tensors, loss, every)
    return test_g @ inverse @ train_g.T


@pytest.mark.parametrize("reg", [1e-6, 0.3])
def test_rescaled_hessian_dataset_matches_dense_reference(settings, reg):
    s = settings["mse"]
    loss = s.loss_fn("none")
    params, _ = checkpoint_params(s.model, s.ckpts[-1])
    hess = summed_loss_hessian(s.model, params, s.hessian.tensors, loss, list(params))
    matrix = hess * N_TRAIN / N_HESSIAN + reg * torch.eye(len(hess), dtype=hess.dtype)
    want = dense_scores(s.model, params, params, s, matrix, 1e-5, loss)
    ours = SAMInfluenceFunction(
        s.model, s.train, s.ckpts[-1], loss_fn=loss, hessian_dataset=s.hessian,
        hessian_reg=reg, projection_dim=None, rescale_hessian=True, rho=0.0, variant="plain",
    )  # fmt: skip
    assert_close(ours.influence(s.test), want, **TIGHT)


@pytest.mark.parametrize("projection_dim", [2, 3])
@pytest.mark.parametrize("kind", KINDS)
def test_projection_dim_keeps_the_top_directions(settings, kind, projection_dim):
    s = settings["mse"]
    ours, theirs = pair(kind, s, projection_dim=projection_dim)
    q = ours.compute_intermediate_quantities(s.test, test=True)
    assert q.shape == (N_TEST, projection_dim)
    assert_close(q, theirs.compute_intermediate_quantities(s.test, test=True), **TOLS[kind])
    got = ours.influence(s.test)
    assert_close(got, theirs.influence(s.test), **TOLS[kind])
    assert not torch.allclose(got, pair(kind, s, captum=False)[0].influence(s.test), rtol=1e-3)


@pytest.mark.parametrize("reg,tol", [(0.5, 1e-4), (1e-6, 0.2), (0.0, 1e-8)])
@pytest.mark.parametrize("kind", KINDS)
def test_hessian_reg_and_inverse_tol(settings, kind, reg, tol):
    s = settings["ce"]
    ours, theirs = pair(kind, s, hessian_reg=reg, hessian_inverse_tol=tol)
    got = ours.influence(s.test)
    assert_close(got, theirs.influence(s.test), **TOLS[kind])
    assert_close(ours.self_influence(), theirs.self_influence(), **TOLS[kind])
    assert not torch.allclose(got, pair(kind, s, captum=False)[0].influence(s.test), rtol=1e-4)


# ------------------------------------------------------------------ progress and errors


@pytest.mark.parametrize("kind", KINDS)
def test_progress_texts(settings, capsys, kind):
    s = settings["ce"]
    est = pair(kind, s, captum=False)[0]
    name = est.get_name()
    assert name == ("SAMInfluenceFunction" if kind == "naive" else "SAMArnoldiInfluenceFunction")
    capsys.readouterr()
    est.influence(s.test)
    assert capsys.readouterr().err == ""
    est.influence(s.test, show_progress=True)
    est.influence(s.test, k=2, show_progress=True)
    est.influence(s.test, k=2, proponents=False, show_progress=True)
    err = capsys.readouterr().err
    for text in (
        f"Using {name} to compute influence scores. Processing batch: 100%",
        f"Using {name} to perform computation for getting proponents. "
        "Processing training batches: 100%",
        f"Using {name} to perform computation for getting opponents. "
        "Processing training batches: 100%",
    ):
        assert text in err, text


@pytest.mark.parametrize("kind", KINDS)
def test_progress_bars_over_datasets_show_percentages(settings, capsys, kind):
    """Captum's bars over a dataset know its length (``total``) and reach 100%."""
    s = settings["ce"]
    est = pair(kind, s, captum=False)[0]
    name = est.get_name()
    capsys.readouterr()
    est.self_influence(show_progress=True)
    est.compute_intermediate_quantities(s.train_loader(), show_progress=True)
    err = capsys.readouterr().err
    for text in (
        f"Using {name} to compute self influence scores. Processing batch: 100%",
        f"Using {name} to compute intermediate quantities. Processing batch: 100%",
    ):
        assert text in err, (text, err[-300:])


@pytest.mark.parametrize("kind", KINDS)
def test_validation_errors(settings, kind):
    s = settings["ce"]
    est = pair(kind, s, captum=False)[0]
    with pytest.raises(AssertionError, match="required") as err:
        est.influence(None)
    assert isinstance(err.value, ValueError)
    cls = SAMInfluenceFunction if kind == "naive" else SAMArnoldiInfluenceFunction
    for reduction, sample_wise in (("sum", False), ("none", True)):
        with pytest.raises(AssertionError, match="`loss_fn`") as err:
            cls(
                s.model, s.train, s.ckpts[-1], loss_fn=s.loss_fn(reduction),
                sample_wise_grads_per_batch=sample_wise,
            )  # fmt: skip
        assert isinstance(err.value, ValueError)
        captum_cls = NaiveInfluenceFunction if kind == "naive" else ArnoldiInfluenceFunction
        with pytest.raises(AssertionError, match="`loss_fn`"):  # Captum's type
            captum_cls(
                s.captum_model(), s.train, s.ckpts[-1], loss_fn=s.loss_fn(reduction),
                sample_wise_grads_per_batch=sample_wise,
            )  # fmt: skip


# ------------------------------------------------------------------ SAM at rho > 0


def test_fast_variant_matches_dense_reference(settings):
    """A = H(w + eps) + n d I, right-hand sides at w + eps, test gradients at w."""
    s, rho, damping = settings["mse"], 0.2, 5.0  # n d I makes A positive definite
    loss = s.loss_fn("none")
    params, _ = checkpoint_params(s.model, s.ckpts[-1])
    every = list(params)
    g = example_grads(s.model, params, s.train.tensors, loss, every).mean(0)
    point = sam_point(params, g, rho)
    hess = summed_loss_hessian(s.model, point, s.train.tensors, loss, every)
    matrix = hess + (N_TRAIN * damping + 1e-6) * torch.eye(len(hess), dtype=hess.dtype)
    assert torch.linalg.eigvalsh(matrix).min() > 0
    want = dense_scores(s.model, params, point, s, matrix, 1e-5, loss)
    ours = SAMInfluenceFunction(
        s.model, s.train, s.ckpts[-1], loss_fn=loss, projection_dim=None, rho=rho,
        damping=damping,
    )  # fmt: skip
    assert_close(ours.influence(s.test), want, **TIGHT)


@pytest.mark.parametrize("name,layers,weight_decay", [("ce", None, 1.0), ("mse", ["fc2"], 5.0)])
def test_arnoldi_fast_variant_matches_naive_at_rho(settings, name, layers, weight_decay):
    """With a Krylov basis of the whole (attributed) space both twins invert the same A.

    (On larger problems the basis loses orthogonality, as Captum's does: no
    reorthogonalisation; hence a model whose full-space basis stays accurate.)
    """
    s, rho = settings[name], 0.2
    common = dict(
        loss_fn=s.loss_fn("none"), layers=layers, projection_dim=None,
        weight_decay=weight_decay, hessian_reg=1e-6, hessian_inverse_tol=1e-10,
    )  # fmt: skip
    naive = SAMInfluenceFunction(s.model, s.train, s.ckpts[-1], rho=rho, variant="fast", **common)
    assert torch.linalg.eigvalsh(naive.matrix()).min() > 1.0  # positive definite A
    dim = naive.dim
    arnoldi = SAMArnoldiInfluenceFunction(  # dim + 1 steps: a basis of the whole space
        s.model, s.train, s.ckpts[-1], rho=rho, variant="fast", arnoldi_dim=dim + 1,
        arnoldi_tol=1e-12, **common,
    )  # fmt: skip
    want = naive.influence(s.test)
    assert_close(arnoldi.influence(s.test), want, **ARNOLDI)
    assert_close(arnoldi.self_influence(), naive.self_influence(), **ARNOLDI)
    plain = SAMInfluenceFunction(s.model, s.train, s.ckpts[-1], rho=0.0, variant="fast", **common)
    assert (want - plain.influence(s.test)).abs().max() > 1e-2 * want.abs().max()
    plain_arnoldi = SAMArnoldiInfluenceFunction(
        s.model, s.train, s.ckpts[-1], rho=0.0, variant="fast", arnoldi_dim=dim + 1,
        arnoldi_tol=1e-12, **common,
    )  # fmt: skip
    assert (arnoldi.influence(s.test) - plain_arnoldi.influence(s.test)).abs().max() > 1e-2 * (
        want.abs().max()
    )
