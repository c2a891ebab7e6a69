"""``batchnorm=`` of SAM-GIF against a hand-written reference with explicit batch statistics.

The reference walks the model's layers itself and normalises with ``F.batch_norm``
given explicit statistics: the running buffers (eval), or the recorded batch's mean
and biased variance at the weights of the gradient, held constant (batch). It
recomputes every SAM perturbation from the recorded batch's train-mode gradient.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as nnf
from torch import nn
from torch.func import functional_call
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.data import TensorDataset

from captum_sam import (
    ExactNearestNeighbors,
    SAMTracInCP,
    SAMTracInCPFast,
    SAMTracInCPFastRandProj,
    train_sam,
)
from captum_sam.core.checkpoints import read_checkpoint
from captum_sam.trajectory import load_trajectory
from tests.helpers import DTYPE, bn_model, ce_loss, make_data, save_checkpoint


def conv_bn_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential()
    model.add_module("conv", nn.Conv2d(1, 2, 3))
    model.add_module("bn", nn.BatchNorm2d(2))
    model.add_module("act", nn.Tanh())
    model.add_module("flat", nn.Flatten())
    model.add_module("fc", nn.Linear(2 * 3 * 3, 3))
    return model.to(DTYPE)


def conv_data(n: int = 24, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 5, 5, generator=g, dtype=DTYPE) * 1.5 + 0.5
    y = (x[:, 0, :2].sum((1, 2)) > x[:, 0, 3:].sum((1, 2))).long() + (x[:, 0, 2, 2] > 1).long()
    return TensorDataset(x, y)


MODELS = {
    "linear": (bn_model, lambda: make_data(n=16, seed=3)),
    "conv": (conv_bn_model, lambda: conv_data(n=16)),
}


def forward(model: nn.Module, state: dict, x: torch.Tensor, bn: object) -> torch.Tensor:
    """The model's layers by hand; ``bn``: "train", "eval", or a dict of explicit statistics."""
    h = x
    for name, layer in model.named_children():
        local = {k[len(name) + 1 :]: v for k, v in state.items() if k.startswith(name + ".")}
        if isinstance(layer, _BatchNorm):
            w, b = local["weight"], local["bias"]
            if bn == "train":
                h = nnf.batch_norm(h, None, None, w, b, True, 0.0, layer.eps)
            elif bn == "eval":
                m, v = local["running_mean"], local["running_var"]
                h = nnf.batch_norm(h, m, v, w, b, False, 0.0, layer.eps)
            else:
                h = nnf.batch_norm(h, bn[name][0], bn[name][1], w, b, False, 0.0, layer.eps)
        else:
            h = functional_call(layer, local, (h,))
    return h


def batch_stats(model: nn.Module, state: dict, x: torch.Tensor) -> dict:
    """Mean and biased variance of every BatchNorm input on the batch ``x`` (train mode)."""
    out, h = {}, x
    with torch.no_grad():
        for name, layer in model.named_children():
            local = {k[len(name) + 1 :]: v for k, v in state.items() if k.startswith(name + ".")}
            if isinstance(layer, _BatchNorm):
                dims = [0] + list(range(2, h.dim()))
                out[name] = (h.mean(dims), h.var(dims, unbiased=False))
                h = nnf.batch_norm(h, None, None, local["weight"], local["bias"], True, 0.0, 1e-5)
            else:
                h = functional_call(layer, local, (h,))
    return out


def grad_of(model, state, names, x, y, bn) -> torch.Tensor:
    params = {n: state[n].clone().requires_grad_(True) for n in names}
    loss = nnf.cross_entropy(forward(model, {**state, **params}, x, bn), y)
    return torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(params.values()))])


def dataset_grad(model, state, names, x, y, bn, size: int = 6) -> torch.Tensor:
    """Mean gradient over the loader batches of ``size`` (each with its own statistics)."""
    total = 0
    for i in range(0, len(y), size):
        total = total + grad_of(model, state, names, x[i : i + size], y[i : i + size], bn) * len(
            y[i : i + size]
        )
    return total / len(y)


def reference(
    model, traj, data, test, mode: str, perturbation: str = "batch", attributed=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(influence (n_test, n_train), self influence (n_train,))`` by loops over examples.

    The perturbation runs over every parameter; gradients over ``attributed`` (all).
    """
    names = [n for n, p in model.named_parameters()]
    chosen = names if attributed is None else attributed
    x, y = data.tensors
    scores = torch.zeros(len(test[1]), len(y), dtype=DTYPE)
    selfs = torch.zeros(len(y), dtype=DTYPE)
    for ckpt, steps in traj.segments():
        w, _ = read_checkpoint(ckpt.path)
        tests = torch.stack(
            [grad_of(model, w, chosen, tx[None], ty[None], "eval") for tx, ty in zip(*test)]
        )
        for t in steps:
            s = traj.steps[t]
            idx = torch.tensor(s.indices)
            xb, yb = x[idx], y[idx]
            bn = "train" if mode == "batch" else "eval"
            if perturbation == "dataset":
                g = dataset_grad(model, w, names, x, y, bn)
            else:
                g = grad_of(model, w, names, xb, yb, bn)
            g = g / (g.norm() + 1e-12) * s.rho
            moved, offset = dict(w), 0
            for n in names:
                size = w[n].numel()
                moved[n] = w[n] + g[offset : offset + size].view_as(w[n])
                offset += size
            bn = batch_stats(model, moved, xb) if mode == "batch" else "eval"
            coef = s.lr / len(s.indices)
            for k, i in enumerate(s.indices):
                train = grad_of(model, moved, chosen, xb[k : k + 1], yb[k : k + 1], bn)
                own = grad_of(model, w, chosen, xb[k : k + 1], yb[k : k + 1], "eval")
                selfs[i] += coef * own @ train
                scores[:, i] += coef * tests @ train
    return scores, selfs


@pytest.fixture(scope="module")
def conv(tmp_path_factory):
    return _record("conv", tmp_path_factory)


@pytest.fixture(scope="module")
def lin(tmp_path_factory):
    return _record("linear", tmp_path_factory)


def _record(kind, tmp_path_factory):
    make_model, make = MODELS[kind]
    data = make()
    model = make_model()
    out = tmp_path_factory.mktemp("bn") / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train_sam(model, data, ce_loss(), epochs=2, lr=0.2, rho=0.1, batch_size=8,
                  record_dir=out, save_every=2)  # fmt: skip
    test = (data.tensors[0][:3] + 0.1, data.tensors[1][:3])
    return {"model": model, "data": data, "traj": load_trajectory(out), "test": test}


def estimator(run, **kw):
    kw.setdefault("batchnorm_tolerance", None)
    kw.setdefault("batch_size", 5)
    return SAMTracInCP.from_trajectory(
        run["model"], run["data"], run["traj"], loss_fn=ce_loss(), **kw
    )


@pytest.mark.parametrize("mode", ["batch", "eval"])
def test_influence_and_self_influence_match_the_reference(lin, mode):
    est = estimator(lin, batchnorm=mode)
    ref_scores, ref_self = reference(lin["model"], lin["traj"], lin["data"], lin["test"], mode)
    torch.testing.assert_close(est.influence(lin["test"]), ref_scores, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(est.self_influence(), ref_self, rtol=1e-9, atol=1e-12)


def test_conv_batchnorm2d_matches_the_reference(conv):
    """Conv2d + BatchNorm2d: statistics over batch and space, per channel."""
    est = estimator(conv, batchnorm="batch")
    ref_scores, ref_self = reference(
        conv["model"], conv["traj"], conv["data"], conv["test"], "batch"
    )
    torch.testing.assert_close(est.influence(conv["test"]), ref_scores, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(est.self_influence(), ref_self, rtol=1e-9, atol=1e-12)


def test_dataset_perturbation_uses_each_batchs_train_mode_gradient(lin):
    est = estimator(lin, batchnorm="batch", perturbation="dataset", batch_size=6)
    ref_scores, ref_self = reference(
        lin["model"], lin["traj"], lin["data"], lin["test"], "batch", "dataset"
    )
    torch.testing.assert_close(est.influence(lin["test"]), ref_scores, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(est.self_influence(), ref_self, rtol=1e-9, atol=1e-12)


def test_layers_attribute_a_subset_with_batch_statistics(lin):
    """``layers=["fc2"]`` (a factored site otherwise): the vmap path, batch statistics."""
    est = estimator(lin, batchnorm="batch", layers=["fc2"])
    assert est.engines.factored.sites is None
    ref_scores, ref_self = reference(
        lin["model"], lin["traj"], lin["data"], lin["test"], "batch",
        attributed=["fc2.weight", "fc2.bias"],
    )  # fmt: skip
    torch.testing.assert_close(est.influence(lin["test"]), ref_scores, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(est.self_influence(), ref_self, rtol=1e-9, atol=1e-12)


def test_eval_is_the_default_and_batch_differs(lin):
    default = estimator(lin).influence(lin["test"])
    torch.testing.assert_close(estimator(lin, batchnorm="eval").influence(lin["test"]), default)
    batch = estimator(lin, batchnorm="batch").influence(lin["test"])
    assert (batch - default).abs().max() > 1e-3 * default.abs().max()


def test_batch_gradients_sum_to_the_constant_statistics_batch_gradient(lin):
    """Per-example batch-mode gradients of a step sum to the batch loss's, statistics fixed."""
    est = estimator(lin, batchnorm="batch", perturbation="batch")
    e, model, traj = est.engines, lin["model"], lin["traj"]
    term = e.terms[0]
    batch = e.points.fetch(term.indices)
    g = e.vmap.grads([term], batch, e.quantities.train_loss, False, True)[1]
    summed = torch.cat([g[n][0] for n, _ in lin["model"].named_parameters()], dim=1)
    w, _ = read_checkpoint(term.checkpoint)
    names = [n for n, _ in model.named_parameters()]
    x, y = batch
    g = grad_of(model, w, names, x, y, "train")
    moved, offset = dict(w), 0
    for n in names:
        moved[n] = w[n] + (g / (g.norm() + 1e-12) * traj.steps[0].rho)[
            offset : offset + w[n].numel()
        ].view_as(w[n])
        offset += w[n].numel()
    stats = batch_stats(model, moved, x)
    params = {n: moved[n].clone().requires_grad_(True) for n in names}
    total = nnf.cross_entropy(forward(model, {**moved, **params}, x, stats), y, reduction="sum")
    want = torch.cat([v.flatten() for v in torch.autograd.grad(total, list(params.values()))])
    torch.testing.assert_close(summed.sum(0), want, rtol=1e-9, atol=1e-12)


def test_editing_and_test_at_perturbed_use_batch_statistics_on_the_training_side(lin):
    est = estimator(lin, batchnorm="batch", test_at_perturbed=True)
    scores = est.influence((lin["data"].tensors[0], lin["data"].tensors[1]))
    # self influence is the diagonal of train-vs-train influence in every mode
    torch.testing.assert_close(est.self_influence(), scores.diagonal(), rtol=1e-9, atol=1e-12)
    change = est.parameter_change([0, 1, 2], flat=True)
    rows = est.compute_intermediate_quantities()
    width = rows.shape[1] // len(est.engines.quantities.checkpoints)
    torch.testing.assert_close(
        change, rows[:3].view(3, -1, width).sum((0, 1)), rtol=1e-9, atol=1e-12
    )


def _model_state(model):
    flags = [m.training for m in model.modules()]
    return flags, {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("train_mode", [True, False])
def test_the_users_model_keeps_its_mode_and_buffers(lin, train_mode):
    model = lin["model"]
    model.train(train_mode)
    flags, state = _model_state(model)
    est = estimator(lin, batchnorm="batch", batchnorm_tolerance=1e-9)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        est.influence(lin["test"])
        est.self_influence()
    after_flags, after = _model_state(model)
    assert after_flags == flags
    for k in state:
        torch.testing.assert_close(after[k], state[k], rtol=0, atol=0)
    # the private copy too: eval mode, tracking on, buffers as loaded
    scratch = est.engines.loader.scratch
    assert not any(m.training for m in scratch.modules())
    assert all(m.track_running_stats for m in scratch.modules() if isinstance(m, _BatchNorm))


def test_warning_fires_above_the_tolerance_and_not_below(lin):
    with pytest.warns(UserWarning, match=r"BatchNorm: at checkpoint .*relative difference"):
        estimator(lin, batchnorm_tolerance=1e-9)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        estimator(lin, batchnorm_tolerance=1e6)
        estimator(lin, batchnorm_tolerance=None)


def test_warning_reports_the_measured_gap(tmp_path):
    """Running statistics far from the data's: the gap is computed as eval vs train loss."""
    model, data = bn_model(), make_data(n=16, seed=1)
    with torch.no_grad():
        model.bn.running_mean.fill_(5.0)
        model.bn.running_var.fill_(0.01)
    path = save_checkpoint(model, tmp_path / "c.pt")
    x, y = data.tensors
    state = model.state_dict()
    eval_loss = nnf.cross_entropy(forward(model, state, x[:8], "eval"), y[:8]).item()
    eval_loss += nnf.cross_entropy(forward(model, state, x[8:], "eval"), y[8:]).item()
    train_loss = nnf.cross_entropy(forward(model, state, x[:8], "train"), y[:8]).item()
    train_loss += nnf.cross_entropy(forward(model, state, x[8:], "train"), y[8:]).item()
    gap = abs(eval_loss - train_loss) / train_loss
    with pytest.warns(UserWarning) as record:
        SAMTracInCP(model, data, [path], loss_fn=ce_loss(), batch_size=8)
    messages = [str(r.message) for r in record if "BatchNorm" in str(r.message)]
    assert len(messages) == 1 and f"relative difference {gap:.3g}" in messages[0]


def test_no_warning_without_batchnorm(tmp_path):
    from tests.helpers import mlp_model

    model, data = mlp_model(), make_data(n=16)
    path = save_checkpoint(model, tmp_path / "c.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SAMTracInCP(model, data, [path], loss_fn=ce_loss(), batchnorm_tolerance=1e-12)


def test_errors_name_the_argument(lin, tmp_path):
    path = save_checkpoint(lin["model"], tmp_path / "c.pt")
    with pytest.raises(ValueError, match="batchnorm='batch'.*trajectory"):
        SAMTracInCP(lin["model"], lin["data"], [path], loss_fn=ce_loss(), batchnorm="batch")
    with pytest.raises(ValueError, match="`batchnorm` must be one of"):
        estimator(lin, batchnorm="train")
    est = estimator(lin, batchnorm="batch", perturbation="dataset", batch_size=5)  # 5+5+5+1
    with pytest.raises(ValueError, match="batch of one example"):
        est.self_influence()
    with pytest.raises(ValueError, match="batchnorm='batch'.*perturbation='example'"):
        estimator(lin, batchnorm="batch", perturbation="example")
    with pytest.raises(ValueError, match="`batchnorm_tolerance`"):
        estimator(lin, batchnorm_tolerance=-1.0)
    with pytest.raises(TypeError, match="`batchnorm_tolerance`"):
        estimator(lin, batchnorm_tolerance="0.1")
    untracked = copy.deepcopy(lin["model"])
    untracked.bn.track_running_stats = False
    untracked.bn.running_mean = untracked.bn.running_var = None
    with pytest.raises(ValueError, match="track_running_stats=False"):
        SAMTracInCP.from_trajectory(
            untracked, lin["data"], lin["traj"], loss_fn=ce_loss(), batchnorm="batch",
            batchnorm_tolerance=None,
            checkpoints_load_func=lambda m, p: 0.2,
        )  # fmt: skip


def test_a_frozen_batchnorm_keeps_its_running_statistics(lin):
    """Eval mode inside a parent in train mode: trained on running statistics, kept so."""
    model = copy.deepcopy(lin["model"])
    model.train()
    model.bn.eval()
    run = {**lin, "model": model}
    frozen = estimator(run, batchnorm="batch").influence(lin["test"])
    torch.testing.assert_close(frozen, estimator(run, batchnorm="eval").influence(lin["test"]))
    model.eval()  # a model in eval mode as a whole has nothing frozen
    assert (estimator(run, batchnorm="batch").influence(lin["test"]) - frozen).abs().max() > 1e-6


@pytest.mark.parametrize("cls", ["SAMInfluenceFunction", "SAMArnoldiInfluenceFunction"])
def test_the_hessian_family_warns_and_refuses_batch(tmp_path, cls):
    import captum_sam

    model, data = bn_model(), make_data(n=16, seed=1)
    with torch.no_grad():
        model.bn.running_mean.fill_(5.0)
    path = save_checkpoint(model, tmp_path / "c.pt")
    twin = getattr(captum_sam, cls)
    flags, state = _model_state(model)
    kw = dict(loss_fn=ce_loss(), batch_size=8, projection_dim=4)
    with pytest.warns(
        UserWarning, match=r"BatchNorm: at checkpoint 'c.pt'.*relative difference"
    ) as got:
        twin(model, data, path, **kw)
    assert {w.filename for w in got} == {__file__}  # the caller's line, not the library's
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        twin(model, data, path, batchnorm_tolerance=None, **kw)
    with pytest.raises(ValueError, match="batchnorm='batch'.*from_trajectory"):
        twin(model, data, path, batchnorm="batch", **kw)
    with pytest.raises(ValueError, match="`batchnorm` must be one of"):
        twin(model, data, path, batchnorm="running", **kw)
    assert _model_state(model)[0] == flags
    for k, v in _model_state(model)[1].items():
        torch.testing.assert_close(v, state[k], rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["fast", "rand_proj"])
def test_final_layer_estimators_check_the_batchnorm_gap(lin, tmp_path, kind):
    """``SAMTracInCPFast`` / ``...RandProj`` warn like ``SAMTracInCP`` and accept ``None``."""
    cls = SAMTracInCPFast if kind == "fast" else SAMTracInCPFastRandProj
    extra = {} if kind == "fast" else {"nearest_neighbors": ExactNearestNeighbors()}
    path = save_checkpoint(lin["model"], tmp_path / "c.pt")
    model, data = lin["model"], lin["data"]

    def build(tolerance):
        return cls(model, "fc2", data, [path], loss_fn=nn.CrossEntropyLoss(reduction="sum"),
                   batch_size=5, batchnorm_tolerance=tolerance, **extra)  # fmt: skip

    with pytest.warns(UserWarning, match=r"BatchNorm: at checkpoint .*relative difference"):
        build(1e-9)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quiet = build(None)
    with pytest.raises(ValueError, match="`batchnorm_tolerance`"):
        build(-1.0)
    test = (lin["test"][0], lin["test"][1])
    torch.testing.assert_close(quiet.influence(test), build(1e6).influence(test))
