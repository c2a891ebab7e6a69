"""K-FAC / EK-FAC curvature against independent dense references on tiny float64 models.

The reference builds every per-example quantity with a plain ``torch.autograd`` loop
(layer inputs, convolution patches by explicit slicing, pseudo-gradients from the
square root of the closed-form softmax cross-entropy Hessian ``diag(p) - p p^T``),
forms the factors and ``torch.kron`` densely, and never calls the library's K-FAC code.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as nnf
from torch import nn
from torch.utils.data import TensorDataset

from captum_sam.hif.arnoldi import SAMArnoldiInfluenceFunction
from captum_sam.hif.influence import SAMInfluenceFunction
from tests.helpers import (
    DTYPE,
    assert_unchanged,
    ce_loss,
    make_data,
    mlp_model,
    save_checkpoint,
    snapshot,
)

RHO, DAMPING = 0.5, 0.01


# --------------------------------------------------------------------------- models


def mlp() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).to(DTYPE)


def cnn() -> nn.Module:
    torch.manual_seed(2)
    return nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1, stride=2), nn.Tanh(), nn.Flatten(), nn.Linear(8, 3)
    ).to(DTYPE)


def data(kind: str, n: int) -> tuple[TensorDataset, tuple[torch.Tensor, torch.Tensor]]:
    x, y = make_data(n=n + 3, d=16 if kind == "cnn" else 5, seed=4).tensors
    if kind == "cnn":
        x = x.reshape(-1, 1, 4, 4)
    return TensorDataset(x[:n], y[:n]), (x[n:], y[n:])


@pytest.fixture(scope="module", params=["mlp", "cnn"])
def setup(request, tmp_path_factory):
    model = mlp() if request.param == "mlp" else cnn()
    train, test = data(request.param, 10 if request.param == "mlp" else 8)
    ckpt = save_checkpoint(model, tmp_path_factory.mktemp("kfac") / "w.pt")
    return dict(kind=request.param, model=model, train=train, test=test, ckpt=ckpt)


def make(s, **kw):
    args = dict(
        checkpoint=s["ckpt"], loss_fn=ce_loss(), batch_size=4, rho=RHO, damping=DAMPING,
        curvature="kfac", projection_dim=None, hessian_reg=0.0, hessian_inverse_tol=None,
    )  # fmt: skip
    args.update(kw)
    return SAMInfluenceFunction(s["model"], s["train"], **args)


# --------------------------------------------------------------------------- reference


def layers(model):
    return [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def rows(module, x_in, grad_out):
    """Inputs ``(T, width)`` (with the bias 1) and output gradients ``(T, d_out)`` per position."""
    if isinstance(module, nn.Linear):
        a, d = x_in.reshape(1, -1), grad_out.reshape(1, -1)
    else:
        (kh, kw), (sh, sw), (ph, pw) = module.kernel_size, module.stride, module.padding
        xp = nnf.pad(x_in, (pw, pw, ph, ph))[0]
        a, d = [], []
        for r in range(grad_out.shape[2]):
            for c in range(grad_out.shape[3]):
                a.append(xp[:, r * sh : r * sh + kh, c * sw : c * sw + kw].reshape(-1))
                d.append(grad_out[0, :, r, c])
        a, d = torch.stack(a), torch.stack(d)
    return torch.cat([a, a.new_ones(len(a), 1)], dim=1), d


def per_example(model, x, y):
    """Per layer: rows of A ``[(T, width)]``, pseudo-gradients ``[(C, T, d_out)]`` and
    ``G_ic (C, d_out, width)`` per example; checks ``G_ic`` against ``autograd``."""
    mods = layers(model)
    out = {id(m): {"a": [], "d": [], "g": []} for m in mods}
    for i in range(len(x)):
        seen = {}
        hooks = [
            m.register_forward_hook(lambda m, a, o, seen=seen: seen.__setitem__(id(m), (a[0], o)))
            for m in mods
        ]
        logits = model(x[i : i + 1])
        for h in hooks:
            h.remove()
        p = logits[0].softmax(0).detach()
        values, vectors = torch.linalg.eigh(torch.diag(p) - torch.outer(p, p))
        roots = vectors * values.clamp_min(0).sqrt()  # (C, C), column c is q_c
        per_c = {id(m): ([], []) for m in mods}
        for c in range(roots.shape[1]):
            targets = [seen[id(m)][1] for m in mods]
            params = [t for m in mods for t in (m.weight, m.bias)]
            grads = torch.autograd.grad(
                (logits[0] * roots[:, c]).sum(), targets + params, retain_graph=True
            )
            for k, m in enumerate(mods):
                a, d = rows(m, seen[id(m)][0].detach(), grads[k])
                g = d.T @ a
                wg, bg = grads[len(mods) + 2 * k], grads[len(mods) + 2 * k + 1]
                true = torch.cat([wg.reshape(len(bg), -1), bg.unsqueeze(1)], dim=1)
                torch.testing.assert_close(g, true, rtol=1e-12, atol=1e-13)
                per_c[id(m)][0].append(d)
                per_c[id(m)][1].append(g)
                if c == 0:
                    out[id(m)]["a"].append(a)
        for m in mods:
            out[id(m)]["d"].append(torch.stack(per_c[id(m)][0]))
            out[id(m)]["g"].append(torch.stack(per_c[id(m)][1]))
    return [out[id(m)] for m in mods]


def to_param_order(model, blocks):
    """Block-diagonal ``(P, P)`` in ``named_parameters`` order from per-layer
    ``(d_out width, d_out width)`` blocks in row-major ``[W | b]`` order."""
    mods = layers(model)
    sizes = [p.numel() for p in model.parameters()]
    out = torch.zeros(sum(sizes), sum(sizes), dtype=DTYPE)
    offset = 0
    for m, block in zip(mods, blocks):
        d_out, d_in = m.weight.shape[0], m.weight[0].numel()
        idx = []
        for o in range(d_out):
            idx += [offset + o * d_in + k for k in range(d_in)]
            idx.append(offset + d_out * d_in + o)
        idx = torch.tensor(idx)
        out[idx[:, None], idx[None, :]] = block
        offset += m.weight.numel() + m.bias.numel()
    return out


def reference(model, x, y, kind):
    """Dense K-FAC or EK-FAC of the summed loss ``(P, P)``, and its per-layer blocks."""
    blocks = []
    for layer in per_example(model, x, y):
        a = torch.cat(layer["a"])  # (sum_i T_i, width)
        d = torch.cat([dc.reshape(-1, dc.shape[-1]) for dc in layer["d"]])
        big_a, big_s = a.T @ a, d.T @ d
        if kind == "kfac":
            blocks.append(torch.kron(big_s, big_a) / len(a))
        else:
            _, qs = torch.linalg.eigh(big_s)
            _, qa = torch.linalg.eigh(big_a)
            q = torch.kron(qs, qa)
            vecs = torch.cat([g.reshape(g.shape[0], -1) for g in layer["g"]])  # (n C, P_l)
            lam = (vecs @ q).square().sum(0)
            blocks.append(q @ torch.diag(lam) @ q.T)
    return to_param_order(model, blocks), blocks


def perturbed_copy(model, x, y, rho=RHO):
    """The model at ``w* + eps*``, eps from the mean training gradient (all parameters)."""
    import copy

    moved = copy.deepcopy(model)
    params = list(moved.parameters())
    grads = torch.autograd.grad(nnf.cross_entropy(moved(x), y), params)
    norm = torch.sqrt(sum(g.square().sum() for g in grads))
    with torch.no_grad():
        for p, g in zip(params, grads):
            p.add_(rho * g / (norm + 1e-12))
    return moved, torch.cat([g.reshape(-1) for g in grads])


def grads(model, x, y):
    """Per-example loss gradients ``(P, n)``."""
    cols = []
    for i in range(len(x)):
        g = torch.autograd.grad(
            nnf.cross_entropy(model(x[i : i + 1]), y[i : i + 1]), list(model.parameters())
        )
        cols.append(torch.cat([t.reshape(-1) for t in g]))
    return torch.stack(cols, dim=1)


def close(a, b, tol=1e-10):
    scale = float(b.abs().max())
    assert float((a - b).abs().max()) <= tol * scale, float((a - b).abs().max()) / scale


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("blocked", [False, True], ids=["one-product", "lower-blocks"])
@pytest.mark.parametrize("curvature", ["kfac", "ekfac"])
def test_factors_product_inverse_and_scores_match_dense_reference(
    setup, curvature, blocked, monkeypatch
):
    """fast: K at w*+eps* (not at w*), its dense product and inverse, and the scores;
    the same when every input covariance is summed in lower-triangular row blocks."""
    from captum_sam.hif import kfac

    if blocked:
        monkeypatch.setattr(kfac, "_GRAM_MIN_WIDTH", 1)
        monkeypatch.setattr(kfac, "_GRAM_BLOCKS", 3)
    est = make(setup, curvature=curvature)
    x, y = setup["train"].tensors
    moved, _ = perturbed_copy(setup["model"], x, y)
    k_e, _ = reference(moved, x, y, curvature)
    k_0, _ = reference(setup["model"], x, y, curvature)
    fitted = est.operator.kronecker["perturbed"].matrix()
    close(fitted, k_e)
    assert float((k_e - k_0).abs().max()) > 1e-4 * float(k_e.abs().max())  # the point matters
    n, p = len(x), k_e.shape[0]
    a = k_e + n * DAMPING * torch.eye(p, dtype=DTYPE)
    close(est.matrix(), a)
    close(est.inverse.inverse.solve(torch.eye(p, dtype=DTYPE)), torch.linalg.inv(a))
    assert est.method == "kronecker"
    xt, yt = setup["test"]
    expected = grads(setup["model"], xt, yt).T @ torch.linalg.solve(a, grads(moved, x, y))
    close(est.influence((xt, yt)), expected)


@pytest.mark.parametrize("curvature", ["kfac", "ekfac"])
def test_projection_keeps_the_top_eigendirections_of_the_kronecker_matrix(setup, curvature):
    """``projection_dim=k``: Captum's top-k eigen-directions of A = K + n d, taken from the
    Kronecker eigenbasis, equal the top-k eigenpairs of the dense reference matrix."""
    k = 5
    est = make(setup, curvature=curvature, projection_dim=k)
    x, y = setup["train"].tensors
    moved, _ = perturbed_copy(setup["model"], x, y)
    k_e, _ = reference(moved, x, y, curvature)
    a = k_e + len(x) * DAMPING * torch.eye(k_e.shape[0], dtype=DTYPE)
    values, vectors = torch.linalg.eigh(a)
    top = vectors[:, -k:] @ torch.diag(1 / values[-k:]) @ vectors[:, -k:].T
    xt, yt = setup["test"]
    expected = grads(setup["model"], xt, yt).T @ top @ grads(moved, x, y)
    close(est.influence((xt, yt)), expected, 1e-8)


@pytest.mark.parametrize("curvature", ["kfac", "ekfac"])
def test_plain_fits_at_w_star_and_rho_zero_makes_fast_plain(setup, curvature):
    est = make(setup, curvature=curvature, variant="plain")
    x, y = setup["train"].tensors
    k_0, _ = reference(setup["model"], x, y, curvature)
    assert list(est.operator.kronecker) == ["params"]
    close(est.operator.kronecker["params"].matrix(), k_0)
    xt, yt = setup["test"]
    plain = est.influence((xt, yt))
    fast = make(setup, curvature=curvature, rho=0.0).influence((xt, yt))
    close(fast, plain, 1e-12)


def test_ekfac_diagonal_and_one_example_equals_ggn(setup):
    """EK-FAC's eigenvalues are the sorted dense mean of (Q^T vec G)^2; with one example the
    Linear blocks equal the exact GGN blocks (one position per layer)."""
    est = make(setup, curvature="ekfac", variant="plain")
    x, y = setup["train"].tensors
    _, blocks = reference(setup["model"], x, y, "ekfac")
    fitted = est.operator.kronecker["params"]
    for block, values in zip(blocks, fitted.values):
        close(torch.sort(values.flatten()).values, torch.linalg.eigvalsh(block))
    if setup["kind"] != "mlp":
        return
    one = TensorDataset(x[:1], y[:1])
    est1 = make(setup, curvature="ekfac", variant="plain", hessian_dataset=one)
    ggn = torch.zeros_like(est1.operator.kronecker["params"].matrix())
    # exact GGN of the one example: sum_c g_c g_c^T with g_c the pseudo-gradient, all params
    model = setup["model"]
    logits = model(x[:1])
    p = logits[0].softmax(0).detach()
    values, vectors = torch.linalg.eigh(torch.diag(p) - torch.outer(p, p))
    for c in range(3):
        q = vectors[:, c] * values[c].clamp_min(0).sqrt()
        g = torch.autograd.grad((logits[0] * q).sum(), list(model.parameters()), retain_graph=True)
        v = torch.cat([t.reshape(-1) for t in g])
        ggn += torch.outer(v, v)
    mask = torch.zeros_like(ggn, dtype=torch.bool)  # block-diagonal by layer
    mask[:24, :24] = mask[24:, 24:] = True
    close(est1.operator.kronecker["params"].matrix(), ggn * mask)


@pytest.mark.parametrize("variant", ["full", "exact"])
def test_full_and_exact_gmres_equal_dense_solve(setup, variant):
    est = make(setup, variant=variant, solver="gmres", solver_options={"tol": 1e-13})
    x, y = setup["train"].tensors
    n = len(x)
    moved, g0 = perturbed_copy(setup["model"], x, y)
    k_e, _ = reference(moved, x, y, "kfac")
    k_0, _ = reference(setup["model"], x, y, "kfac")
    eye = torch.eye(k_e.shape[0], dtype=DTYPE)
    u = g0 / g0.norm()
    jac = RHO / (n * (g0.norm() + 1e-12)) * (eye - torch.outer(u, u)) @ k_0  # H_0 -> K_0
    a = k_e @ (eye + jac) + n * DAMPING * eye
    columns = torch.cat([est.operator.matvec(eye[:, j : j + 1]) for j in range(len(eye))], 1)
    close(columns, a)
    rhs = grads(moved, x, y)
    if variant == "exact":
        rhs = rhs + k_e @ (RHO / (n * g0.norm()) * (eye - torch.outer(u, u))) @ grads(
            setup["model"], x, y
        )
    xt, yt = setup["test"]
    expected = grads(setup["model"], xt, yt).T @ torch.linalg.solve(a, rhs)
    close(est.influence((xt, yt)), expected, 1e-9)
    assert float(est.last_residual.max()) < 1e-11


def test_damping_none_is_a_tenth_of_each_layers_mean_eigenvalue(setup):
    est = make(setup, curvature="ekfac", damping=None)
    x, y = setup["train"].tensors
    moved, _ = perturbed_copy(setup["model"], x, y)
    _, blocks = reference(moved, x, y, "ekfac")
    n = len(x)
    names = [name for name, m in setup["model"].named_modules() if m in layers(setup["model"])]
    expected = {name: 0.1 * float(torch.trace(b)) / len(b) / n for name, b in zip(names, blocks)}
    assert est.damping is None and est.damping_used.keys() == expected.keys()
    for name in names:
        assert est.damping_used[name] == pytest.approx(expected[name], rel=1e-10)
    shifted = [
        b + n * expected[nm] * torch.eye(len(b), dtype=DTYPE) for nm, b in zip(names, blocks)
    ]
    close(est.matrix(), to_param_order(setup["model"], shifted))
    ggn = make(setup, curvature="ggn", damping=None, solver="dense")
    assert ggn.damping == 0.0 and ggn.damping_used == 0.0
    torch.testing.assert_close(
        ggn.matrix(),
        make(setup, curvature="ggn", damping=0.0, solver="dense").matrix(),
        rtol=0,
        atol=0,
    )


def test_factors_dir_reloads_identically_and_refuses_tampering(setup, tmp_path, monkeypatch):
    xt, yt = setup["test"]
    first = make(setup, variant="full", factors_dir=tmp_path).influence((xt, yt))
    names = sorted(os.listdir(tmp_path))
    assert names[0].startswith("kfac-params-") and "kfac-perturbed.json" in names
    from captum_sam.hif import kfac_solve

    def refuse(*args, **kw):
        raise AssertionError("refitted although cached")

    monkeypatch.setattr(kfac_solve, "fit_kronecker", refuse)
    again = make(setup, variant="full", factors_dir=tmp_path).influence((xt, yt))
    assert torch.equal(first, again)
    with pytest.raises(ValueError, match="stale K-FAC factors.*rho"):
        make(setup, variant="full", rho=0.2, factors_dir=tmp_path)
    import copy

    rewired = copy.deepcopy(setup["model"])  # the same layers and weights, another activation
    rewired[1] = nn.ReLU()  # was Tanh (both set-ups)
    with pytest.raises(ValueError, match="stale K-FAC factors.*model"):
        make(dict(setup, model=rewired), variant="full", factors_dir=tmp_path)
    manifest = tmp_path / "kfac-perturbed.json"
    data = tmp_path / json.loads(manifest.read_text())["file"]
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 1
    data.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=f"{data.name}.*SHA-256"):
        make(setup, factors_dir=tmp_path)
    content = json.loads(manifest.read_text())
    content["dtype"] = "int"
    manifest.write_text(json.dumps(content))
    with pytest.raises(ValueError, match="kfac-perturbed.json.*field dtype"):
        make(setup, factors_dir=tmp_path)


@pytest.mark.parametrize("curvature", ["kfac", "ekfac"])
def test_thin_input_basis_equals_the_full_eigendecomposition(
    setup, curvature, monkeypatch, tmp_path
):
    """Curvature data with fewer rows than a layer's input width: the thin Q_A from the
    rows gives the same K, inverse, damping heuristic, scores and Captum-style eigen
    inverse (complement eigenvectors included) as eigendecomposing A; its cache reloads
    identically; rows beyond the limit fall back to summing A from the kept rows."""
    from captum_sam.hif import kfac, kfac_solve

    xt, yt = setup["test"]
    x, y = setup["train"].tensors
    few = TensorDataset(x[:3], y[:3])  # 3 rows per linear input, 12 per convolution's
    p = sum(t.numel() for t in setup["model"].parameters())

    def run(**kw):
        est = make(setup, curvature=curvature, hessian_dataset=few, **kw)
        return est, est.influence((xt, yt)), est.operator.kronecker["perturbed"]

    full, full_scores, k_full = run()
    _, full_eig_scores, _ = run(projection_dim=p, damping=None)
    assert all(q.shape[0] == q.shape[1] for q in k_full.qa)
    monkeypatch.setattr(kfac, "_THIN_MIN_WIDTH", 1)
    monkeypatch.setattr(kfac, "_THIN_ROWS", 1.0)
    thin, thin_scores, k_thin = run()
    # every linear layer thin (3 of 6, 5, 9 columns), the convolution not (12 rows of 10)
    expected = [s.width if isinstance(s.module, nn.Conv2d) else 3 for s in k_thin.sites]
    assert [q.shape[1] for q in k_thin.qa] == expected
    assert any(k < s.width for k, s in zip(expected, k_thin.sites))
    assert all(f.a is None for f in k_thin.factors)
    for q in k_thin.qa:  # orthonormal columns
        close(q.T @ q, torch.eye(q.shape[1], dtype=DTYPE))
    close(k_thin.matrix(), k_full.matrix())
    close(thin.matrix(), full.matrix())
    eye = torch.eye(p, dtype=DTYPE)
    close(thin.inverse.inverse.solve(eye), full.inverse.inverse.solve(eye))
    close(thin_scores, full_scores)
    close(k_thin.mean_eigenvalues(), k_full.mean_eigenvalues())
    eig, eig_scores, _ = run(projection_dim=p, damping=None)
    assert eig.damping_used == pytest.approx(
        make(setup, curvature=curvature, hessian_dataset=few, damping=None).damping_used
    )
    close(eig_scores, full_eig_scores, 1e-8)
    cached = make(setup, curvature=curvature, hessian_dataset=few, factors_dir=tmp_path)
    stored = torch.load(next(tmp_path.glob(f"{curvature}-perturbed-*.pt")))
    assert "a" not in stored and [q.shape[1] for q in stored["qa"]] == expected

    def refuse(*args, **kw):
        raise AssertionError("refitted although cached")

    monkeypatch.setattr(kfac_solve, "fit_kronecker", refuse)
    again = make(setup, curvature=curvature, hessian_dataset=few, factors_dir=tmp_path)
    assert torch.equal(again.influence((xt, yt)), cached.influence((xt, yt)))
    monkeypatch.undo()
    # the whole training set: 2 batches of 4 rows; a limit of 4 (cnn linear) keeps the
    # first batch's rows, then sums A from them and goes on summing
    monkeypatch.setattr(kfac, "_THIN_MIN_WIDTH", 1)
    monkeypatch.setattr(kfac, "_THIN_ROWS", 0.5)
    summed = make(setup, curvature=curvature)
    monkeypatch.undo()
    assert all(q.shape[0] == q.shape[1] for q in summed.operator.kronecker["perturbed"].qa)
    close(summed.matrix(), make(setup, curvature=curvature).matrix())


def test_thin_eigenpairs_of_rank_deficient_and_empty_rows():
    from captum_sam.hif.kfac import _thin_eigenpairs

    torch.manual_seed(0)
    base = torch.randn(3, 20, dtype=DTYPE)
    x = torch.cat([base, base[:1], 2 * base[1:2]])  # 5 rows of rank 3
    pieces = [x[:2], x[2:]]
    alpha, q = _thin_eigenpairs(pieces)
    assert pieces == []  # handed over
    assert q.shape == (20, 5)
    close(q.T @ q, torch.eye(5, dtype=DTYPE))
    close(q @ torch.diag(alpha) @ q.T, x.T @ x)
    assert int((alpha > 1e-8 * alpha.max()).sum()) == 3
    alpha, q = _thin_eigenpairs([x.new_zeros(0, 20)])
    assert alpha.shape == (0,) and q.shape == (20, 0)


@pytest.mark.parametrize("curvature", ["kfac", "ekfac"])
def test_sampled_pseudo_gradients_are_unbiased_and_seeded(setup, curvature):
    """``kfac_samples=k``: random-sign combinations of the output-Hessian roots. The input
    factor is untouched, the output-gradient factor converges to the exact one as k
    grows, and the same seed gives the same fit."""
    exact = make(setup, curvature=curvature).operator.kronecker["perturbed"]

    def fitted(k, seed=42):
        return make(setup, curvature=curvature, kfac_samples=k, seed=seed).operator.kronecker[
            "perturbed"
        ]

    def error(fit):
        num = sum(float((f.s - e.s).square().sum()) for f, e in zip(fit.factors, exact.factors))
        return (num / sum(float(e.s.square().sum()) for e in exact.factors)) ** 0.5

    few, many = fitted(1), fitted(2000)
    assert all(f.a is None for f in many.factors)  # released after the fit (memory)
    for f, e in zip(many.qa, exact.qa):  # layer inputs do not depend on the pseudo-gradients
        assert torch.equal(f, e)
    assert error(many) < 0.1 < error(few)
    assert error(many) < error(fitted(50)) < error(few)
    again = fitted(1)
    assert all(torch.equal(f.s, g.s) for f, g in zip(few.factors, again.factors))
    other = fitted(1, seed=7)
    assert not all(torch.equal(f.s, g.s) for f, g in zip(few.factors, other.factors))
    if curvature == "ekfac":
        exact_values = torch.cat([v.flatten() for v in exact.values])
        many_values = torch.cat([v.flatten() for v in many.values])
        assert float((many_values - exact_values).norm() / exact_values.norm()) < 0.2
    with pytest.raises(ValueError, match="kfac_samples"):
        make(setup, curvature=curvature, kfac_samples=0)
    with pytest.raises(ValueError, match="kfac_samples"):
        make(setup, curvature="ggn", kfac_samples=2)


def test_factors_dir_keys_the_number_of_samples(setup, tmp_path):
    make(setup, kfac_samples=3, factors_dir=tmp_path)
    with pytest.raises(ValueError, match="stale K-FAC factors.*samples"):
        make(setup, kfac_samples=4, factors_dir=tmp_path)
    with pytest.raises(ValueError, match="stale K-FAC factors.*seed"):
        make(setup, kfac_samples=3, seed=1, factors_dir=tmp_path)


def test_unsupported_parameters_arnoldi_and_bad_arguments(setup, tmp_path):
    from tests.helpers import bn_model

    x, y = make_data(n=12, seed=1).tensors
    model = bn_model()
    ckpt = save_checkpoint(model, tmp_path / "bn.pt")
    kw = dict(checkpoint=ckpt, loss_fn=ce_loss(), batch_size=4, curvature="kfac",
              projection_dim=None, hessian_inverse_tol=None)  # fmt: skip
    with pytest.raises(ValueError, match=r"'bn.weight'.*BatchNorm1d.*layers="):
        SAMInfluenceFunction(model, TensorDataset(x, y), **kw)
    est = SAMInfluenceFunction(model, TensorDataset(x, y), layers=["fc1", "fc2"], **kw)
    assert [s.name for s in est.operator.kronecker["perturbed"].sites] == ["fc1", "fc2"]
    with pytest.raises(ValueError, match="no Arnoldi iteration needed"):
        SAMArnoldiInfluenceFunction(setup["model"], setup["train"], checkpoint=setup["ckpt"],
                                    loss_fn=ce_loss(), curvature="kfac")  # fmt: skip
    with pytest.raises(ValueError, match="`damping`"):
        make(setup, damping=-1.0)
    with pytest.raises(ValueError, match="`damping`"):
        make(setup, damping="x")
    with pytest.raises(TypeError, match="`factors_dir`"):
        make(setup, factors_dir=3)
    with pytest.raises(ValueError, match="`curvature`"):
        make(setup, curvature="kfc")
    with pytest.raises(ValueError, match="solver='lissa'"):
        make(setup, solver="lissa").influence(setup["test"])


def test_user_model_unchanged(setup):
    model = setup["model"]
    mode = model.training
    model.train()
    model[0].bias.requires_grad_(False)  # not attributed: a weight-only site
    before = snapshot(model)
    try:
        est = make(setup, variant="exact", curvature="ekfac", solver="bicgstab")
        assert [s.bias for s in est.operator.kronecker["perturbed"].sites][0] is None
        est.influence(setup["test"])
        est.self_influence(setup["train"])
        assert_unchanged(model, before)
    finally:
        model[0].bias.requires_grad_(True)
        model.train(mode)


def test_compare_cli_accepts_kfac_and_builds_a_kfac_estimator(setup):
    from types import SimpleNamespace

    from captum_sam.cli import _compare_config, build_parser
    from captum_sam.evaluation.setup import build_estimator

    parser = build_parser()
    args = parser.parse_args(["compare", "--curvature", "ekfac", "--out", "unused"])
    config = _compare_config(args)
    assert ("sam-hif", "sam-hif", "ekfac") in config.rows()
    with pytest.raises(SystemExit):
        parser.parse_args(["compare", "--curvature", "kfc", "--out", "unused"])
    if setup["kind"] != "mlp":
        return
    ctx = SimpleNamespace(
        config=config, data=SimpleNamespace(train=setup["train"]), base=setup["model"],
        base_ckpt=setup["ckpt"], loss=ce_loss(),
    )  # fmt: skip
    est = build_estimator(ctx, "sam-hif-fast", "ekfac")
    assert est.curvature == "ekfac" and list(est.operator.kronecker) == ["perturbed"]


@pytest.mark.parametrize(
    "positions,d_in,d_out,count",
    [(50, 3, 3, 1), (40, 4, 2, 3), (2, 30, 3, 2), (1, 6, 4, 2)],
    ids=["form-first", "form-first-C3", "rotate-first", "one-position"],
)
def test_ekfac_eigenvalue_correction_both_orders_equal_the_definition(
    positions, d_in, d_out, count
):
    """The corrected eigenvalues sum ``((Q_S^T G_ic Q_A)_jk)^2`` over examples and
    pseudo-gradients, with ``G_ic = sum_t d_cit [a_it, 1]^T``: forming G first (many
    positions, narrow inputs) or rotating the factors first give the definition."""
    from captum_sam.hif.kfac import _accumulate_diagonal
    from captum_sam.hif.kron_sites import KroneckerSite

    g = torch.Generator().manual_seed(3)
    layer = nn.Linear(d_in, d_out).to(DTYPE)
    site = KroneckerSite("layer", layer, "layer.weight", "layer.bias")
    a = torch.randn(5, positions, d_in, generator=g, dtype=DTYPE)
    d = torch.randn(count, 5, positions, d_out, generator=g, dtype=DTYPE)

    def orthogonal(k):
        m = torch.randn(k, k, generator=g, dtype=DTYPE)
        return torch.linalg.eigh(m @ m.T)[1]

    qs, qa = orthogonal(d_out), orthogonal(d_in + 1)
    want = torch.zeros(d_out, d_in + 1, dtype=DTYPE)
    for i in range(5):
        cols = torch.cat([a[i], torch.ones(positions, 1, dtype=DTYPE)], 1)
        for c in range(count):
            want += (qs.T @ (d[c, i].T @ cols) @ qa).square()
    total = torch.zeros_like(want)
    _accumulate_diagonal(total, qs, qa, site, a, d)
    torch.testing.assert_close(total, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("width, blocks", [(7, 3), (9, 4), (5, 8), (2000, 4)])
def test_lower_gram_blocks_equal_the_full_product(monkeypatch, width, blocks):
    """The input covariance summed on and below the diagonal in row blocks, then
    mirrored, is ``x^T x`` (two batches accumulated; 2000 wide takes the blocks by
    default)."""
    from captum_sam.hif import kfac

    if width < kfac._GRAM_MIN_WIDTH:
        monkeypatch.setattr(kfac, "_GRAM_MIN_WIDTH", 1)
    monkeypatch.setattr(kfac, "_GRAM_BLOCKS", blocks)
    g = torch.Generator().manual_seed(1)
    x1, x2 = (torch.randn(6, width, generator=g, dtype=DTYPE) for _ in range(2))
    total = torch.zeros(width, width, dtype=DTYPE)
    kfac._add_lower_gram(total, x1)
    kfac._add_lower_gram(total, x2)
    torch.testing.assert_close(
        kfac._symmetrized(total), x1.T @ x1 + x2.T @ x2, rtol=1e-12, atol=1e-12
    )


def test_kronecker_products_in_column_chunks_equal_one_pass(setup, monkeypatch):
    """Wide column blocks are solved a few columns at a time: the same result, and the
    dense ``(K + r I)^{-1}``."""
    from captum_sam.hif import kfac

    curvature = make(setup, curvature="ekfac").operator.kronecker["perturbed"]
    cols = torch.randn(curvature.dim, 7, generator=torch.Generator().manual_seed(0), dtype=DTYPE)
    shift = torch.full((len(curvature.sites),), 0.3, dtype=DTYPE)
    eye = torch.eye(curvature.dim, dtype=DTYPE)
    dense = torch.linalg.solve(curvature.matrix() + 0.3 * eye, cols)
    want, want_k = curvature.solve(cols, shift), curvature.product(cols)
    close(want, dense, 1e-10)
    monkeypatch.setattr(kfac, "_APPLY_ELEMENTS", 2 * curvature.dim)  # chunks of 2 columns
    close(curvature.solve(cols, shift), want, 1e-13)
    close(curvature.product(cols), want_k, 1e-13)


def test_fit_hands_its_freed_memory_back_once_per_point(setup, monkeypatch):
    """After each fitted point (fast: w*+eps*; full: both points) the fit's freed
    transients are handed back to the OS (glibc ``malloc_trim``; a no-op elsewhere)."""
    import platform

    from captum_sam.core import memory
    from captum_sam.hif import kfac_solve

    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert memory._trim() is not None
    assert isinstance(memory.release_freed_memory(), bool)
    calls = []
    monkeypatch.setattr(kfac_solve, "release_freed_memory", lambda: calls.append(1) or True)
    make(setup, curvature="ekfac")
    assert len(calls) == 1
    make(setup, curvature="kfac", variant="full")
    assert len(calls) == 3


def test_factors_dir_and_seed_are_checked(tmp_path):
    """Arguments that would be ignored silently are refused, naming themselves."""
    data = make_data(n=12)
    model = mlp_model()
    path = save_checkpoint(model, tmp_path / "c.pt")
    with pytest.raises(ValueError, match="`factors_dir` caches K-FAC factors"):
        SAMInfluenceFunction(model, data, path, loss_fn=ce_loss(), curvature="ggn",
                             factors_dir=str(tmp_path / "f"))  # fmt: skip
    with pytest.raises(TypeError, match="`seed` must be an int"):
        SAMInfluenceFunction(model, data, path, loss_fn=ce_loss(), seed="a")
    for seed in (3.0, torch.tensor(3)):  # what int() takes, as Captum's manual_seed
        assert SAMInfluenceFunction(model, data, path, loss_fn=ce_loss(), seed=seed).seed == 3
