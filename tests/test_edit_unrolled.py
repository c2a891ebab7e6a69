"""The linearised replay and SAMUnrolledGIF against hand-written replays and autograd loops.

References, independent of ``torch.func`` and of the library's functional SAM step: a
replay with ``captum_sam.SAM`` around ``torch.optim.SGD`` on a weighted batch loss, and a
differentiable plain-autograd loop over the recorded steps (``create_graph=True``) whose
derivative with respect to every example's weight is the exact influence.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from captum_sam import SAM, SAMTracInCP, SAMUnrolledGIF, load_trajectory, train_sam
from captum_sam.core.checkpoints import checkpoints_load_func
from tests.helpers import assert_unchanged, bn_model, ce_loss, make_data, mlp_model, snapshot

LR, RHO, WD, BS = 0.2, 0.1, 1e-2, 8
REMOVED = [1, 5, 9]


def make_run(momentum, directory):
    data = make_data(24, 4, 3)
    model = mlp_model(4, 5, 3)
    record = str(directory)
    train_sam(model, data, ce_loss(), epochs=2, lr=LR, rho=RHO, batch_size=BS, weight_decay=WD,
              record_dir=record, momentum=momentum, overwrite=True)  # fmt: skip
    traj = load_trajectory(record)
    est = SAMUnrolledGIF(model, data, traj, loss_fn=ce_loss(), test_chunk=24)
    return data, model, traj, est, momentum


@pytest.fixture(scope="module", params=[0.0, 0.5], ids=["sgd", "momentum"])
def run(request, tmp_path_factory):
    return make_run(request.param, tmp_path_factory.mktemp("edit"))


@pytest.fixture(scope="module")
def sgd_run(tmp_path_factory):
    return make_run(0.0, tmp_path_factory.mktemp("edit_sgd"))


def weighted_replay(model, data, traj, weights, removal):
    """Replay with ``captum_sam.SAM`` on ``sum a_i l_i / N`` (a new model)."""
    replica = copy.deepcopy(model)
    checkpoints_load_func(replica, traj.initial.path)
    hyper = traj.optimizer["hyperparameters"]
    opt = SAM(replica.parameters(), torch.optim.SGD, rho=RHO, lr=LR,
              momentum=hyper["momentum"], weight_decay=hyper["weight_decay"])  # fmt: skip
    x, y = data.tensors
    for step in traj.steps:
        idx = torch.tensor(step.indices)
        a = weights[idx]
        if removal == "renormalise" and not a.sum() > 0:
            continue
        norm = a.sum() if removal == "renormalise" else float(len(idx))

        def closure(idx=idx, a=a, norm=norm):
            opt.zero_grad()
            loss = (ce_loss()(replica(x[idx]), y[idx]) * a).sum() / norm
            loss.backward()
            return loss

        opt.step(closure)
    return replica


def flat(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def dict_flat(change, model):
    return torch.cat([change[n].flatten() for n, _ in model.named_parameters()])


def autograd_influence(model, data, traj, test, removal, momentum):
    """``-d loss(test_j; w_T) / d a_k`` by a differentiable autograd loop ``(n_test, n_train)``."""
    replica = copy.deepcopy(model)
    checkpoints_load_func(replica, traj.initial.path)
    names = [n for n, _ in replica.named_parameters()]
    w = [p.detach().clone().requires_grad_() for p in replica.parameters()]
    a = torch.ones(len(data), dtype=w[0].dtype, requires_grad=True)
    x, y = data.tensors

    def forward(params, inputs):
        return torch.func.functional_call(replica, dict(zip(names, params)), (inputs,))

    buf = None
    for step in traj.steps:
        idx = torch.tensor(step.indices)
        norm = a[idx].sum() if removal == "renormalise" else float(len(idx))

        def batch_loss(params, idx=idx, norm=norm):
            return (ce_loss()(forward(params, x[idx]), y[idx]) * a[idx]).sum() / norm

        g0 = torch.autograd.grad(batch_loss(w), w, create_graph=True)
        scale = RHO / (torch.sqrt(sum((g**2).sum() for g in g0)) + 1e-12)
        perturbed = [p + scale * e for p, e in zip(w, g0)]  # the gradient AT w + eps
        g = torch.autograd.grad(batch_loss(perturbed), perturbed, create_graph=True)
        d = [gi + WD * p for gi, p in zip(g, w)]
        if momentum:
            buf = d if buf is None else [momentum * b + di for b, di in zip(buf, d)]
            d = buf
        w = [p - step.lr * di for p, di in zip(w, d)]
    losses = ce_loss()(forward(w, test[0]), test[1])
    rows = [torch.autograd.grad(v, a, retain_graph=True)[0] for v in losses]
    return -torch.stack(rows).detach()


def test_recreated_states_match_the_recorded_run(run):
    data, model, traj, est, _ = run
    final = copy.deepcopy(model)
    checkpoints_load_func(final, traj.final.path)
    w_t = est.unrolled_replay().final()
    for n, p in final.named_parameters():
        torch.testing.assert_close(w_t[n], p.detach(), rtol=0, atol=1e-12)


@pytest.mark.parametrize("removal", ["renormalise", "zero_weight"])
def test_small_removal_matches_finite_difference_replay(run, removal):
    data, model, traj, est, _ = run
    delta = 1e-5
    weights = torch.ones(len(data), dtype=torch.float64)
    weights[REMOVED] = 1 - delta
    replay = weighted_replay(model, data, traj, weights, removal)
    true = flat(replay) - flat(model)
    change = est.unrolled_replay().change(REMOVED, removal, strength=delta)
    lin = dict_flat(change, model)
    assert float((lin - true).norm() / true.norm()) < 1e-3


@pytest.mark.parametrize("removal", ["renormalise", "zero_weight"])
def test_full_removal_close_to_real_replay(run, removal):
    data, model, traj, est, _ = run
    weights = torch.ones(len(data), dtype=torch.float64)
    weights[REMOVED] = 0.0
    true = flat(weighted_replay(model, data, traj, weights, removal)) - flat(model)
    lin = est.parameter_change(REMOVED, flat=True, removal=removal)
    first = SAMTracInCP.from_trajectory(model, data, traj, loss_fn=ce_loss()).parameter_change(
        REMOVED, flat=True
    )
    cos = torch.nn.functional.cosine_similarity
    assert float(cos(lin, true, dim=0)) >= 0.95
    assert 0.8 < float(lin.norm() / true.norm()) < 1.25
    assert float((lin - true).norm()) < float((first - true).norm())  # better than first order


@pytest.mark.parametrize("removal", ["renormalise", "zero_weight"])
def test_adjoint_scores_equal_autograd_derivatives(run, removal):
    data, model, traj, est, momentum = run
    test = make_data(5, 4, 3, seed=3).tensors
    est.removal = removal
    try:
        scores = est.influence(test)
        aggregated = est.influence(test, aggregate=True)
    finally:
        est.removal = "renormalise"
    ref = autograd_influence(model, data, traj, test, removal, momentum)
    assert scores.shape == (5, len(data))
    torch.testing.assert_close(scores, ref, rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(aggregated, ref.sum(0, keepdim=True), rtol=1e-8, atol=1e-12)


def test_adjoint_agrees_with_the_forward_tangent(sgd_run):
    data, model, traj, est, _ = sgd_run
    test = make_data(4, 4, 3, seed=4).tensors
    replay = est.unrolled_replay()
    delta = 1e-6
    tangent = dict_flat(replay.change(REMOVED, "zero_weight", strength=delta), model) / delta
    grads = replay.gradients(test, replay.test_loss, aggregate=True)
    forward = float(dict_flat({n: g[0] for n, g in grads.items()}, model) @ tangent)
    est.removal = "zero_weight"
    try:
        adjoint = float(est.influence(test, aggregate=True)[0, REMOVED].sum())
    finally:
        est.removal = "renormalise"
    assert forward == pytest.approx(adjoint, rel=1e-4)  # removal raises the loss by sum(scores)


def test_self_influence_is_the_diagonal(sgd_run):
    data, _, _, est, _ = sgd_run
    full = est.influence(data.tensors)
    diagonal = est.self_influence()
    top = est.influence(data.tensors, k=3)
    torch.testing.assert_close(diagonal, torch.diagonal(full), rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(top.influence_scores, full.topk(3, dim=1).values)


def test_edits_leave_the_user_model_and_match_the_tracincp_method(sgd_run):
    data, model, traj, est, _ = sgd_run
    before = snapshot(model)
    edited = est.edited_model(REMOVED)
    tr = SAMTracInCP.from_trajectory(model, data, traj, loss_fn=ce_loss())
    other = tr.edited_model(REMOVED, method="linearised")
    assert_unchanged(model, before)
    assert edited is not model
    torch.testing.assert_close(flat(edited), flat(other), rtol=0, atol=1e-12)
    change = est.parameter_change(REMOVED, flat=True)
    torch.testing.assert_close(flat(edited) - flat(model), change, rtol=0, atol=1e-12)
    # first order stays the SAMTracInCP default
    torch.testing.assert_close(
        tr.parameter_change(REMOVED, flat=True),
        tr.parameter_change(REMOVED, flat=True, method="first_order"),
    )


def test_bad_inputs_raise(sgd_run, tmp_path):
    data, model, traj, est, _ = sgd_run
    with pytest.raises(ValueError, match="method"):
        est.parameter_change(REMOVED, method="second_order")
    with pytest.raises(ValueError, match="removal"):
        est.parameter_change(REMOVED, removal="drop")
    with pytest.raises(ValueError, match="removal"):
        SAMUnrolledGIF(model, data, traj, loss_fn=ce_loss(), removal="drop")
    with pytest.raises(ValueError, match="test_chunk"):
        SAMUnrolledGIF(model, data, traj, loss_fn=ce_loss(), test_chunk=0)
    with pytest.raises(ValueError, match="indices"):
        est.edited_model([len(data)])
    with pytest.raises(ValueError, match="inputs"):
        est.self_influence(data.tensors)
    with pytest.raises(NotImplementedError):
        est.compute_intermediate_quantities()
    ckpt = SAMTracInCP(model, data, [traj.final.path], loss_fn=ce_loss())
    with pytest.raises(ValueError, match="trajectory"):
        ckpt.edited_model(REMOVED, method="linearised")
    bn = bn_model(4, 3)
    record = str(tmp_path / "bn")
    train_sam(bn, data, ce_loss(), epochs=1, lr=LR, rho=RHO, batch_size=BS, record_dir=record)
    with pytest.raises(ValueError, match="model"):
        SAMUnrolledGIF(bn, data, record, loss_fn=ce_loss())
    assert isinstance(bn, nn.Module)
