import pytest
import torch
from torch.func import functional_call

from captum_sam import core as F
from captum_sam.optim import SAM
from tests.helpers import (
    DTYPE,
    assert_unchanged,
    bn_model,
    ce_loss,
    linear_model,
    make_data,
    mlp_model,
    save_checkpoint,
    snapshot,
)

MODELS = {"linear": linear_model, "mlp": mlp_model}


def setup(model_name, layers=None):
    model = MODELS[model_name]() if model_name in MODELS else bn_model()
    names = F.attributed_names(model, layers)
    params, frozen = F.detached_params(model, names)
    floss = F.FunctionalLoss(model, ce_loss(), frozen)
    return model, names, params, floss


def loop_grads(model, names, data, loss_fn):
    """Reference: one autograd.grad call per example."""
    x, y = data.tensors
    chosen = [p for n, p in model.named_parameters() if n in names]
    rows = []
    for i in range(len(y)):
        loss = loss_fn(model(x[i : i + 1]), y[i : i + 1]).sum()
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, chosen)]))
    return torch.stack(rows)


def flat_function(model, names, params, frozen, fn):
    """f(flat w) for dense references."""

    def wrapped(flat):
        p = F.unflatten(flat, params)
        return fn(lambda *xs: functional_call(model, (p, frozen), xs), p)

    return wrapped


@pytest.mark.parametrize("layers", [None, ["fc2"]])
@pytest.mark.parametrize("model_name", ["linear", "mlp", "bn"])
def test_per_example_grads_match_autograd_loop(model_name, layers):
    if model_name == "linear" and layers:
        layers = ["0"]
    model, names, params, floss = setup(model_name, layers)
    data = make_data()
    before = snapshot(model)
    with F.eval_mode(model):
        got = F.flatten(F.per_example_grads(floss, params, data.tensors), batch_dims=1)
        ref = loop_grads(model, names, data, ce_loss())
    assert got.shape == (len(data), sum(params[n].numel() for n in names))
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    assert_unchanged(model, before)


def test_layers_selects_only_those_parameters():
    model = mlp_model()
    assert F.attributed_names(model, ["fc2"]) == ["fc2.weight", "fc2.bias"]
    with pytest.raises(ValueError, match="fc3"):
        F.attributed_names(model, ["fc3"])


def test_eval_mode_restores_mixed_flags():
    model = bn_model()
    model.train()
    model.bn.eval()
    flags = [m.training for m in model.modules()]
    with F.eval_mode(model):
        assert not any(m.training for m in model.modules())
    assert [m.training for m in model.modules()] == flags


@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("model_name", ["linear", "mlp"])
def test_perturbation_equals_optimizer_first_step(model_name, adaptive):
    model = MODELS[model_name]()
    data = make_data()
    x, y = data.tensors
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.3, adaptive=adaptive, lr=0.1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    # the core: mean gradient of the batch, then eps
    params, frozen = F.detached_params(model, F.attributed_names(model))
    floss = F.FunctionalLoss(model, ce_loss(), frozen)
    g, n = F.mean_grad(floss, {k: v.clone() for k, v in params.items()}, [(x, y)])
    eps = F.sam_perturbation(before, g, rho=0.3, adaptive=adaptive)
    # the optimizer
    (ce_loss()(model(x), y).sum() / len(y)).backward()
    opt.first_step()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach() - before[name], eps[name], rtol=0, atol=1e-12)
    assert n == len(y)
    assert max(v.abs().max() for v in eps.values()) > 1e-3


def test_perturbation_formula_closed_form():
    w = {"a": torch.tensor([1.0, -2.0], dtype=DTYPE), "b": torch.tensor([3.0], dtype=DTYPE)}
    g = {"a": torch.tensor([0.5, 1.0], dtype=DTYPE), "b": torch.tensor([-2.0], dtype=DTYPE)}
    sam = F.sam_perturbation(w, g, 0.1, False)
    norm = (0.25 + 1 + 4) ** 0.5
    torch.testing.assert_close(sam["a"], 0.1 * g["a"] / (norm + 1e-12))
    asam = F.sam_perturbation(w, g, 0.1, True)
    anorm = ((1 * 0.5) ** 2 + (2 * 1.0) ** 2 + (3 * 2.0) ** 2) ** 0.5
    torch.testing.assert_close(asam["b"], 0.1 * 9 * g["b"] / (anorm + 1e-12))


@pytest.mark.parametrize("mode", ["forward-over-reverse", "reverse-over-reverse"])
@pytest.mark.parametrize("layers", [None, ["fc1"]])
def test_hvp_matches_dense_hessian(mode, layers):
    model, names, params, floss = setup("mlp", layers)
    data = make_data()
    batches = [tuple(t[:10] for t in data.tensors), tuple(t[10:] for t in data.tensors)]
    x, y = data.tensors

    def summed(flat):
        p = F.unflatten(flat, params)
        return ce_loss()(functional_call(model, (p, floss.frozen), (x,)), y).sum()

    H = torch.autograd.functional.hessian(summed, F.flatten(params))
    v = torch.randn(H.shape[0], dtype=DTYPE, generator=torch.Generator().manual_seed(1))
    got = F.flatten(F.hvp(floss, params, batches, F.unflatten(v, params), mode=mode))
    torch.testing.assert_close(got, H @ v, rtol=1e-10, atol=1e-12)
    # several vectors at once
    V = torch.randn(3, H.shape[0], dtype=DTYPE, generator=torch.Generator().manual_seed(2))
    got = F.flatten(
        F.hvp(
            floss, params, batches, F.unflatten(V, params, batch_dims=1), batched=True, mode=mode
        ),
        batch_dims=1,
    )
    torch.testing.assert_close(got, V @ H, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("adaptive", [False, True])
def test_perturbation_jvp_and_vjp_match_dense_jacobian(adaptive):
    model, names, params, floss = setup("mlp")
    data = make_data()
    x, y = data.tensors
    n, rho = len(y), 0.2

    def eps_of_w(flat):
        p = F.unflatten(flat, params)
        mean_loss = lambda q: ce_loss()(functional_call(model, (q, floss.frozen), (x,)), y).mean()  # noqa: E731
        g = torch.func.grad(mean_loss)(p)
        return F.flatten(F.sam_perturbation(p, g, rho, adaptive))

    w = F.flatten(params)
    J = torch.autograd.functional.jacobian(eps_of_w, w)
    v = torch.randn(w.shape[0], dtype=DTYPE, generator=torch.Generator().manual_seed(3))
    g0, _ = F.mean_grad(floss, params, [(x, y)])
    hv = F.tree_scale(F.hvp(floss, params, [(x, y)], F.unflatten(v, params)), 1.0 / n)
    got = F.flatten(F.perturbation_jvp(params, g0, F.unflatten(v, params), hv, rho, adaptive))
    torch.testing.assert_close(got, J @ v, rtol=1e-9, atol=1e-12)
    # transpose: J^T u = Jw^T u + hess L (Jg^T u)
    u = torch.randn(w.shape[0], dtype=DTYPE, generator=torch.Generator().manual_seed(4))
    dw, dg = F.perturbation_vjp(params, g0, F.unflatten(u, params), rho, adaptive)
    jt_u = F.flatten(dw) + F.flatten(F.hvp(floss, params, [(x, y)], dg)) / n
    torch.testing.assert_close(jt_u, J.T @ u, rtol=1e-9, atol=1e-12)


def test_ggn_matches_dense_jt_h_j_cross_entropy():
    model, names, params, floss = setup("mlp")
    x, y = make_data().tensors
    w = F.flatten(params)
    out_fn = lambda flat: functional_call(model, (F.unflatten(flat, params), floss.frozen), (x,))  # noqa: E731
    Jac = torch.autograd.functional.jacobian(out_fn, w)  # (n, C, P)
    p = torch.softmax(out_fn(w), dim=1)
    G = sum(Jac[i].T @ (torch.diag(p[i]) - torch.outer(p[i], p[i])) @ Jac[i] for i in range(len(y)))
    v = torch.randn(w.shape[0], dtype=DTYPE, generator=torch.Generator().manual_seed(5))
    got = F.flatten(F.ggn_vp(floss, params, [(x, y)], F.unflatten(v, params)))
    torch.testing.assert_close(got, G @ v, rtol=1e-10, atol=1e-12)
    assert torch.linalg.eigvalsh(G).min() > -1e-10  # PSD, unlike the Hessian


def test_per_example_perturbations_are_per_example():
    model, names, params, floss = setup("linear")
    x, y = make_data().tensors
    grads = F.per_example_grads(floss, params, (x, y))
    eps = F.per_example_perturbations(params, grads, 0.1, False)
    for i in [0, 5]:
        one = F.sam_perturbation(params, {k: v[i] for k, v in grads.items()}, 0.1, False)
        for k in params:
            torch.testing.assert_close(eps[k][i], one[k], rtol=0, atol=1e-15)


def test_per_example_grads_at_per_example_weights():
    model, names, params, floss = setup("linear")
    x, y = make_data().tensors
    shift = {k: torch.randn(len(y), *v.shape, dtype=DTYPE) * 0.1 for k, v in params.items()}
    moved = {k: params[k] + shift[k] for k in params}
    got = F.per_example_grads(floss, moved, (x, y), params_per_example=True)
    for i in [0, 7]:
        p = {k: moved[k][i] for k in params}
        ref = F.per_example_grads(floss, p, (x[i : i + 1], y[i : i + 1]))
        for k in params:
            torch.testing.assert_close(got[k][i], ref[k][0], rtol=1e-12, atol=1e-14)


def test_loss_shape_and_reduction_checks():
    with pytest.raises(ValueError, match="reduction='none'"):
        F.check_per_example_loss(torch.nn.CrossEntropyLoss())
    with pytest.raises(TypeError, match="loss_fn"):
        F.check_per_example_loss(None)
    model, names, params, _ = setup("linear")
    bad = F.FunctionalLoss(model, lambda o, t: torch.nn.functional.cross_entropy(o, t), {})
    x, y = make_data().tensors
    with pytest.raises(ValueError, match="per-example loss must return shape"):
        F.summed_grad(bad, params, [(x, y)])
    with pytest.raises(ValueError, match="empty"):
        F.mean_grad(F.FunctionalLoss(model, ce_loss(), {}), params, [])


def test_check_finite_names_what():
    with pytest.raises(ValueError, match="training gradients"):
        F.check_finite({"a": torch.tensor([1.0, float("nan")])}, "training gradients")
    F.check_finite({"a": torch.ones(2)}, "x")


class TiedLinear(torch.nn.Module):
    """Two linear layers sharing one weight: functional_call must re-tie it."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = torch.nn.Linear(5, 5), torch.nn.Linear(5, 3)
        self.c = torch.nn.Linear(5, 5)
        self.c.weight = self.a.weight

    def forward(self, x):
        return self.b(torch.tanh(self.c(torch.tanh(self.a(x)))))


def test_shared_weights_are_tied_and_untied_models_skip_it(tmp_path):
    from captum_sam.gif.tracincp import SAMTracInCP

    torch.manual_seed(0)
    model = TiedLinear().to(DTYPE)
    names = F.attributed_names(model)
    assert "c.weight" not in names  # one name for the shared tensor
    params, frozen = F.detached_params(model, names)
    floss = F.FunctionalLoss(model, ce_loss(), frozen)
    assert floss._tied and not F.FunctionalLoss(mlp_model(), ce_loss(), {})._tied
    data = make_data()
    got = F.flatten(F.per_example_grads(floss, params, data.tensors), batch_dims=1)
    torch.testing.assert_close(got, loop_grads(model, names, data, ce_loss()))
    # the factored path sees the shared weight in one layer only: its check refuses it
    path = tmp_path / "tied.pt"
    save_checkpoint(model, path)

    def make(**kw):
        return SAMTracInCP(model, data, [str(path)], loss_fn=ce_loss(), rho=0.1, **kw)

    fast = make()
    torch.testing.assert_close(fast.self_influence(), make(factorize=False).self_influence())
    assert fast.engines.factored._checked and not any(fast.engines.factored._checked.values())
