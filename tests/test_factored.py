import copy

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from captum_sam import core as F
from captum_sam import load_trajectory, train_sam
from captum_sam.core.layers.linear import (
    Unsupported,
    factor_apply,
    factor_cross,
    factor_dots,
    factor_grad_sum,
    linear_factors,
    linear_factors_stacked,
    linear_sites,
    matches_vmap,
)
from captum_sam.core.layers.linear_ggn import (
    MAX_OUTPUTS,
    ggn_matches,
    ggn_pieces,
    ggn_product,
    linear_ggn,
)
from captum_sam.gif.factored_grads import FactoredGradients
from captum_sam.gif.tracincp import SAMTracInCP
from captum_sam.solvers import dense_matrix
from tests.helpers import (
    DTYPE,
    BatchCentred,
    assert_unchanged,
    ce_loss,
    make_data,
    mlp_model,
    save_checkpoint,
    snapshot,
)


class Tokens(nn.Module):
    """Linear layers on a (batch, tokens, features) input, then mean pooling."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(3, 4)
        self.head = nn.Linear(4, 3)
        self.unused = nn.Linear(2, 2)

    def forward(self, x):
        return self.head(torch.tanh(self.embed(x)).mean(1))


class Shared(nn.Module):
    """One linear layer applied twice: its gradient is not one outer product."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(5, 5)
        self.out = nn.Linear(5, 3)

    def forward(self, x):
        return self.out(torch.tanh(self.fc(torch.tanh(self.fc(x)))))


def vmap_dots(floss, p, q, batch):
    """Per-example <grad l_i(p), grad l_i(q)> with vmap(grad)."""
    gp, gq = F.per_example_grads(floss, p, batch), F.per_example_grads(floss, q, batch)
    return sum((gp[n].flatten(1) * gq[n].flatten(1)).sum(1) for n in gp)


def count_passes(monkeypatch):
    """A list that grows by one per factored pass (a stacked pass over steps counts once)."""
    from captum_sam.core.layers import sites

    passes = []
    for name in ("layer_factors", "layer_factors_stacked"):
        original = getattr(sites, name)
        monkeypatch.setattr(
            sites,
            name,
            lambda *a, original=original: passes.append(1) or original(*a),
        )
    return passes


def one_checkpoint(model, x, y, tmp_path):
    """``make(**kw)``: SAM-GIF (rho 0.1, batches of 8) on one checkpoint of ``model``."""
    path = tmp_path / "model.pt"
    save_checkpoint(model, path)

    def make(**f):
        return SAMTracInCP(
            model, TensorDataset(x, y), [str(path)], loss_fn=ce_loss(), batch_size=8, rho=0.1, **f
        )

    return make


def loss_of(model, names):
    params, frozen = F.detached_params(model, names)
    return F.FunctionalLoss(model, ce_loss(), frozen), params


@pytest.mark.parametrize("frozen_bias", [False, True])
def test_factored_dots_and_gradient_sum_equal_vmap_on_token_inputs(frozen_bias):
    torch.manual_seed(0)
    model = Tokens().to(DTYPE)
    if frozen_bias:
        model.head.bias.requires_grad_(False)
    names = F.attributed_names(model)
    sites = linear_sites(model, names)
    assert sites is not None and len(sites) == 3
    floss, p = loss_of(model, names)
    q = {n: v + 0.1 * torch.randn_like(v) for n, v in p.items()}
    batch = (torch.randn(6, 7, 3, dtype=DTYPE), torch.randint(0, 3, (6,)))
    fp, fq = (linear_factors(floss, w, batch, sites) for w in (p, q))
    assert fp[0][0].shape == (6, 7, 3) and fp[1][1].shape == (6, 1, 3)
    torch.testing.assert_close(factor_dots(fp, fq, sites), vmap_dots(floss, p, q, batch))
    gp, gq = (F.per_example_grads(floss, w, batch) for w in (p, q))
    gram = sum(gp[n].flatten(1) @ gq[n].flatten(1).T for n in gp)
    torch.testing.assert_close(factor_cross(fp, fq, sites), gram)
    rows = {n: gp[n][:2].flatten(1) for n in gp}  # two formed gradients
    torch.testing.assert_close(factor_apply(fq, rows, sites), gram[:2])
    head = factor_cross([(a[:2, :1], d[:2, :1]) for a, d in fp], fq, sites)  # T = 1 vs 7
    assert head.shape == (2, 6)
    g = factor_grad_sum(fq, sites)
    ref = torch.func.grad(floss.summed_loss)(q, batch)
    assert set(g) == set(ref)
    for n in ref:
        torch.testing.assert_close(g[n], ref[n])


def test_stacked_factors_equal_one_pass_per_weight_point():
    """Token inputs, a layer never called, and a batch that cannot be stacked."""
    torch.manual_seed(0)
    model = Tokens().to(DTYPE)
    names = F.attributed_names(model)
    sites = linear_sites(model, names)
    floss, p = loss_of(model, names)
    points = [{n: v + 0.1 * torch.randn_like(v) for n, v in p.items()} for _ in range(3)]
    stacked = {n: torch.stack([q[n] for q in points]) for n in p}
    x, y = torch.randn(12, 7, 3, dtype=DTYPE), torch.randint(0, 3, (12,))
    got = linear_factors_stacked(floss, stacked, (x, y), sites, 3)
    as_list = F.FunctionalLoss(model, lambda out, t: ce_loss()(out, torch.tensor(t)), {})
    fallback = linear_factors_stacked(as_list, stacked, (x, y.tolist()), sites, 3)
    for k, q in enumerate(points):
        ref = linear_factors(floss, q, (x[4 * k : 4 * k + 4], y[4 * k : 4 * k + 4]), sites)
        for i, (a, d) in enumerate(ref):
            assert got[i][0].shape == (3, *a.shape)
            for out in (got, fallback):
                # float64 rounding only: a stacked matmul may block its sums differently
                torch.testing.assert_close(out[i][0][k], a, rtol=1e-12, atol=1e-14)
                torch.testing.assert_close(out[i][1][k], d, rtol=1e-12, atol=1e-14)
    assert not got[2][1].any()  # ``unused`` is never called: a zero gradient
    with pytest.raises(ValueError, match="not 5 equal"):
        linear_factors_stacked(floss, stacked, (x, y), sites, 5)
    twice = Shared().to(DTYPE)
    floss2, p2 = loss_of(twice, F.attributed_names(twice))
    with pytest.raises(Unsupported, match="more than once"):
        linear_factors_stacked(
            floss2,
            {n: v.expand(2, *v.shape) for n, v in p2.items()},
            (torch.randn(4, 5, dtype=DTYPE), torch.randint(0, 3, (4,))),
            linear_sites(twice, F.attributed_names(twice)),
            2,
        )


def test_sites_refuse_parameters_outside_linear_layers_and_the_check_refuses_coupling():
    conv = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(8, 3))
    assert linear_sites(conv, F.attributed_names(conv)) is None
    assert linear_sites(conv, F.attributed_names(conv, ["2"])) is not None
    x, y = torch.randn(6, 5, dtype=DTYPE), torch.randint(0, 3, (6,))
    for cls, ok in [(Shared, False), (BatchCentred, False)]:
        model = cls().to(DTYPE)
        names = F.attributed_names(model)
        floss, p = loss_of(model, names)
        assert matches_vmap(floss, p, (x, y), linear_sites(model, names)) is ok
    model = mlp_model()
    names = F.attributed_names(model)
    floss, p = loss_of(model, names)
    assert matches_vmap(floss, p, (x, y), linear_sites(model, names))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    data = make_data(n=30, seed=3)
    model = mlp_model(hidden=5)
    out = tmp_path_factory.mktemp("factored") / "run"
    train_sam(model, data, ce_loss(), epochs=2, lr=0.2, rho=0.1, batch_size=7, record_dir=out)
    return dict(model=model, data=data, traj=load_trajectory(out))


def both_paths(make, test=None):
    """Self influence (or influence on ``test``) with the factored path and without it."""
    fast, slow = make(), make(factorize=False)
    if test is None:
        got, ref = fast.self_influence(), slow.self_influence()
    else:
        got, ref = fast.influence(test), slow.influence(test)
    assert fast.engines.factored._checked and all(
        fast.engines.factored._checked.values()
    )  # it really ran
    return got, ref


@pytest.mark.parametrize(
    "kw",
    [
        dict(rho=0.2),
        dict(rho=0.2, adaptive=True),
        dict(rho=0.2, test_at_perturbed=True),
        dict(rho=0.0),
        dict(rho=0.0, test_at_perturbed=True),
        dict(rho=0.2, layers=["fc2"]),
    ],
)
def test_checkpoint_self_influence_factored_equals_vmap(run, kw):
    ckpts = [c.path for c in run["traj"].checkpoints]
    got, ref = both_paths(
        lambda **f: SAMTracInCP(
            run["model"], run["data"], ckpts, loss_fn=ce_loss(), batch_size=8, **kw, **f
        )
    )
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)


HEAD = dict(layers=["fc2"], perturbation_scope="attributed")  # only the output layer moves


@pytest.mark.parametrize("perturbation", ["batch", "dataset"])
@pytest.mark.parametrize("test_at_perturbed", [False, True])
@pytest.mark.parametrize("head", [False, True])
def test_trajectory_self_influence_factored_equals_vmap(
    run, perturbation, test_at_perturbed, head, monkeypatch
):
    """Steps at one checkpoint together (one pass at w over their examples), or alone.

    ``head``: only the output layer attributed and perturbed (where a step's factors
    at w + eps are computed one step at a time, they come from its input at w,
    :mod:`captum_sam.gif.head`).
    """
    from captum_sam.gif import factored_steps

    model = run["model"]
    before = snapshot(model)

    def make(**f):
        return SAMTracInCP.from_trajectory(
            model,
            run["data"],
            run["traj"],
            loss_fn=ce_loss(),
            perturbation=perturbation,
            test_at_perturbed=test_at_perturbed,
            **(HEAD if head else {}),
            **f,
        )

    got, ref = both_paths(make)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    if head and (perturbation == "batch" or not test_at_perturbed):  # factors at w known
        from captum_sam.core.layers import sites

        stacked, real = [], sites.layer_factors_stacked
        monkeypatch.setattr(
            sites, "layer_factors_stacked", lambda *a: stacked.append(1) or real(*a)
        )
        torch.testing.assert_close(make().self_influence(), ref, rtol=1e-10, atol=1e-12)
        assert not stacked  # every step's factors at w + eps from its rows at w
        monkeypatch.setattr(sites, "layer_factors_stacked", real)
    passes = count_passes(monkeypatch)
    make().self_influence()
    grouped = len(passes)
    monkeypatch.setattr(factored_steps, "GROUP_BUDGET_BYTES", 1)  # one step at a time
    single = make().self_influence()
    torch.testing.assert_close(single, ref, rtol=1e-10, atol=1e-12)
    if not test_at_perturbed:  # one pass at w per checkpoint instead of one per step
        assert grouped < len(passes) - grouped
    assert_unchanged(model, before)


class _Scaled(torch.nn.Module):
    """A parameter-free step after the output layer (its output is not the model's)."""

    def forward(self, x):
        return 3.0 * x


@pytest.mark.parametrize("perturbation", ["batch", "dataset"])
def test_trajectory_head_shortcut_refused_when_the_output_is_transformed(
    run, perturbation, monkeypatch
):
    """Only the output layer moves, but the model scales its output: the check refuses
    the shortcut and every step takes its stacked pass at w + eps (the same scores as
    ``vmap``)."""
    from captum_sam.core.layers import sites

    model = copy.deepcopy(run["model"])
    model.add_module("scale", _Scaled())

    def make(**f):
        return SAMTracInCP.from_trajectory(
            model, run["data"], run["traj"], loss_fn=ce_loss(), perturbation=perturbation,
            **HEAD, **f,
        )  # fmt: skip

    stacked, real = [], sites.layer_factors_stacked
    monkeypatch.setattr(sites, "layer_factors_stacked", lambda *a: stacked.append(1) or real(*a))
    fast = make()
    got, ref = fast.self_influence(), make(factorize=False).self_influence()
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    checked = fast.engines.factored._checked
    assert list(checked.values()) == [True, False]  # factored, the shortcut refused
    assert stacked  # the pass at w + eps


def test_coupled_model_falls_back_to_vmap(tmp_path):
    torch.manual_seed(0)
    model = BatchCentred().to(DTYPE)
    x, y = make_data(n=16, seed=4).tensors
    est = one_checkpoint(model, x, y, tmp_path)()
    got = est.self_influence()
    assert list(est.engines.factored._checked.values()) == [False]
    floss, p = loss_of(model, F.attributed_names(model))
    total, _ = F.grad_sum(floss, p, [(x[:8], y[:8]), (x[8:], y[8:])])  # as batched
    mean = {n: v / 16 for n, v in total.items()}
    moved = {n: p[n] + e for n, e in F.sam_perturbation(p, mean, 0.1, False).items()}
    torch.testing.assert_close(got, 0.1 * vmap_dots(floss, p, moved, (x, y)))


TEST_CASES = [
    dict(rho=0.2),
    dict(rho=0.2, adaptive=True, layers=["fc2"]),
    dict(rho=0.2, test_at_perturbed=True),
    dict(rho=0.0),
    dict(rho=0.2, test_loss_fn=lambda out, y: 2.0 * ce_loss()(out, y)),
]


@pytest.mark.parametrize("kw", TEST_CASES)
def test_checkpoint_influence_factored_equals_vmap(run, kw):
    ckpts = [c.path for c in run["traj"].checkpoints]
    x, y = make_data(n=9, seed=5).tensors
    got, ref = both_paths(
        lambda **f: SAMTracInCP(
            run["model"], run["data"], ckpts, loss_fn=ce_loss(), batch_size=8, **kw, **f
        ),
        (x, y),
    )
    assert got.shape == (9, 30)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("perturbation", ["batch", "dataset"])
@pytest.mark.parametrize("test_at_perturbed", [False, True])
@pytest.mark.parametrize("head", [False, True])
def test_trajectory_influence_factored_equals_vmap(
    run, perturbation, test_at_perturbed, head, monkeypatch
):
    """Steps at one checkpoint are scored together, or one by one within a tiny budget.

    The last step of each epoch has 2 examples, the others 7: stacked passes pad it.
    """
    assert sorted({len(s.indices) for s in run["traj"].steps}) == [2, 7]
    from captum_sam.gif import factored_steps

    passes = count_passes(monkeypatch)
    x, y = make_data(n=9, seed=5).tensors

    def make(**f):
        return SAMTracInCP.from_trajectory(
            run["model"],
            run["data"],
            run["traj"],
            loss_fn=ce_loss(),
            perturbation=perturbation,
            test_at_perturbed=test_at_perturbed,
            **(HEAD if head else {}),
            **f,
        )

    ref = make(factorize=False).influence((x, y))
    grouped = make().influence((x, y))
    count = len(passes)
    monkeypatch.setattr(factored_steps, "GROUP_BUDGET_BYTES", 1)  # one step at a time
    single = make().influence((x, y))
    torch.testing.assert_close(grouped, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(single, ref, rtol=1e-10, atol=1e-12)
    if perturbation == "batch" and not test_at_perturbed:  # one pass at w per checkpoint
        assert count < len(passes) - count
    top, want = make().influence((x, y), k=3), make(factorize=False).influence((x, y), k=3)
    assert torch.equal(top.indices, want.indices)


def test_token_model_self_influence_and_influence_are_factored(tmp_path):
    torch.manual_seed(0)
    model = Tokens().to(DTYPE)
    x, y = torch.randn(20, 7, 3, dtype=DTYPE), torch.randint(0, 3, (20,))
    make = one_checkpoint(model, x, y, tmp_path)
    got, ref = both_paths(make)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    fast, slow = make(), make(factorize=False)
    # 7 positions per example: the test side is kept too (formed or as factors, by cost)
    tests = fast.engines.factored.test_factors(fast.engines.terms, [(x[:4], y[:4])], False)
    assert tests is not None
    torch.testing.assert_close(fast.influence((x[:4], y[:4])), slow.influence((x[:4], y[:4])))
    agg = fast.influence((x[:4], y[:4]), aggregate=True)  # formed test row, factored training
    torch.testing.assert_close(agg, slow.influence((x[:4], y[:4]), aggregate=True))


@pytest.mark.parametrize("form", ["checkpoint", "trajectory"])
def test_aggregate_influence_factored_equals_vmap(run, form):
    def make(**f):
        if form == "trajectory":
            return SAMTracInCP.from_trajectory(
                run["model"], run["data"], run["traj"], loss_fn=ce_loss(), **f
            )
        ckpts = [c.path for c in run["traj"].checkpoints]
        return SAMTracInCP(run["model"], run["data"], ckpts, loss_fn=ce_loss(), rho=0.2, **f)

    x, y = make_data(n=9, seed=5).tensors
    got, ref = both_paths(lambda **f: _Aggregated(make(**f)), (x, y))
    assert got.shape == (1, 30)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got, make().influence((x, y)).sum(0, keepdim=True))


class _Aggregated:
    """An estimator whose ``influence`` sums over the test examples."""

    def __init__(self, est):
        self.est = est
        self.engines = est.engines

    def influence(self, test):
        return self.est.influence(test, aggregate=True)


def test_factorize_must_be_a_bool(run):
    with pytest.raises(TypeError, match="factorize"):
        SAMTracInCP(
            run["model"],
            run["data"],
            [c.path for c in run["traj"].checkpoints],
            loss_fn=ce_loss(),
            factorize=1,
        )


def test_merged_pass_progress_budget_fallback_and_no_leftover_hooks(run, monkeypatch):
    from captum_sam.gif import checkpoint_form

    ckpts = [c.path for c in run["traj"].checkpoints]

    def make(**f):
        return SAMTracInCP(run["model"], run["data"], ckpts, loss_fn=ce_loss(), rho=0.2, **f)

    ref = make(factorize=False).self_influence()
    torch.testing.assert_close(make().self_influence(show_progress=True), ref)
    monkeypatch.setattr(checkpoint_form, "MERGE_BUDGET_BYTES", 0)  # factors at w do not fit
    est = make()
    torch.testing.assert_close(est.self_influence(), ref)
    assert all(est.engines.factored._checked.values())  # still factored, in three passes
    assert all(not m._forward_hooks for m in run["model"].modules())
    assert all(not m._forward_hooks for m in est.engines.loader.scratch.modules())
    assert all(
        site.module in set(est.engines.loader.scratch.modules())
        for site in est.engines.factored.sites
    )


def test_merged_self_influence_keeps_what_fits_and_recomputes_the_rest(run, monkeypatch):
    """The checkpoints are taken one at a time; over the budget, the batches that fit
    are kept (two passes) and only the others are recomputed in the second pass,
    unless fewer than MERGE_MIN_KEPT of the examples fit (then none are kept); the
    scores are the same either way."""
    from captum_sam.gif import checkpoint_form

    ckpts = [c.path for c in run["traj"].checkpoints]
    assert len(ckpts) >= 2

    def make(**f):
        return SAMTracInCP(
            run["model"], run["data"], ckpts, loss_fn=ce_loss(), rho=0.2, batch_size=7, **f
        )

    ref = make(factorize=False).self_influence()
    sizes, owns = [], []
    real_nbytes, real_pair = checkpoint_form._nbytes, FactoredGradients.pair_dots

    def nbytes(reps):
        sizes.append(real_nbytes(reps))
        return sizes[-1]

    def pair_dots(self, terms, batch, own=None):
        owns.append((len(terms), own is not None))
        return real_pair(self, terms, batch, own=own)

    monkeypatch.setattr(checkpoint_form, "_nbytes", nbytes)
    monkeypatch.setattr(FactoredGradients, "pair_dots", pair_dots)
    torch.testing.assert_close(make().self_influence(), ref)
    n_batches, k = -(-len(run["data"]) // 7), len(ckpts)
    # one checkpoint at a time, every batch kept with the default budget
    assert owns == [(1, True)] * (n_batches * k)
    per_batch = sizes[:n_batches]  # one checkpoint's factors of each batch, with the batch
    assert len(sizes) == n_batches * k and sum(per_batch) < checkpoint_form.MERGE_BUDGET_BYTES
    for kept, want in ((3, [True] * 3 + [False] * 2), (2, [False] * 5)):
        # 21 of the 30 examples fit: three batches kept; 14 (< MERGE_MIN_KEPT): none
        sizes.clear(), owns.clear()
        monkeypatch.setattr(checkpoint_form, "MERGE_BUDGET_BYTES", sum(per_batch[:kept]))
        torch.testing.assert_close(make().self_influence(), ref)
        assert owns == [(1, w) for w in want] * k
    # as rank 1 of 2 (its share: 2 of the 5 batches, 12 examples) 14 examples are enough
    monkeypatch.setattr(checkpoint_form, "rank_and_world", lambda: (1, 2))
    assert checkpoint_form._local_share(make().train_dataloader, 30) == 12
    sizes.clear(), owns.clear()
    torch.testing.assert_close(make().self_influence(), ref)
    assert owns == [(1, w) for w in [True] * 2 + [False] * 3] * k


def test_kept_rows_of_merged_self_influence_share_one_buffer_per_tensor():
    """Merged self influence keeps each batch's entries (formed, factors, projected
    rows) as views of one store per term (one buffer per tensor), rows in order: the
    same numbers; a batch whose shapes do not fit the buffers is kept as it is."""
    from captum_sam.core.layers.products import Formed
    from captum_sam.gif.checkpoint_form import _RowStore

    g = torch.Generator().manual_seed(0)

    def batch(rows, positions=3):
        formed = Formed(torch.randn(rows, 4, 5, generator=g), None)
        factors = (
            torch.randn(rows, positions, 5, generator=g),
            torch.randn(rows, positions, 2, generator=g),
        )
        return [[formed, factors], torch.randn(rows, 7, generator=g)]

    store = _RowStore(10)
    parts = [batch(4), batch(4), batch(2)]
    kept = [store.put(p, len(p[1])) for p in parts]
    for got, want in zip(kept, parts):
        assert got[0][0].bias is None
        for x, y in zip(
            [got[0][0].weight, *got[0][1], got[1]], [want[0][0].weight, *want[0][1], want[1]]
        ):
            assert torch.equal(x, y) and x is not y
    bases = {t.untyped_storage().data_ptr() for p in kept for t in [p[0][0].weight, p[1]]}
    assert len(bases) == 2  # one buffer for every batch's weights, one for the rows
    assert torch.equal(kept[2][1], store.stores[-1][8:10])
    odd = batch(2, positions=6)  # other positions: not the buffers' shape
    assert store.put(odd, 2) is odd
    full = _RowStore(4)
    full.put(batch(4), 4)
    extra = batch(1)
    assert full.put(extra, 1) is extra  # no room left


def test_model_in_train_mode_with_dropout_is_attributed_in_eval_mode(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Dropout(0.5), nn.Linear(6, 3)).to(DTYPE)
    model.train()
    before = snapshot(model)
    x, y = make_data(n=16, seed=6).tensors
    make = one_checkpoint(model, x, y, tmp_path)
    got, ref = both_paths(make)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(make().self_influence(), got)  # no dropout noise
    assert_unchanged(model, before)


# ------------------------------------------------------------------ factored GGN


def ggn_by_products(floss, params, batch, names):
    """The GGN formed column by column from ``ggn_vp`` (the reference)."""
    like = {n: params[n] for n in names}
    dim = sum(p.numel() for p in like.values())

    def matvec(cols):
        v = F.unflatten(cols.T, like, batch_dims=1)
        return F.flatten(F.ggn_vp(floss, params, [batch], v, batched=True), names, 1).T

    return dense_matrix(matvec, dim, dtype=DTYPE, device="cpu")


class Deep(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(5, 4), nn.Linear(4, 3), nn.Linear(3, 2)

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.tanh(self.a(x)))))


@pytest.mark.parametrize(
    "names",
    [
        None,
        ["a.weight", "b.bias", "c.weight", "c.bias"],
        ["b.bias"],
        ["a.weight"],
        ["c.bias", "a.weight"],  # order of the matrix follows `names`
    ],
)
@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_linear_ggn_equals_the_matrix_of_ggn_products(names, loss):
    torch.manual_seed(0)
    model = Deep().to(DTYPE)
    x = torch.randn(13, 5, dtype=DTYPE)
    if loss == "ce":
        fn, y = ce_loss(), torch.randint(0, 2, (13,))
    else:
        fn, y = (lambda o, t: ((o - t) ** 2).sum(1)), torch.randn(13, 2, dtype=DTYPE)
    names = names or [n for n, _ in model.named_parameters()]
    params, frozen = F.detached_params(model, names)
    params = {n: params[n] for n in names}
    floss = F.FunctionalLoss(model, fn, frozen)
    sites = linear_sites(model, names)
    got = linear_ggn(floss, params, [(x[:7], y[:7]), (x[7:], y[7:])], sites, names)
    want = ggn_by_products(floss, params, (x, y), names)
    assert float(want.abs().max()) > 1e-3
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    v = torch.randn(got.shape[0], 3, dtype=DTYPE)
    pieces = [ggn_pieces(floss, params, b, sites) for b in [(x[:7], y[:7]), (x[7:], y[7:])]]
    torch.testing.assert_close(ggn_product(pieces, sites, params, v), want @ v)
    assert ggn_matches(floss, params, (x, y), sites, names)
    assert not any(m._forward_hooks for m in model.modules())


def test_linear_ggn_refuses_what_it_cannot_factor():
    cases = [(Tokens(), torch.randn(6, 4, 3, dtype=DTYPE)), (BatchCentred(), None)]
    for model, x in cases:
        model = model.to(DTYPE)
        x = torch.randn(6, 5, dtype=DTYPE) if x is None else x
        y = torch.randint(0, 3, (6,))
        names = [n for n, _ in model.named_parameters() if not n.startswith("unused")]
        params, frozen = F.detached_params(model, names)
        floss = F.FunctionalLoss(model, ce_loss(), frozen)
        assert not ggn_matches(floss, params, (x, y), linear_sites(model, names), names)
    wide = nn.Linear(3, MAX_OUTPUTS + 1).to(DTYPE)
    names = ["weight", "bias"]
    params, frozen = F.detached_params(wide, names)
    floss = F.FunctionalLoss(wide, ce_loss(), frozen)
    batch = (torch.randn(4, 3, dtype=DTYPE), torch.randint(0, 3, (4,)))
    with pytest.raises(Unsupported, match="outputs per example"):
        linear_ggn(floss, params, [batch], linear_sites(wide, names), names)


@pytest.mark.parametrize("perturbation", ["batch", "dataset"])
def test_trajectory_with_rho_zero_steps_factored_equals_vmap(tmp_path, perturbation):
    """Recorded steps without SAM (rho = 0) reuse the factors at w as the training side."""
    data = make_data(n=20, seed=8)
    model = mlp_model(hidden=5)
    train_sam(model, data, ce_loss(), epochs=2, lr=0.2, rho=0.0, batch_size=6, record_dir=tmp_path)
    x, y = make_data(n=5, seed=9).tensors

    def make(**f):
        return SAMTracInCP.from_trajectory(
            model, data, tmp_path, loss_fn=ce_loss(), perturbation=perturbation, **f
        )

    fast, slow = make(), make(factorize=False)
    assert all(t.rho == 0 for t in fast.engines.terms)
    torch.testing.assert_close(
        fast.influence((x, y)), slow.influence((x, y)), rtol=1e-10, atol=1e-12
    )
    torch.testing.assert_close(fast.self_influence(), slow.self_influence(), rtol=1e-10, atol=1e-12)
