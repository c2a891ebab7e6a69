"""``damping="auto"`` against a dense float64 reference (torch.func.hessian, eigvalsh)."""

import math

import pytest
import torch
from torch.func import functional_call, hessian, jacrev
from torch.utils.data import TensorDataset

from captum_sam.hif.arnoldi import SAMArnoldiInfluenceFunction
from captum_sam.hif.damping import check_damping, hutchinson_trace, lanczos, lanczos_min
from captum_sam.hif.influence import SAMInfluenceFunction
from tests.helpers import DTYPE, ce_loss, make_data, mlp_model, save_checkpoint

N_TRAIN, N_TEST, WD = 24, 4, 1e-2


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tanh MLP at its random initialisation: an indefinite Hessian."""
    data = make_data(n=N_TRAIN + N_TEST, seed=5)
    x, y = data.tensors
    model = mlp_model(hidden=4, seed=1)
    path = save_checkpoint(model, tmp_path_factory.mktemp("damp") / "w.pt")
    train = TensorDataset(x[:N_TRAIN], y[:N_TRAIN])
    return dict(model=model, train=train, test=(x[N_TRAIN:], y[N_TRAIN:]), ckpt=path)


def make(run, cls=SAMInfluenceFunction, **kw):
    args = dict(
        loss_fn=ce_loss(), batch_size=8, rho=0.1, weight_decay=WD, damping="auto",
        projection_dim=None, hessian_reg=0.0, hessian_inverse_tol=None,
    )  # fmt: skip
    if cls is SAMInfluenceFunction:
        args["solver"] = "dense"
    args.update(kw)
    return cls(run["model"], run["train"], run["ckpt"], **args)


def reference_curvature(run, point: str, curvature: str, rho: float) -> torch.Tensor:
    """The curvature of the summed training loss at w* or w* + eps*, by torch.func."""
    model = run["model"]
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    w0 = torch.cat([p.detach().reshape(-1) for _, p in model.named_parameters()])
    x, y = run["train"].tensors

    def unflat(w):
        out, i = {}, 0
        for n, s in zip(names, shapes):
            out[n] = w[i : i + math.prod(s)].reshape(s)
            i += math.prod(s)
        return out

    def outputs(w):
        return functional_call(model, unflat(w), (x,))

    def total(w):
        return ce_loss()(outputs(w), y).sum()

    w = w0
    if point == "perturbed":  # eps = rho g / (||g|| + 1e-12), g the mean gradient
        g = torch.func.grad(total)(w0) / len(y)
        w = w0 + rho * g / (g.norm() + 1e-12)
    if curvature == "hessian":
        return hessian(total)(w)
    jac = jacrev(outputs)(w)  # (n, classes, P)
    probs = torch.softmax(outputs(w), dim=1)
    h_out = torch.diag_embed(probs) - probs.unsqueeze(2) * probs.unsqueeze(1)
    return torch.einsum("ncp,ncd,ndq->pq", jac, h_out, jac)


def expected_damping(c: torch.Tensor, psd: bool) -> float:
    values = torch.linalg.eigvalsh(c)
    shift = 0.0 if psd else max(0.0, -float(values[0]))
    return (0.1 * max(0.0, float(values.mean())) + shift) / N_TRAIN


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
@pytest.mark.parametrize("variant", ["plain", "fast", "full"])
def test_rule_matches_dense_eigvalsh(run, variant, curvature):
    point = "params" if variant == "plain" else "perturbed"
    c = reference_curvature(run, point, curvature, rho=0.1)
    values = torch.linalg.eigvalsh(c)
    if curvature == "hessian":
        assert values[0] < -1e-3  # the shift is exercised
    est = make(run, variant=variant, curvature=curvature)
    expected = expected_damping(c, psd=curvature == "ggn")
    assert est.damping_auto and est.damping == "auto"
    assert est.damping_rule.method == "dense"
    assert est.damping_used == pytest.approx(expected, rel=1e-10)
    assert est.damping_rule.mean_eigenvalue == pytest.approx(float(values.mean()), rel=1e-10)
    # the chosen value is what is applied: the same scores as passing it as a float
    fixed = make(run, variant=variant, curvature=curvature, damping=est.damping_used)
    assert not fixed.damping_auto
    torch.testing.assert_close(est.influence(run["test"]), fixed.influence(run["test"]))


def test_shift_puts_the_smallest_eigenvalue_at_a_tenth_of_the_mean(run):
    c = reference_curvature(run, "params", "hessian", rho=0.1)
    est = make(run, variant="plain", curvature="hessian")
    low = torch.linalg.eigvalsh(est.matrix())[0]
    # A = C + n (wd + d) I with n d = 0.1 mean(C) - lambda_min(C)
    expected = 0.1 * float(torch.linalg.eigvalsh(c).mean()) + N_TRAIN * WD
    assert float(low) == pytest.approx(expected, rel=1e-8)
    assert low > 0


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_estimates_close_to_dense_on_moderate_p(curvature, tmp_path):
    data = make_data(n=40, seed=7)
    model = mlp_model(hidden=30, seed=2)  # P = 5*30 + 30 + 30*3 + 3 = 273
    path = save_checkpoint(model, tmp_path / "w.pt")
    run = dict(model=model, train=data, ckpt=path)
    exact = make(run, variant="fast", curvature=curvature, batch_size=40)
    estimated = make(
        run, variant="fast", curvature=curvature, solver="cg", batch_size=40,
        solver_options={"dense_max_dim": 0},
    )  # fmt: skip
    rule, est_rule = exact.damping_rule, estimated.damping_rule
    assert exact.dim == 273 and est_rule.method == "hutchinson-lanczos"
    # the GGN's spectrum is in the Lanczos basis (rank <= 120 here): the deflated estimate
    # is close; the Hessian's many small mixed-sign eigenvalues leave Hutchinson's noise
    # (std 0.07 here, from 2 (||PCP||_F^2 - sum diag^2) / 64), but the shift dominates d
    if curvature == "ggn":
        assert est_rule.mean_eigenvalue == pytest.approx(rule.mean_eigenvalue, rel=1e-3)
    else:
        assert est_rule.mean_eigenvalue == pytest.approx(rule.mean_eigenvalue, abs=0.25)
        assert rule.min_eigenvalue < -1
        assert est_rule.min_eigenvalue == pytest.approx(rule.min_eigenvalue, rel=1e-6)
    assert estimated.damping_used == pytest.approx(exact.damping_used, rel=1e-3)


def test_lanczos_and_hutchinson_on_a_known_spectrum():
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(200, 200, generator=g, dtype=DTYPE))
    values = torch.linspace(-3.0, 10.0, 200, dtype=DTYPE)
    c = q @ torch.diag(values) @ q.T
    low = lanczos_min(lambda v: c @ v, 200, 64, 0, values)
    assert low == pytest.approx(-3.0, abs=1e-3)
    basis, tri, _ = lanczos(lambda v: c @ v, 200, 10, 0, values)
    torch.testing.assert_close(basis.T @ basis, torch.eye(10, dtype=DTYPE))
    torch.testing.assert_close(basis.T @ c @ basis, tri)  # T = Q^T C Q
    ritz = float(torch.linalg.eigvalsh(tri)[0])
    few = lanczos_min(lambda v: c @ v, 200, 10, 0, values)
    assert -3.0 <= ritz and few < ritz  # not converged: the residual lowers the estimate
    trace = hutchinson_trace(lambda v: c @ v, 200, 4096, 0, values)
    assert trace == pytest.approx(float(values.sum()), rel=0.05)


def test_iterative_solver_and_rho_zero(run):
    dense = make(run, variant="fast", curvature="hessian")
    cg = make(run, variant="fast", curvature="hessian", solver="cg", batch_size=24)
    assert cg.damping_used == pytest.approx(dense.damping_used, rel=1e-12)
    torch.testing.assert_close(
        cg.influence(run["test"]), dense.influence(run["test"]), rtol=1e-6, atol=1e-8
    )
    fast0 = make(run, variant="fast", curvature="hessian", rho=0.0)
    plain = make(run, variant="plain", curvature="hessian", rho=0.0)
    assert fast0.damping_used == pytest.approx(plain.damping_used, rel=1e-12)
    torch.testing.assert_close(fast0.influence(run["test"]), plain.influence(run["test"]))


def test_arnoldi_twin_and_kfac_accept_auto(run):
    arn = make(run, SAMArnoldiInfluenceFunction, variant="plain", curvature="ggn")
    naive = make(run, variant="plain", curvature="ggn")
    assert arn.damping_auto and arn.damping_used == pytest.approx(naive.damping_used, rel=1e-12)
    kfac = make(run, variant="fast", curvature="kfac", solver="auto")
    heuristic = make(run, variant="fast", curvature="kfac", solver="auto", damping=None)
    assert kfac.damping_auto and not heuristic.damping_auto
    assert kfac.damping_used == pytest.approx(heuristic.damping_used)


def test_defaults_unchanged(run):
    est = make(run, variant="plain", curvature="hessian", damping=None)
    assert est.damping == 0.0 and est.damping_used == 0.0 and not est.damping_auto
    assert est.damping_rule is None


@pytest.mark.parametrize("bad", ["Auto", "", "0.1", -1.0, float("nan"), float("inf"), True, [0.1]])
def test_bad_damping_names_the_argument(run, bad):
    with pytest.raises(ValueError, match="`damping`"):
        check_damping(bad)
    with pytest.raises(ValueError, match="`damping`"):
        make(run, variant="plain", damping=bad)
    with pytest.raises(ValueError, match="`damping`"):
        make(run, SAMArnoldiInfluenceFunction, variant="plain", damping=bad)


def test_compare_and_cli_take_auto_by_default():
    from captum_sam.cli import build_parser
    from captum_sam.evaluation.compare import damping_label
    from captum_sam.evaluation.config import CompareConfig

    assert CompareConfig().damping == "auto"
    assert CompareConfig(damping=0.1).damping == 0.1
    for bad in ("Auto", -1.0):
        with pytest.raises(ValueError, match="`damping`"):
            CompareConfig(damping=bad)
    parser = build_parser()
    assert parser.parse_args(["compare"]).damping == "auto"
    assert parser.parse_args(["compare", "--damping", "0.01"]).damping == 0.01
    with pytest.raises(SystemExit):
        parser.parse_args(["compare", "--damping", "big"])

    class Est:
        damping_auto = True

    assert damping_label(0.01234, Est()) == "0.0123 (auto)"
    assert damping_label({"fc1": 0.001, "fc2": 0.02}, object()) == "per layer 0.001-0.02"
    assert damping_label(None, object()) is None


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_training_horizon_floors_the_mean_term(run, curvature):
    c = reference_curvature(run, "params", curvature, rho=0.1)
    values = torch.linalg.eigvalsh(c)
    mean = float(values.mean())
    shift = 0.0 if curvature == "ggn" else max(0.0, -float(values[0]))
    for horizon in (N_TRAIN / (0.5 * mean), N_TRAIN / (50 * mean)):  # below and above 0.1 mean
        est = make(run, variant="plain", curvature=curvature, training_horizon=horizon)
        expected = (max(0.1 * mean, N_TRAIN / horizon) + shift) / N_TRAIN
        assert est.damping_used == pytest.approx(expected, rel=1e-10)
        assert est.damping_rule.horizon == horizon


def test_training_horizon_of_a_record_and_bad_values(run, tmp_path):
    from captum_sam import train_sam
    from captum_sam.hif.damping import training_horizon

    train_sam(
        mlp_model(seed=3), run["train"], ce_loss(), epochs=2, lr=0.3, rho=0.05,
        batch_size=10, record_dir=tmp_path / "rec", seed=0,
    )  # fmt: skip
    assert training_horizon(tmp_path / "rec") == pytest.approx(2 * 3 * 0.3)  # 24 = 10+10+4
    for bad in (0.0, -1.0, float("inf"), True, "10"):
        with pytest.raises(ValueError, match="`training_horizon`"):
            make(run, variant="plain", training_horizon=bad)
    for damping, curvature in ((0.1, "hessian"), (None, "ggn"), ("auto", "kfac")):
        with pytest.raises(ValueError, match="`training_horizon`"):
            make(run, variant="plain", curvature=curvature, damping=damping, training_horizon=5.0)
