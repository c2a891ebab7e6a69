import copy

import pytest
import torch

from captum_sam import SAM
from tests.helpers import ce_loss, make_data, mlp_model

BASES = [
    (torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=1e-2)),
    (torch.optim.SGD, dict(lr=0.1, momentum=0.9, nesterov=True)),
    (torch.optim.Adam, dict(lr=1e-2, weight_decay=1e-3)),
]


def batches():
    x, y = make_data(n=40).tensors
    return [(x[i : i + 8], y[i : i + 8]) for i in range(0, 40, 8)]


@pytest.mark.parametrize("base,kwargs", BASES)
def test_rho_zero_reproduces_base_optimizer_exactly(base, kwargs):
    a, b = mlp_model(), mlp_model()
    sam = SAM(a.parameters(), base, rho=0.0, **kwargs)
    ref = base(b.parameters(), **kwargs)
    for x, y in batches() * 2:
        ce_loss()(a(x), y).mean().backward()
        sam.first_step(zero_grad=True)
        ce_loss()(a(x), y).mean().backward()
        sam.second_step(zero_grad=True)
        ce_loss()(b(x), y).mean().backward()
        ref.step()
        ref.zero_grad()
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def test_sam_step_uses_gradient_at_perturbed_point():
    model = mlp_model()
    x, y = batches()[0]
    ref = copy.deepcopy(model)
    sam = SAM(model.parameters(), torch.optim.SGD, rho=0.5, lr=0.1)

    def closure():
        sam.zero_grad()
        loss = ce_loss()(model(x), y).mean()
        loss.backward()
        return loss

    sam.step(closure)
    # reference written by hand: w - lr * grad L(w + rho g/||g||)
    params = list(ref.parameters())
    g = torch.autograd.grad(ce_loss()(ref(x), y).mean(), params)
    norm = torch.sqrt(sum((gi**2).sum() for gi in g))
    with torch.no_grad():
        for p, gi in zip(params, g):
            p.add_(0.5 * gi / (norm + 1e-12))
    g2 = torch.autograd.grad(ce_loss()(ref(x), y).mean(), params)
    with torch.no_grad():
        for p, gi, g2i in zip(params, g, g2):
            p.sub_(0.5 * gi / (norm + 1e-12))
            p.sub_(0.1 * g2i)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


def test_scheduler_attaches_and_state_dict_round_trips():
    model = mlp_model()
    sam = SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(sam, step_size=1, gamma=0.5)
    for x, y in batches()[:2]:

        def closure():
            sam.zero_grad()
            loss = ce_loss()(model(x), y).mean()  # noqa: B023
            loss.backward()
            return loss

        sam.step(closure)
        sched.step()
    assert sam.base_optimizer.param_groups[0]["lr"] == pytest.approx(0.025)
    state = sam.state_dict()
    other = SAM(model.parameters(), torch.optim.SGD, rho=0.7, lr=1.0, momentum=0.9)
    other.load_state_dict(state)
    assert other.param_groups[0]["rho"] == 0.1
    assert other.param_groups is other.base_optimizer.param_groups
    p = next(model.parameters())
    assert torch.equal(
        other.base_optimizer.state[p]["momentum_buffer"],
        sam.base_optimizer.state[p]["momentum_buffer"],
    )
    with pytest.raises(ValueError, match="not saved from a SAM"):
        other.load_state_dict(torch.optim.SGD(model.parameters(), lr=0.1).state_dict())


def test_invalid_arguments():
    params = mlp_model().parameters
    with pytest.raises(ValueError, match="rho"):
        SAM(params(), torch.optim.SGD, rho=-0.1, lr=0.1)
    with pytest.raises(ValueError, match="rho"):
        SAM(params(), torch.optim.SGD, rho=float("nan"), lr=0.1)
    with pytest.raises(TypeError, match="base_optimizer"):
        SAM(params(), torch.optim.SGD(params(), lr=0.1), lr=0.1)
    with pytest.raises(TypeError, match="base_optimizer"):
        SAM(params(), "sgd", lr=0.1)
    with pytest.raises(TypeError, match="adaptive"):
        SAM([{"params": list(params()), "adaptive": "yes"}], torch.optim.SGD, lr=0.1)
    sam = SAM(params(), torch.optim.SGD, lr=0.1)
    extra = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="rho"):
        sam.add_param_group({"params": [extra], "rho": -5})
    assert len(sam.param_groups) == 1  # refused before it was added
    sam.add_param_group({"params": [extra], "rho": 0.2})
    assert sam.base_optimizer.param_groups[-1]["rho"] == 0.2
    with pytest.raises(ValueError, match="closure"):
        sam.step()
    with pytest.raises(RuntimeError, match="backward"):
        sam.first_step()


def assert_step_refused_at_w(x, y, rho, error, match, fail_at_call=None):
    """``SAM.step`` raises ``error`` and leaves every weight at ``w`` (no update)."""
    model = mlp_model()
    w0 = [p.detach().clone() for p in model.parameters()]
    opt = SAM(model.parameters(), torch.optim.SGD, rho=rho, lr=0.1)
    calls = []

    def closure():
        calls.append(1)
        opt.zero_grad()
        if len(calls) == fail_at_call:
            raise RuntimeError("the data loader failed at w + eps")
        loss = ce_loss()(model(x), y).mean()
        loss.backward()
        return loss

    with pytest.raises(error, match=match):
        opt.step(closure)
    for p, q in zip(model.parameters(), w0):
        assert torch.equal(p, q)


def test_a_failure_at_the_perturbed_weights_takes_no_step():
    x, y = batches()[0]
    assert_step_refused_at_w(x, y, 0.5, RuntimeError, "w \\+ eps", fail_at_call=2)


def test_non_finite_gradients_are_refused_before_the_weights_move():
    x, y = batches()[0]
    x = x.clone()
    x[0, 0] = float("nan")
    assert_step_refused_at_w(x, y, 0.05, ValueError, "NaN or inf")


def test_step_closure_follows_the_well_known_wrapper():
    """``loss.backward(); opt.step(closure)`` (the wrapper's README, a closure without
    zero_grad): the gradient at w is the caller's, the closure runs once (at w + eps),
    BatchNorm counts two forward passes per step, and the weights equal first_step /
    second_step by hand. A closure that zeroes and backprops also works alone."""
    from tests.helpers import bn_model

    x, y = batches()[0]
    model, ref = bn_model(), bn_model()
    model.train(), ref.train()
    sam = SAM(model.parameters(), torch.optim.SGD, rho=0.3, lr=0.1, momentum=0.9)
    by_hand = SAM(ref.parameters(), torch.optim.SGD, rho=0.3, lr=0.1, momentum=0.9)
    calls = []

    def closure():
        calls.append(1)
        loss = ce_loss()(model(x), y).mean()
        loss.backward()
        return loss

    for _ in range(2):
        ce_loss()(model(x), y).mean().backward()
        sam.step(closure)
        ce_loss()(ref(x), y).mean().backward()
        by_hand.first_step(zero_grad=True)
        ce_loss()(ref(x), y).mean().backward()
        by_hand.second_step(zero_grad=True)
    assert len(calls) == 2  # once per step
    assert int(model.bn.num_batches_tracked) == int(ref.bn.num_batches_tracked) == 4 + 1
    for p, q in zip(model.state_dict().values(), ref.state_dict().values()):
        assert torch.equal(p, q)
    assert all(p.grad is None for p in model.parameters())  # nothing left for the next step

    def zeroing_closure():
        sam.zero_grad()
        return closure()

    before = len(calls)
    sam.step(zeroing_closure)  # no gradient given: the closure computes the one at w
    assert len(calls) == before + 2
