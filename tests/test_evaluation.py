import pytest
import torch
from scipy.stats import spearmanr
from torch.func import functional_call

from captum_sam import checkpoints_load_func, load_trajectory, train_sam
from captum_sam.evaluation import sam_fixed_point
from captum_sam.evaluation.ground_truth import GroundTruth, random_subsets
from captum_sam.evaluation.metrics import lds
from tests.helpers import ce_loss, linear_model, make_data, mlp_model, save_checkpoint

RHO, LAM = 0.1, 0.1


def hand_fixed_point(model, data, removed, steps=3000, lr=0.5):
    """Full-batch SAM gradient descent written out, run to convergence."""
    x, y = data.tensors
    w = {n: p.detach().clone() for n, p in model.named_parameters()}
    keep = torch.ones(len(y), dtype=torch.float64)
    keep[removed] = 0

    def mean_loss(p):
        return (keep * ce_loss()(functional_call(model, p, (x,)), y)).sum() / len(y)

    for _ in range(steps):
        g = torch.func.grad(mean_loss)(w)
        norm = torch.sqrt(sum((v**2).sum() for v in g.values()))
        moved = {n: w[n] + RHO * g[n] / (norm + 1e-12) for n in w}
        g2 = torch.func.grad(mean_loss)(moved)
        w = {n: w[n] - lr * (g2[n] + LAM * w[n]) for n in w}
    return w


def test_fixed_point_matches_hand_written_sam_descent():
    data = make_data(n=30, seed=4)
    model = linear_model()
    result = sam_fixed_point(model, data, ce_loss(), RHO, LAM, remove=[2, 5], renormalise=False)
    assert result.residual < 1e-10
    ref = hand_fixed_point(model, data, [2, 5])
    for n, p in result.model.named_parameters():
        torch.testing.assert_close(p.detach(), ref[n], rtol=1e-8, atol=1e-9)


def test_schedule_ground_truth_matches_hand_written_loop_and_caches(tmp_path, monkeypatch):
    data = make_data(n=24, seed=5)
    xt, yt = make_data(n=10, seed=6).tensors
    model = mlp_model()
    train_sam(
        model,
        data,
        ce_loss(),
        epochs=2,
        lr=0.2,
        rho=RHO,
        batch_size=6,
        record_dir=tmp_path / "r",
        seed=0,
    )
    traj = load_trajectory(tmp_path / "r")
    gt = GroundTruth(
        mlp_model(seed=3),
        data,
        ce_loss(),
        "schedule_zero_weight",
        trajectory=traj,
        cache_dir=str(tmp_path / "cache"),
    )
    removals = [[1], [4, 7, 20]]
    res = gt.evaluate(removals, (xt, yt))
    x, y = data.tensors
    for r, removed in enumerate(removals):
        ref = mlp_model()
        checkpoints_load_func(ref, traj.initial.path)
        names = [n for n, _ in ref.named_parameters()]
        params = [p.detach().clone().requires_grad_() for p in ref.parameters()]
        for step in traj.steps:
            idx = torch.tensor([i for i in step.indices if i not in removed])

            size = len(step.indices)

            def loss_at(ps, idx=idx, size=size, ref=ref, names=names):
                out = functional_call(ref, dict(zip(names, ps)), (x[idx],))
                return ce_loss()(out, y[idx]).sum() / size

            g = torch.autograd.grad(loss_at(params), params)
            norm = torch.sqrt(sum((v**2).sum() for v in g))
            moved = [p + step.rho * v / (norm + 1e-12) for p, v in zip(params, g)]
            g2 = torch.autograd.grad(loss_at(moved), moved)
            params = [(p - step.lr * v).detach().requires_grad_() for p, v in zip(params, g2)]
        out = functional_call(ref, dict(zip(names, params)), (xt,))
        torch.testing.assert_close(
            res.losses[r], ce_loss()(out, yt).detach(), rtol=1e-10, atol=1e-12
        )
        assert res.accuracies[r] == pytest.approx((out.argmax(1) == yt).double().mean().item())
    # a second evaluation reads the cache instead of retraining
    monkeypatch.setattr(GroundTruth, "retrain", lambda self, removed: pytest.fail("retrained"))
    again = gt.evaluate(removals, (xt, yt))
    torch.testing.assert_close(again.losses, res.losses)
    assert torch.equal(again.seconds, res.seconds)


def test_lds_with_real_subset_retraining():
    data = make_data(n=30, seed=7)
    xt, yt = make_data(n=6, seed=8).tensors
    start = sam_fixed_point(linear_model(), data, ce_loss(), RHO, LAM).model
    gt = GroundTruth(start, data, ce_loss(), "fixed_point", rho=RHO, weight_decay=LAM)
    masks = random_subsets(30, 6, fraction=0.5, seed=0)
    assert masks.sum(1).tolist() == [15] * 6
    res = gt.evaluate([torch.nonzero(~m).flatten().tolist() for m in masks], (xt, yt))
    scores = torch.randn(6, 30, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    got, per = lds(scores, masks, res.losses)
    for j in range(6):
        pred = [(scores[j] * (~m).double()).sum().item() for m in masks]
        assert per[j] == pytest.approx(spearmanr(pred, res.losses[:, j])[0], abs=1e-12)


def test_loo_and_lds_scores_against_retraining(tmp_path, monkeypatch):
    import os

    from captum_sam.evaluation import lds_scores, loo_scores
    from captum_sam.hif.influence import SAMInfluenceFunction

    data = make_data(n=40, seed=11)
    xt, yt = make_data(n=8, seed=12).tensors
    star = sam_fixed_point(linear_model(), data, ce_loss(), RHO, LAM).model
    ckpt = os.path.join(tmp_path, "star.pt")
    save_checkpoint(star, ckpt, learning_rate=1.0)
    est = SAMInfluenceFunction(
        star,
        data,
        ckpt,
        loss_fn=ce_loss(),
        rho=RHO,
        weight_decay=LAM,
        variant="exact",
        projection_dim=None,
        hessian_reg=0.0,
        hessian_inverse_tol=None,
    )
    scores = est.influence((xt, yt))
    gt = GroundTruth(
        star,
        data,
        ce_loss(),
        "fixed_point",
        rho=RHO,
        weight_decay=LAM,
        cache_dir=str(tmp_path / "cache"),
    )
    pearson, spear = loo_scores(scores, gt, (xt, yt), list(range(0, 40, 4)))
    assert pearson > 0.95 and spear > 0.8, (pearson, spear)  # first order at a fixed point
    value = lds_scores(scores, gt, (xt, yt), fraction=0.5, count=6, seed=3)
    masks = random_subsets(40, 6, fraction=0.5, seed=3)
    res = gt.evaluate([torch.nonzero(~m).flatten().tolist() for m in masks], (xt, yt))
    assert value == pytest.approx(lds(scores, masks, res.losses)[0])
    assert value > 0.5
    monkeypatch.setattr(GroundTruth, "retrain", lambda self, removed: pytest.fail("retrained"))
    assert lds_scores(scores, gt, (xt, yt), fraction=0.5, count=6, seed=3) == value
    for wrong in (scores[:, :-2], torch.cat([scores, scores]), scores[0]):  # never broadcast
        with pytest.raises(ValueError, match="expected \\(n_test, n_train\\)"):
            lds_scores(wrong, gt, (xt, yt), fraction=0.5, count=6, seed=3)
        with pytest.raises(ValueError, match="expected \\(n_test, n_train\\)"):
            loo_scores(wrong, gt, (xt, yt), [0, 4])
