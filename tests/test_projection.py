import pytest
import torch
from torch.utils.data import TensorDataset

from captum_sam import checkpoints_load_func, load_trajectory, train_sam
from captum_sam.core.layers.sites import layer_sites
from captum_sam.core.projection import LayerProjection, RandomProjection
from captum_sam.gif.tracincp import SAMTracInCP
from captum_sam.hif.influence import SAMInfluenceFunction
from tests.helpers import DTYPE, ce_loss, make_data, mlp_model

SIZES = {"a.weight": 30, "a.bias": 7, "b.weight": 13}


@pytest.mark.parametrize("kind", ["gaussian", "rademacher"])
def test_projection_is_a_fixed_seeded_linear_map(kind):
    proj = RandomProjection(SIZES, 16, kind, seed=3, block=8)  # blocks cross parameters
    R = proj.matrix()
    assert R.shape == (16, 50)
    x = torch.randn(5, 50, dtype=DTYPE)
    torch.testing.assert_close(proj(x), x @ R.T)
    tree = dict(zip(SIZES, x.split(list(SIZES.values()), dim=1)))
    torch.testing.assert_close(proj(tree), x @ R.T)
    again = RandomProjection(SIZES, 16, kind, seed=3, block=50).matrix()
    if kind == "rademacher":
        assert torch.allclose(R.abs(), torch.full_like(R, 16**-0.5))
    assert not torch.equal(R, RandomProjection(SIZES, 16, kind, seed=4).matrix())
    assert torch.equal(RandomProjection(SIZES, 16, kind, seed=3, block=8).matrix(), R)
    assert again.shape == R.shape


def test_projection_preserves_inner_products_in_expectation():
    proj = RandomProjection({"w": 40}, 20000, "gaussian", seed=0)
    R = proj.matrix()
    torch.testing.assert_close(R.T @ R, torch.eye(40, dtype=DTYPE), atol=0.05, rtol=0)
    with pytest.raises(ValueError, match="projection_dim"):
        RandomProjection({"w": 4}, 0)
    with pytest.raises(ValueError, match="projection"):
        RandomProjection({"w": 4}, 2, "sparse")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    data = make_data(n=26, seed=2)
    x, y = data.tensors
    train = TensorDataset(x[:20], y[:20])
    model = mlp_model()
    out = tmp_path_factory.mktemp("proj") / "r"
    train_sam(model, train, ce_loss(), epochs=2, lr=0.3, rho=0.1, batch_size=5, record_dir=out)
    return dict(model=model, train=train, test=(x[20:], y[20:]), dir=out)


def project_blocks(q, proj, width):
    """Project every width-sized block of the rows of q with the same R."""
    return torch.cat([proj(b) for b in q.split(width, dim=1)], dim=1)


def test_sketch_arguments_are_named_and_dense_is_refused_before_forming_a(run, monkeypatch):
    from captum_sam.hif import influence as hif_influence

    def hif(**kw):
        return SAMInfluenceFunction(run["model"], run["train"], run["dir"], loss_fn=ce_loss(),
                                    rho=0.1, **kw)  # fmt: skip

    with pytest.raises(ValueError, match="`sketch_dim` must be a positive int, got 0"):
        hif(sketch_dim=0, projection_dim=None)
    with pytest.raises(ValueError, match="`sketch` must be one of"):
        hif(sketch_dim=4, sketch="sparse", projection_dim=None)
    formed = []
    monkeypatch.setattr(hif_influence.SAMInfluenceFunction, "_form",
                        lambda *a, **k: formed.append(1))  # fmt: skip
    with pytest.raises(ValueError, match="chosen by solver='auto'.*solver='cg'"):
        hif(sketch_dim=4)  # Captum's default projection_dim=50: 'auto' picks 'dense'
    with pytest.raises(ValueError, match="solver='dense' with.*pass solver='gmres'"):
        hif(sketch_dim=4, solver="dense", variant="full", projection_dim=None,
            hessian_inverse_tol=1e-5)  # fmt: skip
    assert formed == []  # refused before A was formed


@pytest.mark.parametrize("form", ["checkpoint", "trajectory", "hif-exact"])
def test_projected_scores_equal_projected_quantities(run, form):
    P = sum(p.numel() for p in run["model"].parameters())
    kw = dict(projection_dim=8, projection_seed=1)
    if form == "hif-exact":  # the Hessian family calls its random projection a sketch
        kw = dict(sketch_dim=8, sketch_seed=1)
    ckpts = [c.path for c in load_trajectory(run["dir"]).checkpoints]

    def make(**k):
        if form == "checkpoint":  # weights eta/|B| (batches of 5), as edits need
            return SAMTracInCP(
                run["model"], run["train"], ckpts, loss_fn=ce_loss(), batch_size=4, rho=0.1,
                checkpoints_load_func=lambda m, path: checkpoints_load_func(m, path) / 5, **k,
            )  # fmt: skip
        if form == "trajectory":
            return SAMTracInCP.from_trajectory(
                run["model"], run["train"], run["dir"], loss_fn=ce_loss(), **k
            )
        return SAMInfluenceFunction(
            run["model"],
            run["train"],
            run["dir"],
            loss_fn=ce_loss(),
            rho=0.1,
            weight_decay=1e-2,
            variant="exact",
            projection_dim=None,  # the exact inverse: no rank cap,
            hessian_reg=0.0,  # no added regulariser,
            hessian_inverse_tol=None,  # no eigenvalue dropped
            **k,
        )

    full, projected = make(), make(**kw)
    sizes = {n: p.numel() for n, p in run["model"].named_parameters()}
    if form == "hif-exact":
        proj = RandomProjection(sizes, 8, seed=1)
    else:  # SAM-GIF projects nn.Linear / nn.Conv2d gradients per layer (Kronecker)
        found = layer_sites(run["model"], list(sizes))
        layers = [(s.weight, s.bias, s.d_out, s.d_in) for s in found]
        proj = LayerProjection(sizes, layers, 8, seed=1)
        assert projected.engines.factored.projector is not None  # projected from factors
        slow = make(factorize=False, **kw)  # formed gradients, then projected: same numbers
        torch.testing.assert_close(
            slow.influence(run["test"]), projected.influence(run["test"]), rtol=1e-10, atol=1e-12
        )
    if form == "hif-exact":
        q = full.compute_intermediate_quantities(run["test"], test=True)
        r = full.compute_intermediate_quantities(run["train"].tensors)
        self_q = full.compute_intermediate_quantities(run["train"].tensors, test=True)
    else:
        q = full.compute_intermediate_quantities(run["test"], side="test")
        r = full.compute_intermediate_quantities(side="train")
        self_q = full.compute_intermediate_quantities(run["train"].tensors, side="test")
    pq, pr = project_blocks(q, proj, P), project_blocks(r, proj, P)
    torch.testing.assert_close(projected.influence(run["test"]), pq @ pr.T, rtol=1e-10, atol=1e-12)
    expected_self = (project_blocks(self_q, proj, P) * pr).sum(1)
    torch.testing.assert_close(projected.self_influence(), expected_self, rtol=1e-10, atol=1e-12)
    # a projection to 8 dimensions does change the scores
    assert not torch.allclose(projected.influence(run["test"]), full.influence(run["test"]))
    if form != "hif-exact":
        delta = projected.parameter_change([0, 3], flat=True)
        torch.testing.assert_close(delta, full.parameter_change([0, 3], flat=True))
