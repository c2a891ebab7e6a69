import copy

import pytest
import torch
from captum.influence import TracInCP
from torch.utils.data import BatchSampler, DataLoader, SequentialSampler, TensorDataset

from captum_sam import checkpoints_load_func, load_trajectory, replay_trajectory, train_sam
from captum_sam.gif.tracincp import SAMTracInCP
from tests.helpers import DTYPE, assert_unchanged, ce_loss, make_data, mlp_model, snapshot

N_TRAIN, N_TEST = 12, 4


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    data = make_data(n=N_TRAIN + N_TEST, seed=1)
    x, y = data.tensors
    train = TensorDataset(x[:N_TRAIN], y[:N_TRAIN])
    test = (x[N_TRAIN:], y[N_TRAIN:])
    model = mlp_model()
    out = tmp_path_factory.mktemp("gif") / "run"
    train_sam(
        model,
        train,
        ce_loss(),
        epochs=3,
        lr=0.3,
        rho=0.1,
        batch_size=5,
        record_dir=out,
        seed=0,
        lr_schedule=lambda e: 1.0 / (e + 1),
    )
    traj = load_trajectory(out)
    return dict(
        model=model, train=train, test=test, traj=traj, ckpts=[c.path for c in traj.checkpoints]
    )


def make(run, **kw):
    args = dict(checkpoints=run["ckpts"], loss_fn=ce_loss(), batch_size=5)
    args.update(kw)
    return SAMTracInCP(run["model"], run["train"], **args)


# ----------------------------------------------------------------- brute force


def grad_at(model, params, x, y, names):
    """Gradient of one example's loss at weights ``params`` (autograd, no vmap)."""
    m = copy.deepcopy(model)
    with torch.no_grad():
        for n, p in m.named_parameters():
            p.copy_(params[n])
    chosen = [p for n, p in m.named_parameters() if n in names]
    loss = ce_loss()(m(x.unsqueeze(0)), y.unsqueeze(0)).sum()
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, chosen)])


def sam_eps(params, g_flat, names, rho, adaptive):
    """The SAM / ASAM formula written out on flat vectors."""
    w = torch.cat([params[n].reshape(-1) for n in names])
    if adaptive:
        e = rho * w**2 * g_flat / (torch.linalg.norm(w.abs() * g_flat) + 1e-12)
    else:
        e = rho * g_flat / (torch.linalg.norm(g_flat) + 1e-12)
    out, i = dict(params), 0
    for n in names:
        k = params[n].numel()
        out[n] = params[n] + e[i : i + k].reshape(params[n].shape)
        i += k
    return out


def brute_force(
    run,
    rho,
    adaptive,
    perturbation,
    layers=None,
    test_at_perturbed=False,
    scope="trainable",
    names=None,
):
    """Scores by a double loop; the perturbation over every parameter (``scope="trainable"``,
    the training's) or over the attributed ones only (``"attributed"``); ``names``: the
    attributed parameters (default: those of ``layers``)."""
    model, (xt, yt) = run["model"], run["test"]
    xs, ys = run["train"].tensors
    scratch = copy.deepcopy(model)
    names = names or [
        n
        for n, _ in model.named_parameters()
        if layers is None or any(n.startswith(layer + ".") for layer in layers)
    ]
    every = names if scope == "attributed" else [n for n, _ in model.named_parameters()]
    scores = torch.zeros(len(yt), len(ys), dtype=DTYPE)
    for path in run["ckpts"]:
        lr = checkpoints_load_func(scratch, path)
        w = {n: p.detach().clone() for n, p in scratch.named_parameters()}
        mean_g = sum(grad_at(model, w, xs[k], ys[k], every) for k in range(len(ys))) / len(ys)
        for i in range(len(yt)):
            if test_at_perturbed:
                g_own = grad_at(model, w, xt[i], yt[i], every)
                src = g_own if perturbation == "example" else mean_g
                gt = grad_at(model, sam_eps(w, src, every, rho, adaptive), xt[i], yt[i], names)
            else:
                gt = grad_at(model, w, xt[i], yt[i], names)
            for k in range(len(ys)):
                src = (
                    grad_at(model, w, xs[k], ys[k], every) if perturbation == "example" else mean_g
                )
                gk = grad_at(model, sam_eps(w, src, every, rho, adaptive), xs[k], ys[k], names)
                scores[i, k] += lr * gt @ gk
    return scores


@pytest.mark.parametrize("layers", [None, ["fc2"]])
@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("perturbation", ["dataset", "example"])
def test_matches_brute_force_double_loop(run, perturbation, adaptive, layers):
    est = make(run, rho=0.2, adaptive=adaptive, perturbation=perturbation, layers=layers)
    got = est.influence(run["test"])
    ref = brute_force(run, 0.2, adaptive, perturbation, layers)
    assert got.shape == (N_TEST, N_TRAIN)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    if layers is not None:  # the approximation: perturb the attributed layer alone
        sub = make(
            run,
            rho=0.2,
            adaptive=adaptive,
            perturbation=perturbation,
            layers=layers,
            perturbation_scope="attributed",
        ).influence(run["test"])
        ref_sub = brute_force(run, 0.2, adaptive, perturbation, layers, scope="attributed")
        torch.testing.assert_close(sub, ref_sub, rtol=1e-10, atol=1e-12)
        assert (sub - got).abs().max() > 1e-4  # the scope changes the point
    # the perturbation matters: rho = 0 gives different scores
    assert (got - make(run, rho=0.0, layers=layers).influence(run["test"])).abs().max() > 1e-4


class _Scaled(torch.nn.Module):
    """A parameter-free step after the final layer (its output is not the model's)."""

    def forward(self, x):
        return 3.0 * x


@pytest.mark.parametrize("call", ["self", "influence"])
@pytest.mark.parametrize("after_head", [False, True])
def test_attributed_head_skips_the_perturbed_pass(run, monkeypatch, after_head, call):
    """Only the final layer perturbed: its factors at w + eps come from its input at w.

    Against a double loop. Self influence keeps the factors at w of its first pass;
    influence those of the perturbation's pass. The shortcut is checked against a real
    pass once and refused when the layer's output is not the model's (``after_head``:
    scaled by 3), which then takes a pass at w + eps per batch.
    """
    from captum.influence import TracInCPFast

    from captum_sam import SAMTracInCPFast
    from captum_sam.gif import head
    from captum_sam.gif.factored_grads import FactoredGradients

    model = copy.deepcopy(run["model"])
    if after_head:
        model.add_module("scale", _Scaled())
    # self influence: the train-vs-train double loop's diagonal
    case = dict(run, model=model, test=run["train"].tensors if call == "self" else run["test"])
    made, checks, passes = [], [], []
    real_factors, real_matches = head.head_factors, head.head_matches
    factors = FactoredGradients.factors
    monkeypatch.setattr(head, "head_factors", lambda *a: made.append(real_factors(*a)) or made[-1])
    monkeypatch.setattr(
        head, "head_matches", lambda *a: checks.append(real_matches(*a)) or checks[-1]
    )
    monkeypatch.setattr(FactoredGradients, "factors", lambda *a: passes.append(1) or factors(*a))
    batches, ckpts = -(-N_TRAIN // 5), len(run["ckpts"])
    # influence: one test batch per checkpoint; self influence: none
    test_side = 0 if call == "self" else ckpts
    loss = torch.nn.CrossEntropyLoss(reduction="sum")
    for attributed in (["fc2.weight", "fc2.bias"], ["fc2.weight"]):
        made.clear(), checks.clear(), passes.clear()
        if attributed == ["fc2.weight"]:  # Captum's TracInCPFast set-up, reducing loss
            est = SAMTracInCPFast(
                model, "fc2", run["train"], run["ckpts"], loss_fn=loss, batch_size=5, rho=0.2,
                perturbation_scope="attributed",
            )  # fmt: skip
        else:
            est = make(case, rho=0.2, layers=["fc2"], perturbation_scope="attributed")
        got = est.self_influence() if call == "self" else est.influence(run["test"])
        ref = brute_force(case, 0.2, False, "dataset", scope="attributed", names=attributed)
        torch.testing.assert_close(got, ref.diagonal() if call == "self" else ref,
                                   rtol=1e-10, atol=1e-12)  # fmt: skip
        assert checks == [not after_head]  # one check, on the first perturbed batch
        assert made and all(f is not None for f in made)  # refused by the check alone
        # at w (kept), and the test side; at w + eps only without the shortcut
        assert len(passes) == (2 - (not after_head)) * batches * ckpts + test_side
        if not after_head:  # every batch and checkpoint, and the check's own call
            assert len(made) == batches * ckpts + 1
        if call == "influence":  # a second call: the perturbation is known, nothing kept
            passes.clear()
            torch.testing.assert_close(est.influence(run["test"]), got, rtol=1e-12, atol=0)
            assert len(passes) == batches * ckpts + test_side  # the pass at w + eps
    if not after_head:  # rho = 0 is still Captum's TracInCPFast
        ours = SAMTracInCPFast(model, "fc2", run["train"], run["ckpts"], loss_fn=loss,
                               batch_size=5, rho=0.0, perturbation_scope="attributed")  # fmt: skip
        theirs = TracInCPFast(model, model.fc2, run["train"], run["ckpts"],
                              checkpoints_load_func, loss_fn=loss, batch_size=5)  # fmt: skip
        if call == "self":
            got, ref = ours.self_influence(), theirs.self_influence()
        else:
            got, ref = ours.influence(run["test"]), theirs.influence(run["test"])
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)


def test_merged_self_influence_with_perturbed_unattributed_layers(run, monkeypatch):
    """The final layer attributed, the training's perturbation over every parameter
    (SAMTracInCPFast's default): self influence takes the perturbation's gradient in
    the other layers from the backward pass that gives the final layer's factors at w,
    so there is no separate pass for the perturbation: two passes per checkpoint.
    Against a double loop, for SAMTracInCPFast and for SAMTracInCP(layers=...)."""
    from captum_sam import SAMTracInCPFast
    from captum_sam.core.layers import sites
    from captum_sam.gif import points
    from captum_sam.gif.factored_grads import FactoredGradients

    case = dict(run, test=run["train"].tensors)  # self influence: the double loop's diagonal
    eps_passes, merged, layer_passes = [], [], []
    real_sum, real_merged = points.F.stacked_grad_sum, FactoredGradients.factors_and_extra
    real_layer = sites.layer_factors_and_grads
    monkeypatch.setattr(points.F, "stacked_grad_sum",
                        lambda *a: eps_passes.append(1) or real_sum(*a))  # fmt: skip

    def factors_and_extra(self, *a):
        out = real_merged(self, *a)
        merged.append(sorted(out[1]))
        return out

    monkeypatch.setattr(FactoredGradients, "factors_and_extra", factors_and_extra)
    monkeypatch.setattr(sites, "layer_factors_and_grads",
                        lambda *a: layer_passes.append(1) or real_layer(*a))  # fmt: skip
    batches, ckpts = -(-N_TRAIN // 5), len(run["ckpts"])
    loss = torch.nn.CrossEntropyLoss(reduction="sum")
    others = sorted(n for n, _ in run["model"].named_parameters() if not n.startswith("fc2."))
    for attributed in (["fc2.weight", "fc2.bias"], ["fc2.weight"]):
        eps_passes.clear(), merged.clear(), layer_passes.clear()
        if attributed == ["fc2.weight"]:
            est = SAMTracInCPFast(run["model"], "fc2", run["train"], run["ckpts"], loss_fn=loss,
                                  batch_size=5, rho=0.2)  # fmt: skip
            extra = [*others, "fc2.bias"]
        else:
            est = make(run, rho=0.2, layers=["fc2"])
            extra = others
        got = est.self_influence()
        ref = brute_force(case, 0.2, False, "dataset", names=attributed).diagonal()
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
        assert not eps_passes  # the perturbation came from the first pass
        assert merged == [sorted(extra)] * (batches * ckpts)
        # the first pass and the pass at w + eps, and the factored path's check
        assert len(layer_passes) == 2 * batches * ckpts + 1
    # nothing kept: the second pass recomputes the factors at w and takes them at
    # w + eps with the other layers moved too
    from captum_sam.gif import checkpoint_form

    monkeypatch.setattr(checkpoint_form, "MERGE_BUDGET_BYTES", 0)
    layer_passes.clear()
    got = make(run, rho=0.2, layers=["fc2"]).self_influence()
    ref = brute_force(case, 0.2, False, "dataset", names=["fc2.weight", "fc2.bias"])
    torch.testing.assert_close(got, ref.diagonal(), rtol=1e-10, atol=1e-12)
    assert len(layer_passes) == 3 * batches * ckpts + 1


@pytest.mark.parametrize("layers", [None, ["fc2"]])
def test_influence_after_self_influence_reuses_the_perturbations(run, monkeypatch, layers):
    """Self influence computes the dataset perturbation one checkpoint at a time;
    influence, which takes every checkpoint together, reuses them (no pass over the
    training data for the perturbation) and gives what a fresh estimator gives."""
    from captum_sam.gif import points

    passes = []
    real_sum = points.F.stacked_grad_sum
    monkeypatch.setattr(points.F, "stacked_grad_sum",
                        lambda *a: passes.append(1) or real_sum(*a))  # fmt: skip
    est = make(run, rho=0.2, layers=layers)
    est.self_influence()
    assert not passes  # merged: the perturbation from the first pass, per checkpoint
    got = est.influence(run["test"])
    assert not passes
    # held once: each checkpoint's perturbation is now a view of the stacked one
    cache = est.engines.points._dataset_eps
    stacked = next(v for k, v in cache.items() if len(k[0]) == len(run["ckpts"]))
    singles = [v for k, v in cache.items() if len(k[0]) == 1]
    assert len(singles) == len(run["ckpts"])
    assert all(
        e[n].untyped_storage().data_ptr() == stacked[n].untyped_storage().data_ptr()
        for e in singles
        for n in e
    )
    fresh = make(run, rho=0.2, layers=layers).influence(run["test"])
    assert len(passes) == 1  # the fresh estimator's one pass, every checkpoint stacked
    torch.testing.assert_close(got, fresh, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("perturbation", ["dataset", "example"])
def test_test_at_perturbed_matches_brute_force(run, perturbation):
    est = make(run, rho=0.2, perturbation=perturbation, test_at_perturbed=True)
    ref = brute_force(run, 0.2, False, perturbation, test_at_perturbed=True)
    torch.testing.assert_close(est.influence(run["test"]), ref, rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------- vs Captum


def test_rho_zero_equals_captum_tracincp(run):
    model = run["model"]
    before = snapshot(model)
    ours = make(run, rho=0.0)
    got = ours.influence(run["test"])
    got_top = ours.influence(run["test"], k=3, proponents=False)
    got_self = ours.self_influence()
    assert_unchanged(model, before)
    captum = TracInCP(
        copy.deepcopy(model),
        run["train"],
        run["ckpts"],
        checkpoints_load_func=checkpoints_load_func,
        loss_fn=ce_loss(),
        batch_size=5,
    )
    ref = captum.influence(run["test"])
    torch.testing.assert_close(got, ref, rtol=1e-11, atol=1e-13)
    ref_top = captum.influence(run["test"], k=3, proponents=False)
    assert torch.equal(got_top.indices, ref_top.indices)
    torch.testing.assert_close(
        got_top.influence_scores, ref_top.influence_scores, rtol=1e-11, atol=1e-13
    )
    torch.testing.assert_close(got_self, captum.self_influence(), rtol=1e-11, atol=1e-13)


# ----------------------------------------------------------------- consistency


def test_topk_self_influence_loader_and_batch_size_consistency(run):
    est = make(run, rho=0.1)
    full = est.influence(run["test"])
    top = est.influence(run["test"], k=4)
    assert torch.equal(top.indices, full.argsort(dim=1, descending=True)[:, :4])
    torch.testing.assert_close(
        top.influence_scores, full.sort(dim=1, descending=True).values[:, :4]
    )
    opp = est.influence(run["test"], k=2, proponents=False)
    assert torch.equal(opp.indices, full.argsort(dim=1)[:, :2])
    train_vs_train = est.influence(run["train"].tensors)
    torch.testing.assert_close(
        est.self_influence(), train_vs_train.diagonal(), rtol=1e-11, atol=1e-13
    )
    torch.testing.assert_close(est.self_influence(run["train"].tensors), est.self_influence())
    loader = DataLoader(TensorDataset(*run["test"]), batch_size=3)
    torch.testing.assert_close(est.influence(loader), full, rtol=1e-12, atol=1e-14)
    other = make(run, rho=0.1, batch_size=2)
    torch.testing.assert_close(other.influence(run["test"]), full, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(
        est.influence(run["test"], aggregate=True), full.sum(0, keepdim=True)
    )


@pytest.mark.parametrize("form", ["checkpoint", "trajectory"])
def test_learning_rate_convention_is_the_same_on_all_paths(run, form):
    est = (
        make(run, rho=0.1)
        if form == "checkpoint"
        else SAMTracInCP.from_trajectory(run["model"], run["train"], run["traj"], loss_fn=ce_loss())
    )
    full = est.influence(run["test"])
    test_q = est.compute_intermediate_quantities(run["test"], side="test")
    train_q = est.compute_intermediate_quantities(side="train")
    torch.testing.assert_close(test_q @ train_q.T, full, rtol=1e-11, atol=1e-13)
    agg = est.compute_intermediate_quantities(run["test"], side="test", aggregate=True)
    torch.testing.assert_close(agg @ train_q.T, full.sum(0, keepdim=True), rtol=1e-11, atol=1e-13)
    # self influence agrees with the diagonal of the same convention
    diag = (est.compute_intermediate_quantities(run["train"].tensors, side="test") * train_q).sum(1)
    torch.testing.assert_close(est.self_influence(), diag, rtol=1e-11, atol=1e-13)
    if form == "checkpoint":  # the coefficient is eta_c, once
        lrs = [checkpoints_load_func(copy.deepcopy(run["model"]), c) for c in run["ckpts"]]
        assert len(set(lrs)) == 3
        raw = make(
            run, rho=0.1, checkpoints_load_func=lambda m, p: checkpoints_load_func(m, p) * 0 + 1
        )
        p = test_q.shape[1] // 3
        rq = raw.compute_intermediate_quantities(side="train")
        for c, lr in enumerate(lrs):
            torch.testing.assert_close(
                train_q[:, c * p : (c + 1) * p], lr * rq[:, c * p : (c + 1) * p]
            )


# ----------------------------------------------------------------- trajectory


@pytest.mark.parametrize("factorize", [True, False])
@pytest.mark.parametrize("layers", [None, ["fc2"]])
def test_trajectory_form_equals_manual_sum_over_steps(run, layers, factorize):
    """With ``layers`` each step's perturbation is still the training's (every parameter)."""
    traj, model = run["traj"], run["model"]
    est = SAMTracInCP.from_trajectory(
        model, run["train"], traj, loss_fn=ce_loss(), layers=layers, factorize=factorize
    )
    got = est.influence(run["test"])
    xs, ys = run["train"].tensors
    xt, yt = run["test"]
    every = [n for n, _ in model.named_parameters()]
    names = [n for n in every if layers is None or n.startswith("fc2.")]
    scratch = copy.deepcopy(model)
    saved = [traj.initial, *traj.checkpoints]
    ref = torch.zeros(N_TEST, N_TRAIN, dtype=DTYPE)
    self_ref = torch.zeros(N_TRAIN, dtype=DTYPE)
    for t, step in enumerate(traj.steps):
        ckpt = max((c for c in saved if c.step <= t), key=lambda c: c.step)
        checkpoints_load_func(scratch, ckpt.path)
        w = {n: p.detach().clone() for n, p in scratch.named_parameters()}
        batch_g = sum(grad_at(model, w, xs[k], ys[k], every) for k in step.indices) / len(
            step.indices
        )
        moved = sam_eps(w, batch_g, every, step.rho, step.adaptive)
        for k in step.indices:
            gk = grad_at(model, moved, xs[k], ys[k], names)
            coef = step.lr / len(step.indices)
            for i in range(N_TEST):
                ref[i, k] += coef * grad_at(model, w, xt[i], yt[i], names) @ gk
            self_ref[k] += coef * grad_at(model, w, xs[k], ys[k], names) @ gk
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(est.self_influence(), self_ref, rtol=1e-10, atol=1e-12)
    top = est.influence(run["test"], k=2)
    assert torch.equal(top.indices, got.argsort(dim=1, descending=True)[:, :2])
    with pytest.raises(ValueError, match="training set only"):
        est.self_influence(run["test"])


def test_editing_tracks_schedule_retraining(tmp_path):
    data = make_data(n=40, seed=2)
    model = mlp_model(hidden=6)
    train_sam(
        model,
        data,
        ce_loss(),
        epochs=4,
        lr=0.1,
        rho=0.05,
        batch_size=8,
        record_dir=tmp_path / "r",
        seed=1,
        save_every=1,
        weight_decay=1e-3,
    )
    before = snapshot(model)
    est = SAMTracInCP.from_trajectory(model, data, tmp_path / "r", loss_fn=ce_loss())
    removed = [3, 11, 25, 31]
    delta = est.parameter_change(removed, flat=True)
    retrained = replay_trajectory(
        model, data, ce_loss(), tmp_path / "r", remove=removed, renormalise=False
    )
    actual = torch.cat(
        [(q - p).detach().reshape(-1) for p, q in zip(model.parameters(), retrained.parameters())]
    )
    pearson = torch.corrcoef(torch.stack([delta, actual]))[0, 1]
    assert pearson >= 0.9, pearson
    edited = est.edited_model(removed)
    assert edited is not model
    assert_unchanged(model, before)
    edited_flat = torch.cat([p.detach().reshape(-1) for p in edited.parameters()])
    final_flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(edited_flat - final_flat, delta)
    as_dict = est.parameter_change(removed)
    assert set(as_dict) == {n for n, _ in model.named_parameters()}


# ----------------------------------------------------------------- errors


def test_model_is_unchanged_and_bad_input_is_refused(run, tmp_path):
    model = run["model"]
    model.train()
    before = snapshot(model)
    est = make(run, rho=0.1, layers=["fc1"])
    est.influence(run["test"], k=2)
    est.self_influence()
    est.compute_intermediate_quantities()
    assert_unchanged(model, before)
    with pytest.raises(ValueError, match="empty"):
        make(run, checkpoints=[])
    no_lr = tmp_path / "no_lr.pt"
    torch.save({"model_state": model.state_dict()}, no_lr)
    with pytest.raises(ValueError, match="learning_rate"):
        make(run, checkpoints=[str(no_lr)])
    with pytest.raises(ValueError, match="reduction='none'"):
        make(run, loss_fn=torch.nn.CrossEntropyLoss())
    with pytest.raises(ValueError, match="perturbation"):
        make(run, perturbation="batch")
    with pytest.raises(ValueError, match="rho"):
        make(run, rho=-1.0)
    xt, yt = run["test"]
    with pytest.raises(ValueError, match="batch size"):
        make(run).influence((xt, yt[:2]))
    bad = TensorDataset(run["train"].tensors[0], run["train"].tensors[1].unsqueeze(1))
    with pytest.raises(ValueError, match="shapes"):
        SAMTracInCP(model, bad, run["ckpts"], loss_fn=ce_loss(), batch_size=5)
    nan_x = xt.clone()
    nan_x[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        make(run).influence((nan_x, yt))
    with pytest.raises(ValueError, match="order changes between passes"):
        SAMTracInCP(
            model,
            DataLoader(run["train"], batch_size=4, shuffle=True),
            run["ckpts"],
            loss_fn=ce_loss(),
        )
    for empty in ([], (), range(0)):
        with pytest.raises(ValueError, match="`indices` is empty"):
            make(run).parameter_change(empty)


def test_loaders_that_reorder_or_drop_examples_are_refused(run):
    """A training loader must read every example in order; a test loader in order:
    a shuffling test loader gave rows that mixed examples with several checkpoints."""
    from captum_sam import SAMInfluenceFunction

    model, train = run["model"], run["train"]
    xt, yt = run["test"]
    reversed_batches = [list(range(i, min(i + 4, len(train))))[::-1]
                        for i in range(0, len(train), 4)][::-1]  # fmt: skip
    for loader, match in [
        (DataLoader(train, batch_size=4, drop_last=True), "drop_last=True"),
        (DataLoader(train, batch_sampler=reversed_batches), "in index order"),
    ]:
        with pytest.raises(ValueError, match=match):
            SAMTracInCP(model, loader, run["ckpts"], loss_fn=ce_loss())
        with pytest.raises(ValueError, match=match):
            SAMInfluenceFunction(model, loader, run["ckpts"][-1], loss_fn=ce_loss())
    shuffled = DataLoader(TensorDataset(xt, yt), batch_size=2, shuffle=True)
    hif = SAMInfluenceFunction(model, train, run["ckpts"][-1], loss_fn=ce_loss(), batch_size=4)
    for call in (make(run).influence, make(run).self_influence, hif.influence,
                 hif.self_influence):  # fmt: skip
        with pytest.raises(ValueError, match="`inputs.*order changes between passes"):
            call(shuffled)
    in_order = DataLoader(TensorDataset(xt, yt), batch_size=2)
    torch.testing.assert_close(make(run).influence(in_order), make(run).influence((xt, yt)))
    # accepted as in Captum: a fixed custom order (rows follow it), any order when the
    # rows are summed, an explicit BatchSampler over a SequentialSampler for training
    order = list(range(len(yt)))[::-1]
    fixed = DataLoader(TensorDataset(xt, yt), batch_size=2, sampler=order)
    torch.testing.assert_close(make(run).influence(fixed), make(run).influence((xt, yt))[order])
    torch.testing.assert_close(make(run).influence(shuffled, aggregate=True),
                               make(run).influence((xt, yt), aggregate=True))  # fmt: skip
    explicit = DataLoader(train, batch_sampler=BatchSampler(SequentialSampler(train), 4, False))
    torch.testing.assert_close(
        SAMTracInCP(model, explicit, run["ckpts"], loss_fn=ce_loss(), rho=0.1).influence((xt, yt)),
        SAMTracInCP(model, train, run["ckpts"], loss_fn=ce_loss(), rho=0.1, batch_size=4).influence(
            (xt, yt)
        ),
    )


def test_merged_self_influence_bars_name_the_checkpoint_and_the_pass(run, capsys):
    est = make(run, rho=0.1)
    capsys.readouterr()
    est.self_influence(show_progress=True)
    err = capsys.readouterr().err
    count = len(est.checkpoints)
    for k in range(1, count + 1):
        for p in (1, 2):
            text = f"self influence (checkpoint {k} of {count}, pass {p} of 2). Processing batch"
            assert f"Using SAMTracInCP to compute {text}: 100%" in err


def test_a_frozen_parameter_in_layers_is_refused_with_rho(run):
    """Captum attributes a frozen parameter of a named module; at rho > 0 the
    perturbation would move it (training's never did): refused, not a wrong number."""
    from captum_sam import SAMInfluenceFunction

    model = copy.deepcopy(run["model"])
    first = next(n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear))
    bias = dict(model.named_parameters())[f"{first}.bias"]
    bias.requires_grad_(False)
    xt, yt = run["test"]
    with pytest.raises(ValueError, match=f"frozen parameters \\['{first}.bias'\\]"):
        SAMTracInCP(model, run["train"], run["ckpts"], loss_fn=ce_loss(), rho=0.1,
                    layers=[first])  # fmt: skip
    with pytest.raises(ValueError, match="frozen parameters"):
        SAMInfluenceFunction(model, run["train"], run["ckpts"][-1], loss_fn=ce_loss(),
                             rho=0.1, layers=[first])  # fmt: skip
    at_zero = SAMTracInCP(model, run["train"], run["ckpts"], loss_fn=ce_loss(), rho=0.0,
                          layers=[first])  # fmt: skip
    captum = TracInCP(copy.deepcopy(model), run["train"], run["ckpts"], loss_fn=ce_loss(),
                      layers=[first], checkpoints_load_func=checkpoints_load_func)  # fmt: skip
    torch.testing.assert_close(at_zero.influence((xt, yt)), captum.influence((xt, yt)))
    assert not bias.requires_grad
