"""``nn.Conv2d`` layer sites and SAM-GIF's factored path on CNNs, against autograd loops.

Every reference here is a plain ``torch.autograd.grad`` loop over single examples
(no hooks, no ``vmap``, no factors), so a wrong unfold order, padding or product
would show.
"""

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from captum_sam import core as F
from captum_sam.core.layers import products, sites
from captum_sam.core.projection import LayerProjection
from captum_sam.gif.tracincp import SAMTracInCP
from tests.helpers import DTYPE, assert_unchanged, ce_loss, save_checkpoint, snapshot

CONVS = {
    "plain": dict(in_channels=3, out_channels=4, kernel_size=3),
    "pad-stride": dict(in_channels=3, out_channels=4, kernel_size=3, stride=2, padding=1),
    "dilation-rect": dict(
        in_channels=3, out_channels=5, kernel_size=(3, 2), dilation=(1, 2), padding=(2, 1)
    ),
    "no-bias": dict(in_channels=3, out_channels=4, kernel_size=2, stride=(1, 2), bias=False),
    "same-even": dict(in_channels=3, out_channels=4, kernel_size=(2, 4), padding="same"),
    "valid": dict(in_channels=3, out_channels=2, kernel_size=1, padding="valid"),
}


class ConvNet(nn.Module):
    """One convolution under test, then a linear head (every parameter a site)."""

    def __init__(self, conv: dict) -> None:
        super().__init__()
        self.conv = nn.Conv2d(**conv)
        self.head = nn.LazyLinear(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.conv(x)).flatten(1))


def built(model: nn.Module, x: torch.Tensor) -> nn.Module:
    training = model.training
    model.eval()(x[:1])  # materialise lazy layers (eval: BatchNorm1d sees one example)
    return model.train(training).to(DTYPE)


def loop_grads(model, names, x, y):
    """Per-example gradients ``{name: (n, *shape)}`` by one autograd call per example."""
    params = dict(model.named_parameters())
    rows = []
    for i in range(len(y)):
        loss = ce_loss()(model(x[i : i + 1]), y[i : i + 1]).sum()
        rows.append(torch.autograd.grad(loss, [params[n] for n in names]))
    return {n: torch.stack([r[j] for r in rows]) for j, n in enumerate(names)}


@pytest.mark.parametrize("conv", list(CONVS))
def test_conv_factors_give_the_per_example_gradients(conv):
    torch.manual_seed(0)
    x = torch.randn(5, 3, 7, 9, dtype=DTYPE)
    y = torch.randint(0, 3, (5,))
    model = built(ConvNet(CONVS[conv]), x.float())
    names = F.attributed_names(model)
    found = sites.layer_sites(model, names)
    assert found is not None and [s.kind for s in found] == ["conv2d", "linear"]
    params, frozen = F.detached_params(model, names)
    floss = F.FunctionalLoss(model, ce_loss(), frozen)
    factors = sites.layer_factors(floss, params, (x, y), found)
    got = {}
    for site, (a, d) in zip(found, factors):
        got.update(sites.site_grads(a, d, site))
    ref = loop_grads(model, names, x, y)
    assert set(got) == set(ref)
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-10, atol=1e-12)
    assert sites.matches_vmap(floss, params, (x, y), found)

    # every product, on factors and on formed gradients, against the formed loop gradients
    flat = torch.cat([ref[n].flatten(1) for n in names], 1)
    q = {n: v + 0.05 * torch.randn_like(v) for n, v in params.items()}
    moved = sites.layer_factors(floss, q, (x, y), found)
    model_q = copy.deepcopy(model)
    with torch.no_grad():
        for n, p in model_q.named_parameters():
            p.copy_(q[n])
    flat_q = torch.cat([v.flatten(1) for v in loop_grads(model_q, names, x, y).values()], 1)
    for left in (factors, products.compact(factors, found)):
        dots = products.factor_dots(left, moved, found)
        torch.testing.assert_close(dots, (flat * flat_q).sum(1), rtol=1e-10, atol=1e-12)
        cross = products.factor_cross(left, moved, found)
        torch.testing.assert_close(cross, flat @ flat_q.T, rtol=1e-10, atol=1e-12)
    rows = {n: ref[n][:2].flatten(1) for n in names}
    applied = products.factor_apply(moved, rows, found)
    torch.testing.assert_close(applied, flat[:2] @ flat_q.T, rtol=1e-10, atol=1e-12)
    summed = products.factor_grad_sum(moved, found)
    for n in names:
        want = loop_grads(model_q, [n], x, y)[n].sum(0)
        torch.testing.assert_close(summed[n], want, rtol=1e-10, atol=1e-12)


def test_layer_projection_from_factors_equals_projecting_formed_gradients():
    torch.manual_seed(1)
    x, y = torch.randn(4, 3, 6, 6, dtype=DTYPE), torch.randint(0, 3, (4,))
    model = built(ConvNet(CONVS["pad-stride"]), x.float())
    names = F.attributed_names(model)
    found = sites.layer_sites(model, names)
    params, frozen = F.detached_params(model, names)
    factors = sites.layer_factors(F.FunctionalLoss(model, ce_loss(), frozen), params, (x, y), found)
    sizes = {n: p.numel() for n, p in params.items()}
    layers = [(s.weight, s.bias, s.d_out, s.d_in) for s in found]
    proj = LayerProjection(sizes, layers, 24, seed=3)
    assert proj.dim <= 24
    ref = loop_grads(model, names, x, y)
    flat = torch.cat([ref[n].flatten(1) for n in names], 1)
    got = proj.project_factors(factors, [(s.weight, s.bias) for s in found])
    torch.testing.assert_close(got, proj(flat), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(proj(flat), kronecker(proj, layers, ref), rtol=1e-10, atol=1e-12)


def kronecker(proj, layers, grads):
    """The definition: per layer ``P_out^T [W, b] P_in`` of every row, flattened, in order."""
    blocks = []
    for i, (w, b, d_out, d_in) in enumerate(layers):
        parts = [] if w is None else [grads[w].reshape(-1, d_out, d_in)]
        parts += [] if b is None else [grads[b].reshape(-1, d_out, 1)]
        g = torch.cat(parts, -1)
        p_out, p_in = (proj.side(i, j, DTYPE, torch.device("cpu")) for j in (0, 1))
        p_out = torch.eye(g.shape[1], dtype=DTYPE) if p_out is None else p_out
        p_in = torch.eye(g.shape[2], dtype=DTYPE) if p_in is None else p_in
        assert p_out.shape[1] * p_in.shape[1] <= proj.dim
        blocks.append((p_out.T @ g @ p_in).flatten(1))
    return torch.cat(blocks, 1)


# ---------------------------------------------------------------- SAM-GIF on CNNs


class SmallCNN(nn.Sequential):
    """Conv2d-ReLU-MaxPool-Flatten-Linear."""

    def __init__(self) -> None:
        super().__init__(
            nn.Conv2d(3, 4, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(64, 3),
        )


class DeepCNN(nn.Sequential):
    """Several convolutions: stride, padding, dilation, no bias, ``"same"``."""

    def __init__(self) -> None:
        super().__init__(
            nn.Conv2d(3, 4, 3, stride=2, padding=1, bias=False),
            nn.Tanh(),
            nn.Conv2d(4, 5, (3, 2), dilation=(1, 2), padding=(2, 1)),
            nn.ReLU(),
            nn.Conv2d(5, 3, 2, padding="same"),
            nn.Flatten(),
            nn.LazyLinear(3),
        )


class GroupedCNN(nn.Sequential):
    """A grouped convolution (not a site) and a BatchNorm: the whole model falls back."""

    def __init__(self) -> None:
        super().__init__(
            nn.Conv2d(3, 4, 3, padding=1),
            nn.BatchNorm2d(4),
            nn.Conv2d(4, 4, 3, groups=2),
            nn.ReLU(),
            nn.Flatten(),
            nn.LazyLinear(3),
        )


class BatchNormCNN(nn.Sequential):
    """Convolutions, BatchNorm2d/1d and linear layers: every parameter a site."""

    def __init__(self) -> None:
        super().__init__(
            nn.Conv2d(3, 4, 3, padding=1, bias=False),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.Conv2d(4, 3, 3, stride=2),
            nn.BatchNorm2d(3, affine=False),  # no parameters: not a site, nothing to attribute
            nn.Flatten(),
            nn.LazyLinear(6),
            nn.BatchNorm1d(6),
            nn.Tanh(),
            nn.Linear(6, 3),
        )


def checkpoints(model, tmp_path, count=2):
    """``count`` checkpoints of ``model`` (weights moved a little each time), their rates."""
    model = copy.deepcopy(model)
    paths, rates = [], []
    g = torch.Generator().manual_seed(5)
    for c in range(count):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
            for m in model.modules():
                if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):  # non-trivial statistics
                    m.running_mean.uniform_(-0.5, 0.5, generator=g)
                    m.running_var.uniform_(0.5, 2.0, generator=g)
        rates.append(0.1 * (c + 1))
        paths.append(save_checkpoint(model, tmp_path / f"c{c}.pt", rates[-1]))
    return paths, rates


def flatten(grads, names):
    """``{name: (n, *shape)}`` as ``(n, P)`` rows in the order of ``names``."""
    return torch.cat([grads[n].flatten(1) for n in names], 1)


def brute_scores(model, path_rates, train, test, rho, layers, project=None):
    """Influence ``(n_test, n_train)`` and self influence ``(n_train,)``, autograd loops only.

    Per checkpoint: the SAM perturbation from the mean training gradient over every
    trainable parameter (``rho g / (||g|| + 1e-12)``), test gradients at ``w``,
    training gradients at ``w + eps`` with respect to the attributed parameters.
    ``project(grads, names)``: rows ``(n, D)`` from gradients (default: flattened).
    """
    project = project or flatten
    (x, y), (xt, yt) = train, test
    influence, self_infl = 0, 0
    for path, lr in path_rates:
        m = copy.deepcopy(model)
        m.load_state_dict(torch.load(path)["model_state"])
        m.eval()
        every = [n for n, p in m.named_parameters() if p.requires_grad]
        names = every if layers is None else [n for n in every if n.rsplit(".", 1)[0] in layers]
        params = dict(m.named_parameters())
        mean = ce_loss()(m(x), y).mean()
        g = torch.autograd.grad(mean, [params[n] for n in every])
        norm = torch.norm(torch.stack([t.norm() for t in g]))
        test_w = project(loop_grads(m, names, xt, yt), names)
        train_w = project(loop_grads(m, names, x, y), names)
        with torch.no_grad():
            for n, t in zip(every, g):
                params[n].add_(rho * t / (norm + 1e-12))
        train_moved = project(loop_grads(m, names, x, y), names)
        influence = influence + lr * test_w @ train_moved.T
        self_infl = self_infl + lr * (train_w * train_moved).sum(1)
    return influence, self_infl


def cnn_data(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 8, 8, generator=g, dtype=DTYPE), torch.randint(0, 3, (n,), generator=g)


@pytest.mark.parametrize("rho", [0.0, 0.2])
@pytest.mark.parametrize(
    "net,layers",
    [
        ("small", None),
        ("small", ["0"]),
        ("deep", None),
        ("deep", ["2", "6"]),
        ("grouped", None),  # falls back to vmap as a whole
        ("grouped", ["0", "5"]),  # the sites alone are attributed: factored
        ("batchnorm", None),  # BatchNorm layers are elementwise sites
        ("batchnorm", ["1", "7"]),  # BatchNorm layers alone
    ],
)
def test_sam_tracincp_on_cnns_equals_autograd_loops(tmp_path, net, layers, rho):
    torch.manual_seed(0)
    x, y = cnn_data(12, 0)
    xt, yt = cnn_data(4, 1)
    nets = {"small": SmallCNN, "deep": DeepCNN, "grouped": GroupedCNN, "batchnorm": BatchNormCNN}
    model = nets[net]()
    model = built(model, x.float())
    before = snapshot(model)
    paths, rates = checkpoints(model, tmp_path)
    est = SAMTracInCP(
        model, TensorDataset(x, y), paths, loss_fn=ce_loss(), batch_size=5, rho=rho, layers=layers
    )
    influence, self_infl = est.influence((xt, yt)), est.self_influence()
    ref_influence, ref_self = brute_scores(model, zip(paths, rates), (x, y), (xt, yt), rho, layers)
    torch.testing.assert_close(influence, ref_influence, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(self_infl, ref_self, rtol=1e-10, atol=1e-10)
    factored = est.engines.factored
    if net == "grouped" and layers is None:
        assert factored.sites is None  # BatchNorm and grouped weights: vmap for all
    else:
        kind = "batchnorm" if net == "batchnorm" else "conv2d"
        assert factored.sites is not None and any(s.kind == kind for s in factored.sites)
        assert factored._checked and all(factored._checked.values())  # it really ran
    assert_unchanged(model, before)


@pytest.mark.parametrize("kw", [dict(rho=0.2), dict(rho=0.2, test_at_perturbed=True)])
def test_cnn_aggregate_and_top_k_equal_the_vmap_path(tmp_path, kw):
    x, y = cnn_data(10, 2)
    xt, yt = cnn_data(3, 3)
    model = built(DeepCNN(), x.float())
    paths, _ = checkpoints(model, tmp_path)

    def make(**f):
        return SAMTracInCP(
            model, TensorDataset(x, y), paths, loss_fn=ce_loss(), batch_size=4, **kw, **f
        )

    fast, slow = make(), make(factorize=False)
    for aggregate in (False, True):
        torch.testing.assert_close(
            fast.influence((xt, yt), aggregate=aggregate),
            slow.influence((xt, yt), aggregate=aggregate),
            rtol=1e-10,
            atol=1e-12,
        )
    torch.testing.assert_close(fast.self_influence(), slow.self_influence(), rtol=1e-10, atol=1e-12)
    top, want = fast.influence((xt, yt), k=3), slow.influence((xt, yt), k=3)
    assert torch.equal(top.indices, want.indices)
    assert fast.engines.factored.sites is not None


@pytest.mark.parametrize("rho", [0.0, 0.2])
def test_cnn_projection_is_the_per_layer_kronecker_projection(tmp_path, rho):
    x, y = cnn_data(10, 4)
    xt, yt = cnn_data(3, 5)
    model = built(DeepCNN(), x.float())
    paths, rates = checkpoints(model, tmp_path)

    def make(**f):
        return SAMTracInCP(
            model, TensorDataset(x, y), paths, loss_fn=ce_loss(), batch_size=4, rho=rho,
            projection_dim=40, projection_seed=2, **f,
        )  # fmt: skip

    fast, slow = make(), make(factorize=False)
    names = F.attributed_names(model)
    found = sites.layer_sites(model, names)
    sizes = {n: p.numel() for n, p in model.named_parameters()}
    layers = [(s.weight, s.bias, s.d_out, s.d_in) for s in found]
    proj = LayerProjection(sizes, layers, 40, seed=2)
    ref_influence, ref_self = brute_scores(
        model, zip(paths, rates), (x, y), (xt, yt), rho, None,
        project=lambda grads, _: kronecker(proj, layers, grads),
    )  # fmt: skip
    for est in (fast, slow):
        torch.testing.assert_close(est.influence((xt, yt)), ref_influence, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(est.self_influence(), ref_self, rtol=1e-10, atol=1e-10)
    assert fast.engines.factored.projector is not None and fast.engines.factored._checked


@pytest.mark.parametrize("perturbation", ["dataset", "batch"])
@pytest.mark.parametrize("net", [DeepCNN, BatchNormCNN], ids=["deep", "batchnorm"])
def test_cnn_trajectory_form_factored_equals_vmap(tmp_path, perturbation, net):
    """The recorded steps of a CNN, scored together on the factored path (``vmap`` over
    the steps: a BatchNorm site reads the stacked running statistics of each step)."""
    from captum_sam import train_sam

    x, y = cnn_data(14, 6)
    xt, yt = cnn_data(3, 7)
    model = built(net(), x.float())
    train = TensorDataset(x, y)
    record = tmp_path / "run"
    train_sam(model, train, ce_loss(), epochs=2, lr=0.1, rho=0.1, batch_size=5, record_dir=record)

    def make(**f):
        return SAMTracInCP.from_trajectory(
            model, train, record, loss_fn=ce_loss(), perturbation=perturbation, **f
        )

    fast, slow = make(), make(factorize=False)
    torch.testing.assert_close(fast.self_influence(), slow.self_influence(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(
        fast.influence((xt, yt)), slow.influence((xt, yt)), rtol=1e-10, atol=1e-12
    )
    factored = fast.engines.factored
    assert factored.sites is not None and factored._checked and all(factored._checked.values())


@pytest.mark.parametrize("dims", [2, 4], ids=["BatchNorm1d", "BatchNorm2d"])
def test_batchnorm_factors_use_the_statistics_functional_call_is_given(dims):
    """Per-example gradients of an eval-mode BatchNorm site at buffers that are not the
    module's own (a checkpoint's running statistics), against autograd loops."""
    torch.manual_seed(1)
    bn = nn.BatchNorm1d(4) if dims == 2 else nn.BatchNorm2d(4)
    model = nn.Sequential(nn.Linear(5, 4) if dims == 2 else nn.Conv2d(2, 4, 3), bn,
                          nn.Tanh(), nn.Flatten(), nn.LazyLinear(3))  # fmt: skip
    x = torch.randn(6, 5, dtype=DTYPE) if dims == 2 else torch.randn(6, 2, 5, 5, dtype=DTYPE)
    y = torch.randint(0, 3, (6,))
    model = built(model, x.float()).eval()
    names = F.attributed_names(model)
    found = sites.layer_sites(model, names)
    assert found is not None and [s.kind for s in found][1] == "batchnorm"
    params, frozen = F.detached_params(model, names)
    stats = {
        "1.running_mean": torch.randn(4, dtype=DTYPE),
        "1.running_var": torch.rand(4, dtype=DTYPE) + 0.5,
    }
    frozen = {**frozen, **stats}  # what a checkpoint holds: the module keeps its own
    floss = F.FunctionalLoss(model, ce_loss(), frozen)
    got = {}
    for site, (a, d) in zip(found, sites.layer_factors(floss, params, (x, y), found)):
        got.update(sites.site_grads(a, d, site))
    reference = copy.deepcopy(model)
    with torch.no_grad():
        reference[1].running_mean.copy_(stats["1.running_mean"])
        reference[1].running_var.copy_(stats["1.running_var"])
    ref = loop_grads(reference, names, x, y)
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-10, atol=1e-12)
    assert sites.matches_vmap(floss, params, (x, y), found)
    flat = torch.cat([ref[n].flatten(1) for n in names], 1)
    factors = sites.layer_factors(floss, params, (x, y), found)
    torch.testing.assert_close(products.factor_cross(factors, factors, found), flat @ flat.T)
    torch.testing.assert_close(products.factor_dots(factors, factors, found), (flat * flat).sum(1))
    rows = {n: ref[n][:2].flatten(1) for n in names}
    torch.testing.assert_close(products.factor_apply(factors, rows, found), flat[:2] @ flat.T)
    summed = products.factor_grad_sum(factors, found)
    for n in names:
        torch.testing.assert_close(summed[n], ref[n].sum(0))
    model.train()  # batch statistics couple the examples: not factored
    assert not sites.matches_vmap(floss, params, (x, y), found)


def test_batchnorm_sites_with_a_projection_equal_the_vmap_path(tmp_path):
    """BatchNorm parameters are projected densely (no Kronecker structure) on both paths."""
    x, y = cnn_data(10, 4)
    xt, yt = cnn_data(3, 5)
    model = built(BatchNormCNN(), x.float())
    paths, _ = checkpoints(model, tmp_path)

    def make(**f):
        return SAMTracInCP(model, TensorDataset(x, y), paths, loss_fn=ce_loss(), batch_size=4,
                           rho=0.1, projection_dim=40, **f)  # fmt: skip

    fast, slow = make(), make(factorize=False)
    assert fast.engines.vmap.projector.rest  # the BatchNorm parameters
    # the factored path takes them too (formed elementwise, then projected densely)
    assert fast.engines.factored.projector is fast.engines.vmap.projector
    calls = []
    vmap = F.per_example_grads
    with pytest.MonkeyPatch.context() as m:
        m.setattr(F, "per_example_grads", lambda *a, **k: calls.append(1) or vmap(*a, **k))
        got, got_self = fast.influence((xt, yt)), fast.self_influence()
    torch.testing.assert_close(got, slow.influence((xt, yt)))
    torch.testing.assert_close(got_self, slow.self_influence())
    assert len(calls) <= 2  # the one-off checks of the factors (train and test loss)


@pytest.mark.parametrize("net", [DeepCNN, BatchNormCNN], ids=["deep", "batchnorm"])
def test_influence_one_checkpoint_at_a_time_equals_all_at_once(tmp_path, monkeypatch, net):
    """Over the test-row budget, influence takes the checkpoints one at a time (a pass
    over the training data each, no new pass for the perturbation): the same scores."""
    from captum_sam.gif import checkpoint_form

    x, y = cnn_data(11, 8)
    xt, yt = cnn_data(4, 9)
    model = built(net(), x.float())
    paths, _ = checkpoints(model, tmp_path, count=3)

    def make():
        return SAMTracInCP(model, TensorDataset(x, y), paths, loss_fn=ce_loss(), batch_size=4,
                           rho=0.2)  # fmt: skip

    together = make()
    want, want_top = together.influence((xt, yt)), together.influence((xt, yt), k=3)
    calls = []
    original = checkpoint_form.CheckpointForm._columns_by_term

    def spy(self, *args, **kw):
        calls.append(1)
        return original(self, *args, **kw)

    monkeypatch.setattr(checkpoint_form, "TEST_BUDGET_BYTES", 0)
    monkeypatch.setattr(checkpoint_form.CheckpointForm, "_columns_by_term", spy)
    apart = make()
    grad_passes = []
    summed = F.stacked_grad_sum

    def counted(*args, **kw):
        grad_passes.append(1)
        return summed(*args, **kw)

    monkeypatch.setattr(F, "stacked_grad_sum", counted)
    torch.testing.assert_close(apart.influence((xt, yt)), want, rtol=1e-10, atol=1e-12)
    assert calls, "the one-checkpoint-at-a-time path did not run"
    assert len(grad_passes) == 1  # the perturbations of all checkpoints, once
    top = apart.influence((xt, yt), k=3)
    torch.testing.assert_close(top.influence_scores, want_top.influence_scores)
    assert torch.equal(top.indices, want_top.indices)


def hif(model, data, path, **kw):
    from captum_sam import SAMInfluenceFunction

    return SAMInfluenceFunction(model, data, path, loss_fn=ce_loss(), batch_size=4, rho=0.2,
                                projection_dim=None, **kw)  # fmt: skip


@pytest.mark.parametrize("variant", ["plain", "fast", "exact"])
@pytest.mark.parametrize("net", [BatchNormCNN, GroupedCNN], ids=["batchnorm", "grouped"])
def test_hif_gradients_from_factors_equal_vmap(tmp_path, monkeypatch, net, variant):
    """The Hessian family forms per-example gradients from layer factors when every
    attributed parameter is in a site (Conv2d, eval-mode BatchNorm, Linear): the same
    scores as ``vmap``, and ``vmap`` runs only for the one-off check. A grouped
    convolution is not a site: ``vmap`` throughout, the same scores."""
    x, y = cnn_data(10, 3)
    xt, yt = cnn_data(5, 4)
    model = built(net(), x.float())
    before = snapshot(model)
    path = checkpoints(model, tmp_path, count=1)[0][0]
    slow = hif(model, TensorDataset(x, y), path, variant=variant, factorize=False)
    want, want_self = slow.influence((xt, yt)), slow.self_influence()
    calls = []
    original = F.per_example_grads

    def counted(*args, **kw):
        calls.append(1)
        return original(*args, **kw)

    monkeypatch.setattr(F, "per_example_grads", counted)
    fast = hif(model, TensorDataset(x, y), path, variant=variant)
    torch.testing.assert_close(fast.influence((xt, yt)), want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(fast.self_influence(), want_self, rtol=1e-10, atol=1e-12)
    if net is BatchNormCNN:
        assert fast._grad_sites is not None
        assert len(calls) == 1  # the check on the first batch (one loss function)
    else:
        assert fast._grad_sites is None
        assert len(calls) >= 8  # every batch by vmap (3 + 2 + 3 at least)
    assert_unchanged(model, before)


@pytest.mark.parametrize("held", [None, 0, 1.5])
@pytest.mark.parametrize(
    "kw",
    [
        dict(variant="fast", curvature="ekfac", layers=["0", "3", "6", "9"]),
        dict(variant="plain", curvature="kfac", layers=["0", "3", "6", "9"]),
        dict(variant="full", solver="gmres", curvature="ggn", damping=0.1),
    ],
    ids=["fast-ekfac", "plain-kfac", "full-gmres"],
)
def test_hif_scores_from_held_training_factors_equal_vmap(tmp_path, monkeypatch, kw, held):
    """With a solved test side (iterative solver, K-FAC/EK-FAC), ``influence`` multiplies
    the test rows with the training gradients site by site, formed from the factors of
    several batches held at once (``TRAIN_HELD_BYTES``: all 3 batches, every batch on
    its own, or about two at a time): the scores and top-k of ``factorize=False``
    (``vmap``, one ``(B, P)`` block per batch), and no ``vmap`` after the check."""
    from captum_sam.core.layers import products as layer_products
    from captum_sam.hif import sides

    x, y = cnn_data(10, 3)
    xt, yt = cnn_data(5, 4)
    model = built(BatchNormCNN(), x.float())
    before = snapshot(model)
    path = checkpoints(model, tmp_path, count=1)[0][0]
    slow = hif(model, TensorDataset(x, y), path, factorize=False, **kw)
    want, want_top = slow.influence((xt, yt)), slow.influence((xt, yt), k=3, proponents=False)
    fast = hif(model, TensorDataset(x, y), path, **kw)
    if held == 1.5:  # one and a half batches of factors (float64): two, then one
        sizes = []
        size_of = layer_products.entry_floats
        monkeypatch.setattr(
            layer_products, "entry_floats", lambda f: sizes.append(size_of(f)) or sizes[-1]
        )
        fast.influence((xt, yt))
        held = int(1.5 * sizes[0] * 8)
    if held is not None:
        monkeypatch.setattr(sides, "TRAIN_HELD_BYTES", held)
    flushed = []
    original = sides._flush

    def counted(site_list, offsets, q, pending):
        flushed.append(len(pending))
        yield from original(site_list, offsets, q, pending)

    monkeypatch.setattr(sides, "_flush", counted)
    from captum_sam.hif.kfac import KroneckerCurvature

    rotated = []  # per solve, which blocks came as layer factors (not formed gradients)
    by_blocks = KroneckerCurvature._apply_blocks

    def spied(self, blocks, scale):
        rotated.append([isinstance(b, tuple) for b in blocks])
        return by_blocks(self, blocks, scale)

    monkeypatch.setattr(KroneckerCurvature, "_apply_blocks", spied)
    calls = []
    vmap = F.per_example_grads
    monkeypatch.setattr(F, "per_example_grads", lambda *a, **k: calls.append(1) or vmap(*a, **k))
    tol = 1e-6 if "solver" in kw else 1e-10  # gmres: other rounding, other iterates
    torch.testing.assert_close(fast.influence((xt, yt)), want, rtol=tol, atol=tol)
    top = fast.influence((xt, yt), k=3, proponents=False)
    torch.testing.assert_close(top.influence_scores, want_top.influence_scores, rtol=tol, atol=tol)
    assert torch.equal(top.indices, want_top.indices)
    assert len(calls) <= 1  # the one-off check of the factors against vmap
    if kw.get("curvature") in ("kfac", "ekfac"):  # test rows solved from layer factors
        assert rotated and all(r == [True] * 4 for r in rotated)
    held_per_flush = {None: [3], 0: [1, 1, 1]}.get(held, [2, 1])
    assert [n for n in flushed if n] == held_per_flush * 2  # influence, then top-k
    assert_unchanged(model, before)


@pytest.mark.parametrize("solver", ["dense", "cg"])
def test_hif_influence_in_test_groups_equals_all_at_once(tmp_path, monkeypatch, solver):
    """Over the test-row budget, influence solves the test examples in groups, one pass
    over the training data per group: the same scores and top-k."""
    from captum_sam.hif import sides

    x, y = cnn_data(11, 5)
    xt, yt = cnn_data(10, 6)
    model = built(BatchNormCNN(), x.float())
    path = checkpoints(model, tmp_path, count=1)[0][0]
    # cg: a positive-definite A (damped GGN), so the solves converge
    est = hif(model, TensorDataset(x, y), path, variant="fast", solver=solver, curvature="ggn",
              damping=0.1)  # fmt: skip
    want, want_top = est.influence((xt, yt)), est.influence((xt, yt), k=3)
    passes = []
    original = sides.score_blocks

    def counted(*args, **kw):  # one entry per training batch scored
        for block in original(*args, **kw):
            passes.append(1)
            yield block

    monkeypatch.setattr(sides, "score_blocks", counted)
    q = est.compute_intermediate_quantities((xt[:1], yt[:1]), test=True)
    row_bytes = q.element_size() * q.shape[1]  # P wide solved, the rank with "dense"
    monkeypatch.setattr(sides, "TEST_BUDGET_BYTES", 4 * row_bytes)  # one test batch a group
    # cg solves each block of columns to 1e-6: other blocks, other rounding
    tol = 1e-10 if solver == "dense" else 1e-5
    loader = DataLoader(TensorDataset(xt, yt), batch_size=4)  # a tuple is one batch
    torch.testing.assert_close(est.influence(loader), want, rtol=tol, atol=tol)
    assert len(passes) == 3 * 3  # 3 groups (4 + 4 + 2 rows) x 3 training batches
    top = est.influence(loader, k=3)
    torch.testing.assert_close(top.influence_scores, want_top.influence_scores, rtol=tol, atol=tol)
    assert torch.equal(top.indices, want_top.indices)
    monkeypatch.setattr(sides, "TEST_BUDGET_BYTES", 8 * 3 * row_bytes)  # pieces of 3 rows
    passes.clear()
    pieces = []
    solve = sides.test_rows

    def recorded(est_, batch, *args):
        pieces.append(len(batch[-1]))
        return solve(est_, batch, *args)

    monkeypatch.setattr(sides, "test_rows", recorded)
    torch.testing.assert_close(est.influence((xt, yt)), want, rtol=tol, atol=tol)
    assert pieces == [3, 3, 3, 1]

    class Stream(torch.utils.data.IterableDataset):  # no length: the group buffer grows
        def __iter__(self):
            return iter(zip(xt, yt))

    passes.clear()
    stream = DataLoader(Stream(), batch_size=2)
    torch.testing.assert_close(est.influence(stream), want, rtol=tol, atol=tol)
    assert len(passes) == 3  # 5 batches of 2 rows grown into one group of 10
    assert len(passes) == 3  # one tuple of 10 rows in pieces of 3: one group
    agg = est.influence(loader, aggregate=True)
    torch.testing.assert_close(agg, want.sum(0, keepdim=True), rtol=tol, atol=tol)


def spy_pieces_and_passes(monkeypatch):
    """Lists that record each solved test piece's size and each pass over the training data."""
    from captum_sam.hif import sides

    pieces, passes = [], []
    solve, score = sides.test_rows, sides.score_blocks

    def recorded(est_, batch, *args):
        pieces.append(len(batch[-1]))
        return solve(est_, batch, *args)

    def counted(*args, **kw):
        passes.append(1)
        yield from score(*args, **kw)

    monkeypatch.setattr(sides, "test_rows", recorded)
    monkeypatch.setattr(sides, "score_blocks", counted)
    return pieces, passes


def test_hif_direct_inverse_solves_small_pieces(tmp_path, monkeypatch):
    """With a direct inverse (EK-FAC, ``fast``) the test rows are solved in pieces of
    ``budget / DIRECT_PIECES`` (here 3 rows), not ``budget / 8`` (24 rows): one group
    of 10, the scores of an unlimited budget."""
    from captum_sam.hif import sides

    x, y = cnn_data(11, 5)
    xt, yt = cnn_data(10, 6)
    model = built(BatchNormCNN(), x.float())
    path = checkpoints(model, tmp_path, count=1)[0][0]
    est = hif(model, TensorDataset(x, y), path, variant="fast", curvature="ekfac",
              layers=["0", "3", "6", "9"])  # fmt: skip
    want = est.influence((xt, yt))
    row_bytes = est.operator.dim * 8  # P-wide solved rows, float64
    monkeypatch.setattr(sides, "TEST_BUDGET_BYTES", sides.DIRECT_PIECES * 3 * row_bytes)
    pieces, passes = spy_pieces_and_passes(monkeypatch)
    torch.testing.assert_close(est.influence((xt, yt)), want, rtol=1e-10, atol=1e-12)
    assert pieces == [3, 3, 3, 1]
    assert len(passes) == 1


def test_hif_test_groups_are_filled_exactly(tmp_path, monkeypatch):
    """When the pieces of a test batch do not divide a group (pieces of 2 rows, groups of
    21), the last piece of a group is cut to the room left: 42 test rows in 2 groups (2
    passes over the training data), not 3, and the scores of one group."""
    from captum_sam.hif import sides

    x, y = cnn_data(11, 5)
    xt, yt = cnn_data(42, 7)
    model = built(BatchNormCNN(), x.float())
    path = checkpoints(model, tmp_path, count=1)[0][0]
    est = hif(model, TensorDataset(x, y), path, variant="fast", solver="cg", curvature="ggn",
              damping=0.1)  # fmt: skip
    want = est.influence((xt, yt))
    row_bytes = est.operator.dim * 8  # P-wide solved rows, float64
    pieces, passes = spy_pieces_and_passes(monkeypatch)
    monkeypatch.setattr(sides, "TEST_BUDGET_BYTES", 21 * row_bytes)
    # cg solves each block of columns to 1e-6: other blocks, other rounding
    torch.testing.assert_close(est.influence((xt, yt)), want, rtol=1e-5, atol=1e-5)
    assert pieces == ([2] * 10 + [1]) * 2
    assert len(passes) == 2


@pytest.mark.parametrize(
    "variant,curvature", [("fast", "ekfac"), ("plain", "kfac"), ("fast", "kfac")]
)
def test_hif_kronecker_influence_in_layer_groups_equals_all_at_once(
    tmp_path, monkeypatch, variant, curvature
):
    """With a direct Kronecker inverse over the test-row budget, influence takes groups of
    layers (every test row, a slice of rows for a layer too large alone), one pass over
    the training data per group taking that group's layer factors only: the scores and
    top-k of one group."""
    from captum_sam.core.layers import sites as layer_sites
    from captum_sam.hif import sides, site_groups

    x, y = cnn_data(11, 5)
    xt, yt = cnn_data(10, 6)
    model = built(BatchNormCNN(), x.float())
    path = checkpoints(model, tmp_path, count=1)[0][0]
    est = hif(model, TensorDataset(x, y), path, variant=variant, curvature=curvature,
              layers=["0", "3", "6", "9"])  # fmt: skip
    want, want_top = est.influence((xt, yt)), est.influence((xt, yt), k=3)
    # float64 rows of 10 test examples: layer 9 1680 bytes, 6 13440, 3 8880, 0 8640
    monkeypatch.setattr(sides, "TEST_BUDGET_BYTES", 10000)
    groups = site_groups.plan(est, (xt, yt), sides.TEST_BUDGET_BYTES)
    assert [(g.names, g.rows) for g in groups] == [
        (["9.weight", "9.bias"], (0, 10)),
        (["6.weight", "6.bias"], (0, 7)),
        (["6.weight", "6.bias"], (7, 10)),
        (["3.weight", "3.bias"], (0, 10)),
        (["0.weight"], (0, 10)),
    ]
    taken, passes = [], []
    factors, score = layer_sites.layer_factors, sides.score_blocks

    def spied(loss, params, batch, sites):
        taken.append((sorted(params), [s.weight for s in sites]))
        return factors(loss, params, batch, sites)

    def counted(est_, q, batches, group=None):
        passes.append(None if group is None else group.names)
        yield from score(est_, q, batches, group)

    monkeypatch.setattr(layer_sites, "layer_factors", spied)
    monkeypatch.setattr(sides, "score_blocks", counted)
    torch.testing.assert_close(est.influence((xt, yt)), want, rtol=1e-10, atol=1e-12)
    assert passes == [g.names for g in groups]
    # every pass (test and training side) differentiates its group's parameters only
    assert {tuple(names) for names, _ in taken} == {tuple(sorted(g.names)) for g in groups}
    top = est.influence(DataLoader(TensorDataset(xt, yt), batch_size=4), k=3)
    torch.testing.assert_close(top.influence_scores, want_top.influence_scores, rtol=1e-10,
                               atol=1e-12)  # fmt: skip
    assert torch.equal(top.indices, want_top.indices)
    # rows that come in another order each pass are refused; rows of unknown number
    # (drop_last) are scored by groups of rows instead
    test_set = TensorDataset(xt, yt)
    with pytest.raises(ValueError, match="`inputs` .* order changes between passes"):
        est.influence(DataLoader(test_set, batch_size=4, shuffle=True))
    own_order = DataLoader(test_set, batch_sampler=[[9, 0, 1], list(range(2, 9))])
    assert site_groups.plan(est, own_order, sides.TEST_BUDGET_BYTES) is None  # by rows
    torch.testing.assert_close(est.influence(own_order), want[[9, *range(9)]], rtol=1e-10,
                               atol=1e-12)  # fmt: skip
    dropped = DataLoader(TensorDataset(xt, yt), batch_size=4, drop_last=True)
    assert site_groups.plan(est, dropped, sides.TEST_BUDGET_BYTES) is None
    passes.clear()
    agg = est.influence((xt, yt), aggregate=True)  # one summed row: one pass, every layer
    torch.testing.assert_close(agg, want.sum(0, keepdim=True), rtol=1e-10, atol=1e-12)
    assert passes == [None]


class HeldProjection(nn.Module):
    """A linear layer after a matrix the module holds itself (not given to functional_call)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.proj = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x @ self.proj)


def test_the_factored_check_runs_in_float64_for_float32_weights(monkeypatch):
    """float32 weights are compared in float64 (a deep net's float32 rounding alone
    separates factored and vmap gradients by far more than any tolerance that still
    catches structure); a batch-coupling model is still refused; a model holding a
    float32 tensor of its own falls back to the check in float32."""
    from tests.helpers import BatchCentred

    seen = []
    original = F.per_example_grads

    def spy(floss, params, batch, **kw):
        seen.append(next(iter(params.values())).dtype)
        return original(floss, params, batch, **kw)

    monkeypatch.setattr(F, "per_example_grads", spy)

    def check(model, x):
        model = model.float().eval()
        names = [n for n, _ in model.named_parameters()]
        params = {n: p.detach() for n, p in model.named_parameters()}
        floss = F.FunctionalLoss(model, ce_loss(), {}, "none")
        found = sites.layer_sites(model, names)
        y = torch.randint(0, 3, (len(x),), generator=torch.Generator().manual_seed(1))
        return sites.matches_vmap(floss, params, (x, y), found)

    x, _ = cnn_data(6, 2)
    assert check(built(SmallCNN(), x.float()), x.float())
    assert seen == [torch.float64]
    seen.clear()
    torch.manual_seed(0)
    assert not check(BatchCentred(), torch.randn(6, 5))
    assert seen == [torch.float64]
    seen.clear()
    assert check(HeldProjection(), torch.randn(6, 5))
    assert seen == [torch.float32]  # widening failed (float64 @ float32): own dtype


@pytest.mark.parametrize("projection_dim", [None, 40])
@pytest.mark.parametrize("net", [DeepCNN, BatchNormCNN], ids=["deep", "batchnorm"])
def test_gif_test_batch_in_pieces_equals_one_piece(tmp_path, monkeypatch, net, projection_dim):
    """A test batch larger than TEST_PIECE_ROWS is factored a piece at a time into one
    preallocated store: the same scores, top-k and aggregate (formed, factored and
    projected representations)."""
    from captum_sam.gif import factored_grads

    x, y = cnn_data(9, 10)
    xt, yt = cnn_data(7, 11)
    model = built(net(), x.float())
    paths, _ = checkpoints(model, tmp_path, count=2)
    est = SAMTracInCP(model, TensorDataset(x, y), paths, loss_fn=ce_loss(), batch_size=4,
                      rho=0.2, projection_dim=projection_dim)  # fmt: skip
    want, want_agg = est.influence((xt, yt)), est.influence((xt, yt), aggregate=True)
    want_top = est.influence((xt, yt), k=3)
    cut = []
    original = factored_grads.slice_batch

    def spy(batch, start, stop):
        cut.append(start)
        return original(batch, start, stop)

    monkeypatch.setattr(factored_grads, "slice_batch", spy)
    monkeypatch.setattr(factored_grads, "TEST_PIECE_ROWS", 3)
    torch.testing.assert_close(est.influence((xt, yt)), want, rtol=1e-10, atol=1e-12)
    if not (net is BatchNormCNN and projection_dim):  # (that one is the vmap path)
        assert cut[:3] == [0, 3, 6]  # 7 rows in pieces of 3
    agg = est.influence((xt, yt), aggregate=True)
    torch.testing.assert_close(agg, want_agg, rtol=1e-10, atol=1e-12)
    top = est.influence((xt, yt), k=3)
    torch.testing.assert_close(top.influence_scores, want_top.influence_scores)
    assert torch.equal(top.indices, want_top.indices)


def test_data_parallel_model_gives_the_wrapped_modules_scores(tmp_path):
    """A Captum user's ``nn.DataParallel`` model: the twins score its ``module`` (the
    same numbers as the bare model, ``layers`` named as in the wrapper), Captum's
    TracInCP on the wrapper agrees at ``rho=0``, and the wrapper is left as it was."""
    from captum.influence import TracInCP

    from captum_sam import SAMInfluenceFunction, SAMTracInCPFast

    x, y = cnn_data(8, 12)
    xt, yt = cnn_data(3, 13)
    bare = built(SmallCNN(), x.float())
    paths, _ = checkpoints(bare, tmp_path)
    data = TensorDataset(x, y)
    wrapped = nn.DataParallel(copy.deepcopy(bare))
    before = snapshot(wrapped)
    linear = [n for n, m in bare.named_modules() if isinstance(m, nn.Linear)][0]
    convs = [n for n, m in bare.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]

    def scores(model, prefix, rho):
        tracin = SAMTracInCP(model, data, paths, loss_fn=ce_loss(), batch_size=3, rho=rho)
        fast = SAMTracInCPFast(model, prefix + linear, data, paths, batch_size=3, rho=rho,
                               loss_fn=nn.CrossEntropyLoss(reduction="sum"))  # fmt: skip
        kfac = SAMInfluenceFunction(model, data, paths[-1], loss_fn=ce_loss(), batch_size=3,
                                    rho=rho, curvature="kfac",
                                    layers=[prefix + n for n in convs])  # fmt: skip
        return [tracin.influence((xt, yt)), tracin.self_influence(), fast.influence((xt, yt)),
                kfac.influence((xt, yt))]  # fmt: skip

    for got, want in zip(scores(wrapped, "module.", 0.1), scores(bare, "", 0.1)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert_unchanged(wrapped, before)
    plain = []  # Captum's format, saved from the wrapper: "module."-prefixed state dicts
    for c, path in enumerate(paths):
        state = torch.load(path)["model_state"]
        plain.append(str(tmp_path / f"dp{c}.pt"))
        torch.save({f"module.{k}": v for k, v in state.items()}, plain[-1])
    captum = TracInCP(copy.deepcopy(wrapped), data, plain, loss_fn=ce_loss(), batch_size=3,
                      sample_wise_grads_per_batch=False)  # fmt: skip
    ours = SAMTracInCP(wrapped, data, plain, loss_fn=ce_loss(), batch_size=3, rho=0.0)
    torch.testing.assert_close(ours.influence((xt, yt)), captum.influence((xt, yt)),
                               rtol=1e-9, atol=1e-9)  # fmt: skip
