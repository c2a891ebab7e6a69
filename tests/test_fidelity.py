"""SAM-HIF against real leave-one-out retraining to the SAM fixed point (digits)."""

import os

import pytest
import torch
from scipy.stats import pearsonr, spearmanr

from captum_sam import train_sam
from captum_sam.data import load_digits_data
from captum_sam.evaluation import sam_fixed_point
from captum_sam.hif.influence import SAMInfluenceFunction
from captum_sam.models import build_model
from tests.helpers import save_checkpoint

RHO, LAM = 0.05, 1e-3


@pytest.mark.slow
def test_sam_hif_tracks_fixed_point_loo_retraining(tmp_path):
    data = load_digits_data(n_train=400, n_val=200, seed=0)
    loss = torch.nn.CrossEntropyLoss(reduction="none")
    model = build_model("logreg", data.image_shape, data.num_classes)
    train_sam(
        model, data.train, loss, epochs=200, lr=0.5, rho=RHO, batch_size=400, weight_decay=LAM
    )
    star = sam_fixed_point(model, data.train, loss, RHO, LAM)
    assert star.residual < 1e-10
    ckpt = os.path.join(tmp_path, "star.pt")
    save_checkpoint(star.model, ckpt, learning_rate=1.0)
    xt, yt = data.test.tensors

    def test_loss(m):
        with torch.no_grad():
            return loss(m(xt), yt).sum().item()

    base = test_loss(star.model)
    removed = torch.randperm(400, generator=torch.Generator().manual_seed(0))[:30].tolist()
    actual = []
    for k in removed:
        loo = sam_fixed_point(star.model, data.train, loss, RHO, LAM, remove=[k])
        assert loo.residual < 1e-10
        actual.append(test_loss(loo.model) - base)
    actual = torch.tensor(actual)
    report = {}
    for variant in ["fast", "full", "exact", "plain"]:
        est = SAMInfluenceFunction(
            star.model,
            data.train,
            ckpt,
            loss_fn=loss,
            batch_size=400,
            rho=RHO,
            weight_decay=LAM,
            variant=variant,
            projection_dim=None,  # the exact inverse: no rank cap,
            hessian_reg=0.0,  # no added regulariser,
            hessian_inverse_tol=None,  # no eigenvalue dropped
        )
        pred = est.influence(data.test.tensors).sum(dim=0)[removed]
        report[variant] = (pearsonr(pred, actual)[0], spearmanr(pred, actual)[0])
    print(
        "\nLOO fidelity (Pearson, Spearman):",
        {k: tuple(round(x, 4) for x in v) for k, v in report.items()},
    )
    assert report["exact"][0] >= 0.95
    assert report["exact"][1] >= 0.9
