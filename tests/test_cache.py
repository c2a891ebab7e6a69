import json
import os

import pytest
import torch
from torch.utils.data import TensorDataset

from captum_sam import load_trajectory, train_sam
from captum_sam.gif.tracincp import SAMTracInCP
from captum_sam.hif.influence import SAMInfluenceFunction
from tests.helpers import ce_loss, make_data, mlp_model


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    data = make_data(n=26, seed=3)
    x, y = data.tensors
    train = TensorDataset(x[:20], y[:20])
    model = mlp_model()
    out = tmp_path_factory.mktemp("cache") / "r"
    train_sam(model, train, ce_loss(), epochs=2, lr=0.3, rho=0.1, batch_size=6, record_dir=out)
    return dict(
        model=model,
        train=train,
        test=(x[20:], y[20:]),
        dir=out,
        ckpts=[c.path for c in load_trajectory(out).checkpoints],
    )


def gif(run, **kw):
    return SAMTracInCP(
        run["model"],
        run["train"],
        run["ckpts"],
        loss_fn=ce_loss(),
        batch_size=6,
        rho=kw.pop("rho", 0.1),
        **kw,
    )


def traj(run, **kw):
    return SAMTracInCP.from_trajectory(
        run["model"], run["train"], run["dir"], loss_fn=ce_loss(), batch_size=6, **kw
    )


def hif(run, **kw):
    args = dict(
        checkpoint=run["dir"],
        loss_fn=ce_loss(),
        batch_size=6,
        rho=0.1,
        weight_decay=1e-2,
        variant="exact",
        projection_dim=None,
        hessian_reg=0.0,
        hessian_inverse_tol=None,
    )
    args.update(kw)
    return SAMInfluenceFunction(run["model"], run["train"], **args)


@pytest.mark.parametrize("make", [gif, traj, hif])
def test_cache_round_trip_and_influence_from_cache(run, make, tmp_path):
    est = make(run)
    path = est.save_intermediate_quantities(tmp_path / "q")
    manifest = json.loads(open(os.path.join(path, "manifest.json")).read())
    assert manifest["shape"][0] == 20 and manifest["fingerprint"]["estimator"] == type(est).__name__
    quantities = (
        est.compute_intermediate_quantities(run["train"].tensors)
        if make is hif
        else est.compute_intermediate_quantities()
    )
    torch.testing.assert_close(make(run).load_intermediate_quantities(path), quantities)
    expected = est.influence(run["test"])
    other = make(run)
    other.use_intermediate_quantities(path)
    torch.testing.assert_close(other.influence(run["test"]), expected, rtol=1e-10, atol=1e-12)
    top = other.influence(run["test"], k=3)
    assert torch.equal(top.indices, expected.argsort(dim=1, descending=True)[:, :3])


def test_stale_caches_are_refused(run, tmp_path):
    path = gif(run).save_intermediate_quantities(tmp_path / "q")
    with pytest.raises(ValueError, match="stale cache.*perturbation"):
        gif(run, perturbation="example").use_intermediate_quantities(path)
    with pytest.raises(ValueError, match="stale cache.*terms"):
        gif(run, rho=0.2).use_intermediate_quantities(path)
    with pytest.raises(ValueError, match="stale cache.*projection"):
        gif(run, projection_dim=4).load_intermediate_quantities(path)
    with pytest.raises(ValueError, match="stale cache.*estimator"):
        hif(run).use_intermediate_quantities(path)
    # a changed checkpoint file (same path) is detected by its hash
    ckpt = tmp_path / "ckpt.pt"
    state = torch.load(run["ckpts"][-1], weights_only=True)
    torch.save(state, ckpt)
    h_path = hif(run, checkpoint=str(ckpt)).save_intermediate_quantities(tmp_path / "h")
    hif(run, checkpoint=str(ckpt), curvature="ggn", damping=0.1).use_intermediate_quantities(h_path)
    state["model_state"]["fc2.bias"] = state["model_state"]["fc2.bias"] + 1
    torch.save(state, ckpt)
    with pytest.raises(ValueError, match="stale cache.*checkpoint"):
        hif(run, checkpoint=str(ckpt)).use_intermediate_quantities(h_path)
    # a different training set
    x, y = run["train"].tensors
    changed = TensorDataset(x.flip(0), y.flip(0))
    with pytest.raises(ValueError, match="stale cache.*data"):
        SAMTracInCP(
            run["model"], changed, run["ckpts"], loss_fn=ce_loss(), batch_size=6, rho=0.1
        ).use_intermediate_quantities(path)
    with pytest.raises(FileNotFoundError, match="manifest"):
        gif(run).use_intermediate_quantities(tmp_path)


class _Pairs(torch.utils.data.Dataset):
    """A map-style dataset that is not a TensorDataset."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


def test_a_non_tensor_dataset_is_fingerprinted_by_content(run, tmp_path):
    x, y = run["train"].tensors
    path = hif(run).save_intermediate_quantities(tmp_path / "h")
    same = SAMInfluenceFunction(
        run["model"], _Pairs(x, y), run["dir"], loss_fn=ce_loss(), batch_size=6, rho=0.1,
        weight_decay=1e-2, variant="exact", projection_dim=None, hessian_reg=0.0,
        hessian_inverse_tol=None,
    )  # fmt: skip
    with pytest.raises(ValueError, match="stale cache.*data"):  # other type, same examples
        same.use_intermediate_quantities(path)
    p1 = same.save_intermediate_quantities(tmp_path / "p")
    x2 = x.clone()
    x2[3] += 1.0  # one example changed, same type and length
    other = SAMInfluenceFunction(
        run["model"], _Pairs(x2, y), run["dir"], loss_fn=ce_loss(), batch_size=6, rho=0.1,
        weight_decay=1e-2, variant="exact", projection_dim=None, hessian_reg=0.0,
        hessian_inverse_tol=None,
    )  # fmt: skip
    with pytest.raises(ValueError, match="stale cache.*data.sha256"):
        other.use_intermediate_quantities(p1)


def test_caches_of_another_model_scope_perturbation_set_or_collate_are_refused(run, tmp_path):
    from torch.utils.data import DataLoader, default_collate

    path = gif(run).save_intermediate_quantities(tmp_path / "q")
    h_path = hif(run).save_intermediate_quantities(tmp_path / "h")
    gif(run).use_intermediate_quantities(path)  # the same set-up is served
    hif(run).use_intermediate_quantities(h_path)
    # the same layers and checkpoints, another activation: another model
    relu = mlp_model()
    relu.act = torch.nn.ReLU()
    other = dict(run, model=relu)
    with pytest.raises(ValueError, match="stale cache.*model"):
        gif(other).use_intermediate_quantities(path)
    with pytest.raises(ValueError, match="stale cache.*model"):
        hif(other).use_intermediate_quantities(h_path)
    # the right-hand sides are gradients at w* + eps* over the perturbation's scope
    with pytest.raises(ValueError, match="stale cache.*perturbation_scope"):
        hif(run, perturbation_scope="attributed", layers=["fc2"]).use_intermediate_quantities(
            h_path
        )
    # a perturbation set given as one batch in memory is fingerprinted by content
    x, y = run["train"].tensors
    p_path = gif(run, perturbation_dataset=(x[:8], y[:8])).save_intermediate_quantities(
        tmp_path / "p"
    )
    gif(run, perturbation_dataset=(x[:8], y[:8])).use_intermediate_quantities(p_path)
    with pytest.raises(ValueError, match="stale cache.*perturbation_data"):
        gif(run, perturbation_dataset=(x[8:16], y[8:16])).use_intermediate_quantities(p_path)

    # a DataLoader whose collate_fn changes the examples is hashed as it yields them
    def scaled(batch):
        xb, yb = default_collate(batch)
        return 2 * xb, yb

    loader = DataLoader(run["train"], batch_size=6, collate_fn=scaled)
    with pytest.raises(ValueError, match="stale cache.*data"):
        SAMTracInCP(
            run["model"], loader, run["ckpts"], loss_fn=ce_loss(), rho=0.1
        ).use_intermediate_quantities(path)
    plain = DataLoader(run["train"], batch_size=6)
    SAMTracInCP(
        run["model"], plain, run["ckpts"], loss_fn=ce_loss(), rho=0.1
    ).use_intermediate_quantities(path)
