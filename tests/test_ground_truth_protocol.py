"""Ground-truth protocols against hand-written retraining loops (float64), subsets, keys, report.

Each protocol of ``PROTOCOLS`` is checked against SAM-SGD written out step by step:
renormalised replay (mean over the kept examples, an empty batch skipped: no step and no
momentum update), the zero-weight replay (``1/|B_t|`` kept, every step taken), fresh
retraining (a seeded permutation of the kept examples) and the two fixed points.
"""

import copy
import json
import os

import numpy as np
import pytest
import torch
from torch.func import functional_call, grad
from torch.utils.data import TensorDataset

from captum_sam import (
    checkpoints_load_func,
    load_trajectory,
    replay_trajectory,
    retrain_fresh,
    train_sam,
)
from captum_sam.cli import _compare_config, build_parser
from captum_sam.evaluation import (
    PROTOCOLS,
    GroundTruth,
    check_masks,
    lds_scores,
    random_subsets,
    sam_fixed_point,
)
from captum_sam.evaluation.metrics import lds
from captum_sam.evaluation.report import protocol_sentence
from tests.helpers import ce_loss, linear_model, make_data, mlp_model

RHO, LR, MOMENTUM, WD, BATCH = 0.1, 0.2, 0.9, 1e-2, 4
TEST = make_data(n=7, seed=9).tensors


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A recorded SAM run with momentum, weight decay and a per-epoch learning rate."""
    record = tmp_path_factory.mktemp("run") / "r"
    data = make_data(n=12, seed=3)
    model = mlp_model(seed=1)
    train_sam(
        model,
        data,
        ce_loss(),
        epochs=3,
        lr=LR,
        rho=RHO,
        batch_size=BATCH,
        weight_decay=WD,
        momentum=MOMENTUM,
        lr_schedule=lambda e: 0.5**e,
        record_dir=record,
        seed=4,
    )
    return model, data, load_trajectory(record)


def hand_sam_sgd(traj, data, batches):
    """SAM-SGD with momentum written out; ``batches``: ``(step, idx, divisor)`` or skipped."""
    ref = mlp_model()
    checkpoints_load_func(ref, traj.initial.path)
    w = {k: v.detach().clone() for k, v in ref.named_parameters()}
    x, y = data.tensors
    buf = None
    for step, idx, divisor in batches:

        def mean_loss(p, idx=idx, divisor=divisor):
            return ce_loss()(functional_call(ref, p, (x[idx],)), y[idx]).sum() / divisor

        g = grad(mean_loss)(w)
        norm = torch.sqrt(sum((v**2).sum() for v in g.values()))
        g2 = grad(mean_loss)({k: w[k] + step.rho * g[k] / (norm + 1e-12) for k in w})
        d = {k: g2[k] + WD * w[k] for k in w}
        buf = d if buf is None else {k: MOMENTUM * buf[k] + d[k] for k in w}
        w = {k: w[k] - step.lr * buf[k] for k in w}
    return torch.cat([w[k].reshape(-1) for k, _ in ref.named_parameters()])


def flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def emptying_removal(traj):
    """A removal that empties the second recorded batch, plus one more example."""
    removed = sorted(traj.steps[1].indices)
    other = next(i for i in traj.steps[0].indices if i not in removed)
    return removed + [other]


def test_renormalised_replay_matches_hand_loop_and_skips_empty_batch(run):
    model, data, traj = run
    removed = emptying_removal(traj)
    batches = []
    for step in traj.steps:
        kept = [i for i in step.indices if i not in removed]
        if kept:  # an empty batch: no step at all (no momentum update either)
            batches.append((step, torch.tensor(kept), len(kept)))
    assert len(batches) < len(traj.steps)  # some batch really was emptied
    got = replay_trajectory(mlp_model(), data, ce_loss(), traj, remove=removed)
    torch.testing.assert_close(flat(got), hand_sam_sgd(traj, data, batches), rtol=1e-10, atol=1e-12)
    # nothing removed: the exact replay of the recorded run
    exact = replay_trajectory(mlp_model(), data, ce_loss(), traj, remove=[])
    torch.testing.assert_close(flat(exact), flat(model), rtol=1e-10, atol=1e-12)


def test_zero_weight_replay_matches_hand_loop(run):
    _, data, traj = run
    removed = emptying_removal(traj)
    batches = [
        (s, torch.tensor([i for i in s.indices if i not in removed], dtype=torch.long), BATCH)
        for s in traj.steps
    ]
    got = replay_trajectory(mlp_model(), data, ce_loss(), traj, remove=removed, renormalise=False)
    want = hand_sam_sgd(traj, data, batches)
    torch.testing.assert_close(flat(got), want, rtol=1e-10, atol=1e-12)
    renormalised = replay_trajectory(mlp_model(), data, ce_loss(), traj, remove=removed)
    assert (flat(renormalised) - want).norm() > 1e-3 * want.norm()


def test_fresh_retraining_matches_hand_loop_with_a_seeded_permutation(run):
    model, data, traj = run
    removed = [0, 5, 6]
    kept = torch.tensor([i for i in range(12) if i not in removed])
    g = torch.Generator().manual_seed(7)
    lrs = {s.epoch: s for s in traj.steps}  # one learning rate per recorded epoch
    batches = []
    for epoch in range(3):
        order = kept[torch.randperm(len(kept), generator=g)]
        batches += [(lrs[epoch], idx, len(idx)) for idx in order.split(BATCH)]
    assert [b[2] for b in batches[:3]] == [4, 4, 1]
    got = retrain_fresh(mlp_model(), data, ce_loss(), traj, remove=removed, seed=7)
    torch.testing.assert_close(flat(got), hand_sam_sgd(traj, data, batches), rtol=1e-10, atol=1e-12)
    # nothing removed, the recorded seed: the recorded run itself
    again = retrain_fresh(mlp_model(), data, ce_loss(), traj, seed=traj.seed)
    torch.testing.assert_close(flat(again), flat(model), rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="`remove` leaves no training example"):
        retrain_fresh(mlp_model(), data, ce_loss(), traj, remove=list(range(12)))


def sam_residual(model, data, removed, divisor, rho=RHO, lam=WD):
    """``grad L(w + eps(w)) + lam w`` written out for the loss ``sum_kept l_i / divisor``."""
    x, y = data.tensors
    keep = torch.ones(len(y), dtype=torch.float64)
    keep[removed] = 0.0
    w = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p):
        return (keep * ce_loss()(functional_call(model, p, (x,)), y)).sum() / divisor

    g = grad(loss)(w)
    norm = torch.sqrt(sum((v**2).sum() for v in g.values()))
    g2 = grad(loss)({k: w[k] + rho * g[k] / (norm + 1e-12) for k in w})
    return torch.cat([(g2[k] + lam * w[k]).reshape(-1) for k in w])


def test_fixed_points_solve_the_renormalised_and_zero_weight_equations():
    data, removed = make_data(n=20, seed=2), [1, 4, 9, 13]
    renorm = sam_fixed_point(linear_model(), data, ce_loss(), RHO, WD, remove=removed)
    zero = sam_fixed_point(
        linear_model(), data, ce_loss(), RHO, WD, remove=removed, renormalise=False
    )
    assert sam_residual(renorm.model, data, removed, 16).norm() < 1e-9
    assert sam_residual(zero.model, data, removed, 20).norm() < 1e-9
    assert sam_residual(zero.model, data, removed, 16).norm() > 1e-4  # another point


def test_ground_truth_modes_give_the_protocols(run, tmp_path):
    _, data, traj = run
    removed = [2, 3]
    kw = dict(trajectory=traj, cache_dir=str(tmp_path / "c"))
    expected = {
        "schedule": replay_trajectory(mlp_model(), data, ce_loss(), traj, removed),
        "schedule_zero_weight": replay_trajectory(
            mlp_model(), data, ce_loss(), traj, removed, renormalise=False
        ),
    }
    for mode, model in expected.items():
        res = GroundTruth(mlp_model(), data, ce_loss(), mode, **kw).evaluate([removed], TEST)
        torch.testing.assert_close(res.params[0], flat(model), rtol=0, atol=0)
    fresh = GroundTruth(mlp_model(), data, ce_loss(), "fresh", seeds=(3, 8), **kw)
    res = fresh.evaluate([removed], TEST)
    models = [retrain_fresh(mlp_model(), data, ce_loss(), traj, removed, seed=s) for s in (3, 8)]
    x, y = TEST
    losses = torch.stack([ce_loss()(m(x), y).detach() for m in models]).mean(0)
    torch.testing.assert_close(res.losses[0], losses, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(res.params[0], (flat(models[0]) + flat(models[1])) / 2)
    acc = sum(float((m(x).argmax(1) == y).double().mean()) for m in models) / 2
    assert float(res.accuracies[0]) == pytest.approx(acc)
    start = linear_model()
    for mode, renormalise in (("fixed_point", True), ("fixed_point_zero_weight", False)):
        gt = GroundTruth(start, data, ce_loss(), mode, rho=RHO, weight_decay=WD)
        want = sam_fixed_point(
            start, data, ce_loss(), RHO, WD, remove=removed, renormalise=renormalise
        )
        torch.testing.assert_close(gt.evaluate([removed], TEST).params[0], flat(want.model))


def test_cache_keys_differ_by_protocol_and_seeds_and_a_changed_field_is_refused(run, tmp_path):
    _, data, traj = run
    cache = str(tmp_path / "c")

    def truth(mode, seeds=(0, 1, 2)):
        return GroundTruth(
            mlp_model(), data, ce_loss(), mode, trajectory=traj, cache_dir=cache, seeds=seeds
        )

    modes = [truth(m) for m in ("schedule", "schedule_zero_weight", "fresh")]
    modes += [truth("fresh", (0, 2))]
    dirs = {gt._open_cache(TEST).directory for gt in modes}
    assert len(dirs) == 4
    fields = [gt.cache_fields(TEST) for gt in modes]
    assert [f["removal"] for f in fields] == ["renormalised", "zero_weight"] + ["renormalised"] * 2
    assert [f["seeds"] for f in fields] == [None, None, [0, 1, 2], [0, 2]]
    gt = truth("fresh", (0, 2))
    gt.evaluate([[5]], TEST)
    directory = gt._open_cache(TEST).directory
    manifest = os.path.join(directory, "manifest.json")
    with open(manifest) as f:
        raw = json.load(f)
    raw["fields"]["seeds"] = [0, 1]
    with open(manifest, "w") as f:
        json.dump(raw, f)
    with pytest.raises(ValueError, match=r"manifest\.json.*field 'fields\.seeds'"):
        gt.evaluate([[5]], TEST)


def test_bad_protocol_inputs_are_refused(run):
    _, data, traj = run
    with pytest.raises(ValueError, match="`mode` must be one of"):
        GroundTruth(mlp_model(), data, ce_loss(), "retrain", trajectory=traj)
    with pytest.raises(ValueError, match="'fresh' needs the `trajectory`"):
        GroundTruth(mlp_model(), data, ce_loss(), "fresh")
    with pytest.raises(ValueError, match="`seeds` must be distinct"):
        GroundTruth(mlp_model(), data, ce_loss(), "fresh", trajectory=traj, seeds=(1, 1))


@pytest.mark.parametrize("sampler", ["fraction", "bernoulli"])
def test_subset_samplers(sampler):
    masks = random_subsets(200, 300, sampler=sampler, fraction=0.3, seed=1)
    assert masks.shape == (300, 200) and masks.dtype == torch.bool
    kept = masks.sum(dim=1)
    assert bool((kept > 0).all() and (kept < 200).all())
    assert abs(float(masks.double().mean()) - 0.3) < 0.01
    if sampler == "fraction":
        assert kept.tolist() == [60] * 300
    else:  # independent draws: the subset size varies like Binomial(200, 0.3)
        assert 4.5 < float(kept.double().std()) < 8.5
        tiny = random_subsets(2, 200, sampler=sampler, fraction=0.5, seed=0)
        assert tiny.sum(dim=1).tolist() == [1] * 200  # all-kept / empty draws redrawn
    assert torch.equal(masks, random_subsets(200, 300, sampler=sampler, fraction=0.3, seed=1))
    assert not torch.equal(masks, random_subsets(200, 300, sampler=sampler, fraction=0.3, seed=2))


def test_subset_arguments_and_masks_are_checked():
    with pytest.raises(ValueError, match="`sampler`"):
        random_subsets(10, 3, sampler="poisson")
    with pytest.raises(ValueError, match="`fraction`"):
        random_subsets(10, 3, fraction=1.0)
    with pytest.raises(ValueError, match="`count`"):
        random_subsets(10, 0.5)
    good = random_subsets(6, 3, seed=0)
    assert torch.equal(check_masks(good, 6), good)
    with pytest.raises(TypeError, match="`masks`"):
        check_masks(good.tolist(), 6)
    for bad, why in (
        (good.double(), "dtype"),
        (good[0], "shape"),
        (good[:, :5], "shape"),
        (good[:0], "no subset"),
        (torch.ones(3, 6, dtype=torch.bool), "row 0 keeps every example"),
        (torch.cat([good[:1], torch.zeros(1, 6, dtype=torch.bool)]), "row 1 keeps no example"),
    ):
        with pytest.raises(ValueError, match=f"`masks`.*{why}"):
            check_masks(bad, 6)


def test_lds_scores_with_user_masks_sampler_and_seeds(run, tmp_path):
    data = make_data(n=16, seed=5)
    start = sam_fixed_point(linear_model(), data, ce_loss(), RHO, WD).model
    cache = str(tmp_path / "c")
    gt = GroundTruth(
        start, data, ce_loss(), "fixed_point", rho=RHO, weight_decay=WD, cache_dir=cache
    )
    scores = torch.randn(7, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    masks = random_subsets(16, 4, sampler="bernoulli", fraction=0.6, seed=3)
    res = gt.evaluate([torch.nonzero(~m).flatten().tolist() for m in masks], TEST)
    want = lds(scores, masks, res.losses)[0]
    assert lds_scores(scores, gt, TEST, masks=masks) == pytest.approx(want, abs=1e-12)
    drawn = lds_scores(scores, gt, TEST, fraction=0.6, count=4, seed=3, sampler="bernoulli")
    assert drawn == pytest.approx(want, abs=1e-12)
    with pytest.raises(ValueError, match="`masks` row 0 keeps every example"):
        lds_scores(scores, gt, TEST, masks=torch.ones(4, 16, dtype=torch.bool))
    with pytest.raises(ValueError, match="`seeds`.*'fresh'"):
        lds_scores(scores, gt, TEST, masks=masks, seeds=(0, 1))
    _, train, traj = run
    fresh = GroundTruth(
        mlp_model(), train, ce_loss(), "fresh", trajectory=traj, seeds=(0,), cache_dir=cache
    )
    s12 = torch.randn(7, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    m12 = random_subsets(12, 3, seed=4)
    two = GroundTruth(
        mlp_model(), train, ce_loss(), "fresh", trajectory=traj, seeds=(5, 6), cache_dir=cache
    )
    res = two.evaluate([torch.nonzero(~m).flatten().tolist() for m in m12], TEST)
    got = lds_scores(s12, fresh, TEST, masks=m12, seeds=(5, 6))
    assert got == pytest.approx(lds(s12, m12, res.losses)[0], abs=1e-12)


def test_report_and_cli_name_the_protocol():
    for mode, text in PROTOCOLS.items():
        results = {
            "config": {"gt_seeds": [4, 5], "lds_sampler": "bernoulli"},
            "ground_truth": {
                "mode": mode,
                "fixed_point_residual": 1e-12,
                "seeds": [4, 5],
                "lds_sampler": "bernoulli",
            },
        }
        sentence = protocol_sentence(results)
        assert f"`{mode}`" in sentence and text in sentence and "`bernoulli`" in sentence
        assert ("seeds 4, 5" in sentence) == (mode == "fresh")
    args = build_parser().parse_args(
        ["compare", "--quick", "--ground-truth", "fresh", "--gt-seeds", "3,1"]
        + ["--lds-sampler", "bernoulli", "--out", "unused"]
    )
    config = _compare_config(args)
    assert (config.ground_truth, config.gt_seeds, config.lds_sampler) == (
        "fresh",
        (3, 1),
        "bernoulli",
    )
    for mode in PROTOCOLS:
        parsed = build_parser().parse_args(["compare", "--ground-truth", mode, "--out", "x"])
        assert parsed.ground_truth == mode
    with pytest.raises(SystemExit):
        build_parser().parse_args(["compare", "--gt-seeds", "1,1", "--out", "x"])


def test_removed_sets_must_be_indices(tmp_path):
    """A boolean mask or float indices were read as indices 0/1 (the wrong examples
    removed, silently); negative indices removed the last example in sam_fixed_point."""
    from captum_sam import replay_trajectory, train_sam
    from captum_sam.evaluation.retrain import sam_fixed_point

    data = make_data(n=10)
    model = linear_model()
    train_sam(model, data, ce_loss(), epochs=1, lr=0.1, rho=0.05, batch_size=5,
              record_dir=tmp_path / "r", seed=0)  # fmt: skip
    mask = torch.zeros(10, dtype=torch.bool)
    mask[5] = True
    bad = [(mask, "boolean mask"), ([1.7], "integer"), ([-1], r"\[0, 10\)"),
           ([10], r"\[0, 10\)"), ([[1, 2]], "1-D")]  # fmt: skip
    for remove, match in bad:
        with pytest.raises(ValueError, match=match):
            replay_trajectory(linear_model(), data, ce_loss(), tmp_path / "r", remove=remove)
        with pytest.raises(ValueError, match=match):
            sam_fixed_point(model, data, ce_loss(), 0.05, 1e-3, remove=remove)
    a = replay_trajectory(linear_model(), data, ce_loss(), tmp_path / "r", remove=torch.tensor([5]))
    for same in ([5, 5], {5}, 5, torch.tensor(5), np.array([5], dtype=np.uint16),
                 (i for i in [5])):  # fmt: skip
        b = replay_trajectory(linear_model(), data, ce_loss(), tmp_path / "r", remove=same)
        assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    full = replay_trajectory(linear_model(), data, ce_loss(), tmp_path / "r")
    for nothing in ([], np.array([]), torch.tensor([])):  # empty arrays read as float
        b = replay_trajectory(linear_model(), data, ce_loss(), tmp_path / "r", remove=nothing)
        assert all(torch.equal(p, q) for p, q in zip(full.parameters(), b.parameters()))


def test_radius_decay_and_rate_must_be_finite_and_non_negative():
    """A negative rho or weight decay, a NaN momentum or an infinite learning rate
    were accepted (training then turned the weights into NaN in place)."""
    from captum_sam import train_sam
    from captum_sam.evaluation.retrain import sam_fixed_point

    data, model = make_data(n=8), linear_model()
    before = [p.detach().clone() for p in model.parameters()]
    train_sam(copy.deepcopy(model), data, ce_loss(), epochs=1, lr=np.float32(0.1),
              rho=0.05, batch_size=4, weight_decay=torch.tensor(1e-3),
              momentum=np.float64(0.5))  # numpy and 0-d tensor numbers, as before  # fmt: skip
    for kw, name in [(dict(rho=-0.1), "rho"), (dict(weight_decay=-1.0), "weight_decay")]:
        args = {"rho": 0.05, "weight_decay": 1e-3, **kw}
        with pytest.raises(ValueError, match=f"`{name}` must be a finite number"):
            sam_fixed_point(model, data, ce_loss(), args["rho"], args["weight_decay"])
        with pytest.raises(ValueError, match=f"`{name}` must be a finite number"):
            GroundTruth(model, data, ce_loss(), "fixed_point", **args)
    nan, inf = float("nan"), float("inf")
    for kw, name in [(dict(weight_decay=nan), "weight_decay"), (dict(momentum=nan), "momentum"),
                     (dict(lr=inf), "lr")]:  # fmt: skip
        args = {"epochs": 1, "lr": 0.1, "rho": 0.05, "batch_size": 4, **kw}
        with pytest.raises(ValueError, match=f"`{name}` must be a finite number"):
            train_sam(model, data, ce_loss(), **args)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_a_degenerate_sam_fixed_point_is_flagged():
    """Newton from a fresh start can land where the loss gradient vanishes (2e-12): the
    perturbation's direction is then set by the 1e-12 of its denominator, and SAM-HIF's
    full variant (d eps/dw ~ 1/||g||) gave a zero parameter change there."""
    from captum_sam.evaluation.retrain import sam_fixed_point

    torch.manual_seed(0)
    x = torch.randn(40, 3, dtype=torch.float64)
    data = TensorDataset(x, torch.randint(0, 2, (40,)))
    start = torch.nn.Linear(3, 2).to(torch.float64)
    with pytest.warns(UserWarning, match="vanishing loss gradient"):
        sam_fixed_point(start, data, ce_loss(), 0.05, 0.05, max_iter=100)
