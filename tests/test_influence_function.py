import copy

import pytest
import torch
from torch.func import functional_call, hessian, jacrev
from torch.utils.data import TensorDataset

from captum_sam import checkpoints_load_func, load_trajectory, train_sam
from captum_sam import core as F
from captum_sam._captum import NaiveInfluenceFunction
from captum_sam.hif.influence import SAMInfluenceFunction
from captum_sam.solvers import ConvergenceWarning
from tests.helpers import (
    DTYPE,
    BatchCentred,
    assert_unchanged,
    ce_loss,
    linear_model,
    make_data,
    mlp_model,
    mse_per_example,
    save_checkpoint,
    snapshot,
)

N_TRAIN, N_TEST = 20, 5
MODELS = {"mlp": mlp_model, "logreg": linear_model}


@pytest.fixture(scope="module", params=["mlp", "logreg"])
def run(request, tmp_path_factory):
    data = make_data(n=N_TRAIN + N_TEST, seed=3)
    x, y = data.tensors
    train = TensorDataset(x[:N_TRAIN], y[:N_TRAIN])
    model = MODELS[request.param]()
    out = tmp_path_factory.mktemp("hif") / request.param
    train_sam(
        model,
        train,
        ce_loss(),
        epochs=40,
        lr=0.5,
        rho=0.05,
        batch_size=N_TRAIN,
        weight_decay=1e-2,
        record_dir=out,
        seed=0,
    )
    return dict(
        name=request.param,
        model=model,
        train=train,
        test=(x[N_TRAIN:], y[N_TRAIN:]),
        ckpt=load_trajectory(out).final.path,
        dir=out,
    )


def make(run, **kw):
    args = dict(
        checkpoint=run["ckpt"],
        loss_fn=ce_loss(),
        batch_size=8,
        rho=0.1,
        weight_decay=1e-2,
        solver="dense",
        projection_dim=None,  # every direction: the exact inverse (Captum keeps the top 50
        hessian_reg=0.0,  # and drops small or negative eigenvalues)
        hessian_inverse_tol=None,
    )
    args.update(kw)
    return SAMInfluenceFunction(run["model"], run["train"], **args)


# --------------------------------------------------------------- dense reference


class Dense:
    """The formulas of docs/math.rst with torch.func.hessian / jacrev on flat float64 vectors.

    With ``layers``, the perturbation runs over every parameter (``scope="trainable"``,
    the training's) or over the attributed ones (``"attributed"``); curvature, J and
    the gradients are the attributed blocks, the other parameters held at the (perturbed)
    point.
    """

    def __init__(
        self,
        run,
        rho,
        lam,
        adaptive=False,
        curvature="hessian",
        damping=0.0,
        layers=None,
        hessian_idx=None,
        loss=None,
        scope="trainable",
    ):
        model = copy.deepcopy(run["model"])
        checkpoints_load_func(model, run["ckpt"])
        self.model, self.loss = model, loss or ce_loss()
        named = dict(model.named_parameters())
        self.names = [
            n for n in named if layers is None or any(n.startswith(layer + ".") for layer in layers)
        ]
        every = self.names if scope == "attributed" else list(named)
        self.rest = {n: p.detach() for n, p in named.items() if n not in every}
        self.shapes = [(n, named[n].shape) for n in every]
        W = torch.cat([named[n].detach().reshape(-1) for n in every])
        mask = torch.cat(
            [torch.full((named[n].numel(),), n in self.names, dtype=torch.bool) for n in every]
        )
        A = torch.nonzero(mask).flatten()
        self.x, self.y = run["train"].tensors
        n = len(self.y)
        hx, hy = (
            (self.x, self.y) if hessian_idx is None else (self.x[hessian_idx], self.y[hessian_idx])
        )
        scale = n / len(hy)
        P = len(A)

        def mean_loss(v):
            return self.losses(v, self.x, self.y).mean()

        def phi(w, g):
            if adaptive:
                return rho * w**2 * g / (torch.linalg.norm(w.abs() * g) + 1e-12)
            return rho * g / (torch.linalg.norm(g) + 1e-12)

        g0 = torch.func.grad(mean_loss)(W)
        eps = phi(W, g0)
        We = W + eps
        self.W, self.We, self.A_idx = W, We, A
        self.w, self.eps = W[A], eps[A]
        if curvature == "hessian":
            summed = lambda v: self.losses(v, hx, hy).sum()  # noqa: E731
            Hf_e, Hf_0 = scale * hessian(summed)(We), scale * hessian(summed)(W)
        else:
            Hf_e, Hf_0 = scale * self.ggn(We, hx, hy), scale * self.ggn(W, hx, hy)
        He, H0 = Hf_e[A][:, A], Hf_0[A][:, A]
        Jw, Jg = jacrev(phi, argnums=(0, 1))(W, g0)
        J = Jw[A][:, A] + Jg[A] @ Hf_0[:, A] / n  # the attributed block, others fixed
        self.J_exact = jacrev(lambda w: phi(w, torch.func.grad(mean_loss)(w)))(W)[A][:, A]
        eye = torch.eye(P, dtype=DTYPE)
        reg = n * (lam + damping) * eye
        self.A = {
            "fast": He + reg,
            "full": He @ (eye + J) + reg,
            "exact": He @ (eye + J) + reg,
            "plain": H0 + reg,
        }
        full_w = self.all_grads(W, self.x, self.y)
        G_w = full_w[:, A]
        G_e = self.all_grads(We, self.x, self.y)[:, A]
        D = (Jg[A] @ full_w.T / n).T  # d eps_A / d delta_k, one row per example
        self.R = {"fast": G_e, "full": G_e, "exact": G_e + (He @ D.T).T, "plain": G_w}
        self.G_w = G_w
        self.lam = lam

    def full(self, w):
        out, i = dict(self.rest), 0
        for name, shape in self.shapes:
            k = shape.numel()
            out[name] = w[i : i + k].reshape(shape)
            i += k
        return out

    def outputs(self, w, x):
        return functional_call(self.model, self.full(w), (x,))

    def losses(self, w, x, y):
        return self.loss(self.outputs(w, x), y)

    def all_grads(self, v, x, y):
        return jacrev(lambda u: self.losses(u, x, y))(v)

    def test_grads(self, x, y):
        """Gradients of the attributed parameters at w*."""
        return self.all_grads(self.W, x, y)[:, self.A_idx]

    def ggn(self, w, x, y):
        Jo = jacrev(lambda v: self.outputs(v, x))(w)  # (n, C, P)
        out = self.outputs(w, x)
        G = torch.zeros(w.numel(), w.numel(), dtype=DTYPE)
        for i in range(len(y)):
            Hout = hessian(lambda o, t=y[i : i + 1]: self.loss(o.unsqueeze(0), t).sum())(out[i])
            G += Jo[i].T @ Hout @ Jo[i]
        return G

    def scores(self, variant, xt, yt):
        Gt = self.test_grads(xt, yt)
        return Gt @ torch.linalg.solve(self.A[variant], self.R[variant].T)

    def self_influence(self, variant):
        return (self.G_w * torch.linalg.solve(self.A[variant], self.R[variant].T).T).sum(1)

    def change(self, variant, idx):
        """Trained without ``idx``: each removed example's r_k and its share lam w* of the
        weight decay (MATH.md's R_{-S} divides by the kept examples only)."""
        rhs = self.R[variant][idx].sum(0) + len(idx) * self.lam * self.w
        return torch.linalg.solve(self.A[variant], rhs)


def rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
@pytest.mark.parametrize("variant", ["fast", "full", "exact", "plain"])
def test_variants_match_dense_reference(run, variant, curvature):
    ref = Dense(run, rho=0.1, lam=1e-2, curvature=curvature)
    est = make(run, variant=variant, curvature=curvature)
    xt, yt = run["test"]
    assert rel(est.influence(run["test"]), ref.scores(variant, xt, yt)) <= 1e-8
    assert rel(est.self_influence(), ref.self_influence(variant)) <= 1e-8
    assert rel(est.parameter_change([1, 4, 7], flat=True), ref.change(variant, [1, 4, 7])) <= 1e-8


@pytest.mark.parametrize("variant", ["full", "exact"])
def test_asam_layers_damping_and_hessian_subset_match_dense_reference(run, variant):
    layers = ["fc2"] if run["name"] == "mlp" else None
    idx = list(range(0, N_TRAIN, 2))
    ref = Dense(run, rho=0.2, lam=1e-2, adaptive=True, damping=0.05, layers=layers, hessian_idx=idx)
    hess = TensorDataset(*[t[idx] for t in run["train"].tensors])
    est = make(
        run,
        variant=variant,
        rho=0.2,
        adaptive=True,
        damping=0.05,
        layers=layers,
        hessian_dataset=hess,
        rescale_hessian=True,  # the reference scales the subset's curvature by n/m
    )
    xt, yt = run["test"]
    assert rel(est.influence(run["test"]), ref.scores(variant, xt, yt)) <= 1e-8


def test_perturbation_jacobian_is_the_closed_form_for_sam(run):
    """J = (rho / (n ||g0||)) (I - u u^T) H_0 for p = 2, checked on the reference itself."""
    ref = Dense(run, rho=0.1, lam=0.0)
    x, y = run["train"].tensors
    g0 = torch.func.grad(lambda w: ref.losses(w, x, y).mean())(ref.w)
    u = g0 / g0.norm()
    H0 = hessian(lambda w: ref.losses(w, x, y).sum())(ref.w)
    closed = 0.1 / (len(y) * g0.norm()) * (torch.eye(len(u), dtype=DTYPE) - torch.outer(u, u)) @ H0
    torch.testing.assert_close(ref.J_exact, closed, rtol=1e-6, atol=1e-10)


@pytest.mark.parametrize("adaptive", [False, True])
def test_closed_form_perturbation_derivative_equals_jvp(run, adaptive):
    """The closed form behind J and the exact right-hand side, against ``jvp`` of eps."""
    est = make(run, adaptive=adaptive, variant="exact")
    gen = torch.Generator().manual_seed(0)
    v, hv = (torch.randn(est.dim, 3, dtype=DTYPE, generator=gen) for _ in range(2))

    def one(dw, dg):
        return F.perturbation_jvp(est.params, est.mean_grad, dw, dg, est.rho, adaptive)

    ref = est.operator.flat(torch.func.vmap(one)(est.operator.tree(v), est.operator.tree(hv)))
    torch.testing.assert_close(est.operator.jvp_eps_given(v, hv), ref, rtol=1e-10, atol=1e-14)
    zero = torch.zeros_like(v)
    ref0 = est.operator.flat(torch.func.vmap(one)(est.operator.tree(zero), est.operator.tree(hv)))
    torch.testing.assert_close(est.operator.jvp_eps_given(None, hv), ref0, rtol=1e-10, atol=1e-14)
    # SAM's eps depends on w only through g; ASAM's also through |w|
    assert torch.allclose(ref, ref0) is not adaptive


def test_ggn_with_squared_error_matches_dense(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(15, 5, generator=g, dtype=DTYPE)
    y = torch.randn(15, 3, generator=g, dtype=DTYPE)
    train = TensorDataset(x, y)
    model = mlp_model()
    train_sam(
        model,
        train,
        mse_per_example,
        epochs=5,
        lr=0.05,
        rho=0.05,
        batch_size=15,
        record_dir=tmp_path / "r",
    )
    run = dict(model=model, train=train, ckpt=load_trajectory(tmp_path / "r").final.path)
    ref = Dense(run, rho=0.1, lam=1e-2, curvature="ggn", loss=mse_per_example)
    est = make(run, loss_fn=mse_per_example, variant="fast", curvature="ggn")
    G = ref.A["fast"] - len(y) * 1e-2 * torch.eye(ref.w.numel(), dtype=DTYPE)
    # closed form for squared error: G = 2 sum_i J_i^T J_i
    Jo = jacrev(lambda v: ref.outputs(v, x))(ref.w + ref.eps)
    torch.testing.assert_close(G, 2 * torch.einsum("ncp,ncq->pq", Jo, Jo), rtol=1e-10, atol=1e-10)
    assert rel(est.matrix(), ref.A["fast"]) <= 1e-10


# --------------------------------------------------------------- solvers and Captum


@pytest.mark.parametrize(
    "variant,solver,opts",
    [
        ("full", "gmres", {"tol": 1e-11}),
        ("exact", "bicgstab", {"tol": 1e-11}),
        ("fast", "cg", {"tol": 1e-11}),
        ("plain", "arnoldi", {"rank": 10_000}),
        ("plain", "neumann", {"tol": 1e-9, "neumann_terms": 20_000}),
    ],
)
def test_iterative_solvers_match_dense(run, variant, solver, opts):
    kw = dict(variant=variant, curvature="ggn", damping=0.05)
    dense = make(run, **kw).influence(run["test"])
    if solver == "arnoldi":
        opts = {"rank": sum(p.numel() for p in run["model"].parameters())}
    got = make(run, solver=solver, solver_options=opts, **kw).influence(run["test"])
    assert rel(got, dense) <= 1e-6


def test_rho_zero_reduces_every_variant_to_plain_and_plain_to_captum(run):
    # Captum drops non-positive eigenvalues, so compare where H + n lam I is positive
    # definite: the MLP's Hessian is indefinite and needs a larger weight decay
    lowest = torch.linalg.eigvalsh(make(run, rho=0.0, variant="plain", weight_decay=0.0).matrix())
    lam = max(1e-2, (0.1 - float(lowest.min())) / N_TRAIN)
    plain = make(run, rho=0.0, variant="plain", weight_decay=lam)
    ref = plain.influence(run["test"])
    for variant in ["fast", "full", "exact"]:
        got = make(run, rho=0.0, variant=variant, weight_decay=lam).influence(run["test"])
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    P = sum(p.numel() for p in run["model"].parameters())
    captum = NaiveInfluenceFunction(
        copy.deepcopy(run["model"]),
        run["train"],
        run["ckpt"],
        checkpoints_load_func,
        loss_fn=ce_loss(),
        batch_size=8,
        projection_dim=P,
        hessian_reg=N_TRAIN * lam,
        hessian_inverse_tol=1e-12,
    )
    # Captum factorises the symmetric matrix with torch.linalg.eig (not eigh): its
    # eigenvectors of repeated eigenvalues are not orthonormal, which limits the
    # agreement to about 1e-7 relative (checked against eigh separately)
    assert rel(captum.influence(run["test"]), ref) <= 1e-6
    assert rel(captum.self_influence(), plain.self_influence()) <= 1e-6


def test_quantities_topk_self_influence_are_consistent(run):
    est = make(run, variant="exact")
    full = est.influence(run["test"])
    q_test = est.compute_intermediate_quantities(run["test"], test=True)
    q_train = est.compute_intermediate_quantities(run["train"].tensors)
    torch.testing.assert_close(q_test @ q_train.T, full)
    top = est.influence(run["test"], k=3, proponents=False)
    assert torch.equal(top.indices, full.argsort(dim=1)[:, :3])
    agg = est.influence(run["test"], aggregate=True)
    torch.testing.assert_close(agg, full.sum(0, keepdim=True), rtol=1e-10, atol=1e-12)
    diag = est.influence(run["train"].tensors).diagonal()
    torch.testing.assert_close(est.self_influence(), diag, rtol=1e-10, atol=1e-12)


def test_edited_model_is_a_copy_with_the_change(run):
    model = run["model"]
    model.train()
    before = snapshot(model)
    est = make(run, variant="exact")
    delta = est.parameter_change([0, 3], flat=True)
    edited = est.edited_model([0, 3])
    assert_unchanged(model, before)
    flat = lambda m: torch.cat([p.detach().reshape(-1) for p in m.parameters()])  # noqa: E731
    torch.testing.assert_close(flat(edited) - flat(model), delta)


def test_bad_input_and_convergence_warning(run, tmp_path):
    with pytest.raises(ValueError, match="variant"):
        make(run, variant="fastest")
    with pytest.raises(ValueError, match="solver"):
        make(run, solver="qr")
    with pytest.raises(ValueError, match="symmetric"):
        make(run, variant="full", solver="cg")
    with pytest.raises(ValueError, match="weight_decay"):
        make(run, weight_decay=-1e-3)
    with pytest.raises(ValueError, match="curvature"):
        make(run, curvature="fisher")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="weights_only"):
        make(run, checkpoint=str(bad))
    with pytest.raises(FileNotFoundError):
        make(run, checkpoint=str(tmp_path / "missing.pt"))
    xt, yt = run["test"]
    nan = xt.clone()
    nan[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        make(run).influence((nan, yt))
    with pytest.raises(ValueError, match="solver_options"):
        make(run, solver_options={"tolerance": 1})
    est = make(run, variant="full", solver="gmres", solver_options={"max_iter": 2, "tol": 1e-12})
    with pytest.warns(ConvergenceWarning, match="residual") as got:
        est.influence(run["test"])
    assert est.last_residual.max() > 1e-12
    assert {w.filename for w in got if w.category is ConvergenceWarning} == {__file__}


# --------------------------------------------------------------- factored GGN


@pytest.mark.parametrize("variant", ["fast", "full", "exact", "plain"])
def test_factored_ggn_matrix_equals_products_and_reference(run, variant, monkeypatch):
    from captum_sam.core.layers import linear_ggn as factored_ggn

    calls = []
    original = factored_ggn.linear_ggn
    monkeypatch.setattr(
        factored_ggn, "linear_ggn", lambda *a, **k: calls.append(1) or original(*a, **k)
    )
    layers = ["fc2"] if run["name"] == "mlp" else None
    idx = list(range(0, N_TRAIN, 2))
    hess = TensorDataset(*[t[idx] for t in run["train"].tensors])
    kw = dict(
        variant=variant,
        curvature="ggn",
        rho=0.2,
        adaptive=variant == "full",  # ASAM's J through the dense path too
        damping=0.05,
        layers=layers,
        hessian_dataset=hess,
        rescale_hessian=True,  # the reference scales the subset's curvature by n/m
    )
    before = snapshot(run["model"])
    est = make(run, **kw)
    ref = Dense(
        run,
        rho=0.2,
        lam=1e-2,
        adaptive=variant == "full",
        damping=0.05,
        layers=layers,
        hessian_idx=idx,
        curvature="ggn",
    )
    assert rel(est.matrix(), ref.A[variant]) <= 1e-10
    assert calls and est.operator._ggn_checked is True
    slow = make(run, factorize=False, **kw)
    torch.testing.assert_close(est.matrix(), slow.matrix(), rtol=1e-10, atol=1e-12)
    xt, yt = run["test"]
    assert rel(est.influence(run["test"]), ref.scores(variant, xt, yt)) <= 1e-8
    assert rel(est.self_influence(), ref.self_influence(variant)) <= 1e-8
    assert rel(est.parameter_change([1, 4], flat=True), ref.change(variant, [1, 4])) <= 1e-8
    assert_unchanged(run["model"], before)
    assert not any(m._forward_hooks for m in run["model"].modules())
    # matrix() of an iterative solver forms the same matrix the same way, and keeps
    # no P x P copy of H_e (its solves go on with curvature products)
    calls.clear()
    iterative = make(run, solver="cg" if variant in ("fast", "plain") else "gmres", **kw)
    torch.testing.assert_close(iterative.matrix(), est.matrix())
    assert calls and iterative.operator.dense_he is None
    assert (est.operator.dense_he is not None) is (variant == "exact")  # its right-hand sides


def test_factored_ggn_falls_back_for_coupled_and_hessian(run, tmp_path):
    torch.manual_seed(0)
    model = BatchCentred().to(DTYPE)
    path = tmp_path / "centred.pt"
    save_checkpoint(model, path)
    kw = dict(checkpoint=str(path), variant="exact", curvature="ggn", damping=0.1)
    args = dict(
        loss_fn=ce_loss(),
        batch_size=8,
        rho=0.1,
        weight_decay=1e-2,
        solver="dense",
        projection_dim=None,
        hessian_reg=0.0,
        hessian_inverse_tol=None,
    )
    est = SAMInfluenceFunction(model, run["train"], **kw, **args)
    slow = SAMInfluenceFunction(model, run["train"], **kw, **args, factorize=False)
    torch.testing.assert_close(est.matrix(), slow.matrix(), rtol=1e-12, atol=1e-12)
    assert est.operator._ggn_checked is False
    assert (
        make(run, curvature="hessian").operator.ggn_sites is None
    )  # the true Hessian is not a GGN
    with pytest.raises(TypeError, match="factorize"):
        make(run, factorize=1)


@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("variant", ["fast", "full", "exact"])
def test_layers_keep_the_training_perturbation(run, variant, adaptive):
    """``layers=`` attributes fc2 only, but eps is the training's, over every parameter."""
    if run["name"] != "mlp":
        pytest.skip("needs a model with two layers")
    kw = dict(variant=variant, rho=0.2, adaptive=adaptive, layers=["fc2"])
    xt, yt = run["test"]
    ref = Dense(run, rho=0.2, lam=1e-2, adaptive=adaptive, layers=["fc2"])
    est = make(run, **kw)
    got = est.influence(run["test"])
    assert rel(got, ref.scores(variant, xt, yt)) <= 1e-8
    assert rel(est.self_influence(), ref.self_influence(variant)) <= 1e-8
    # the transpose products of an iterative solve take the same J
    solver = "cg" if variant == "fast" else "gmres"
    it = make(run, solver=solver, solver_options={"tol": 1e-12}, **kw)
    assert rel(it.influence(run["test"]), ref.scores(variant, xt, yt)) <= 1e-6
    # the approximation perturbs fc2 alone: other scores
    sub = make(run, perturbation_scope="attributed", **kw)
    ref_sub = Dense(run, rho=0.2, lam=1e-2, adaptive=adaptive, layers=["fc2"], scope="attributed")
    assert rel(sub.influence(run["test"]), ref_sub.scores(variant, xt, yt)) <= 1e-8
    assert rel(sub.influence(run["test"]), got) > 1e-4


@pytest.mark.parametrize("variant", ["fast", "exact", "plain"])
def test_parameter_change_predicts_retraining_without_the_example(tmp_path, variant):
    """Against real retraining to the fixed point on the kept examples (renormalised,
    MATH.md's R_{-S}), with weight decay: the removed example's share lam w* of the
    regulariser is part of the change (without it the edit was off by about 3x)."""
    from captum_sam.evaluation.retrain import sam_fixed_point

    torch.manual_seed(0)
    x = torch.randn(40, 4, dtype=DTYPE)
    y = (x[:, 0] + 0.7 * torch.randn(40, dtype=DTYPE) > 0).long()
    data, rho, lam = TensorDataset(x, y), (0.0 if variant == "plain" else 0.05), 1e-2
    start = torch.nn.Linear(4, 2).to(DTYPE)
    trained = sam_fixed_point(start, data, ce_loss(), rho, lam, max_iter=100).model
    path = str(tmp_path / "w.pt")
    torch.save(trained.state_dict(), path)
    w = torch.cat([p.detach().reshape(-1) for p in trained.parameters()])
    est = SAMInfluenceFunction(trained, data, path, loss_fn=ce_loss(), rho=rho, variant=variant,
                               weight_decay=lam, solver="dense")  # fmt: skip
    decay = torch.linalg.solve(est.matrix(), lam * w)  # the weight-decay share's change
    errors, without_decay = [], []
    for k in range(0, 40, 3):
        without = sam_fixed_point(trained, data, ce_loss(), rho, lam, remove=[k], max_iter=100)
        actual = torch.cat([p.detach().reshape(-1) for p in without.model.parameters()]) - w
        predicted = est.parameter_change([k], flat=True)
        errors.append(rel(predicted, actual))
        without_decay.append(rel(predicted - decay, actual))
    errors = torch.tensor(errors)  # first order: larger for the few influential examples
    assert errors.median() < 0.1 and errors.max() < 0.5, errors
    assert torch.tensor(without_decay).median() > 3 * errors.median(), without_decay


def test_parameter_change_shows_its_solve_with_show_progress(run, capsys):
    quiet, shown = make(run, solver="cg"), make(run, solver="cg", show_progress=True)
    capsys.readouterr()
    want = quiet.parameter_change([0, 2], flat=True)
    assert capsys.readouterr().err == ""
    torch.testing.assert_close(shown.parameter_change([0, 2], flat=True), want)
    assert "to solve for the parameter change" in capsys.readouterr().err
