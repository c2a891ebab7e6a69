"""Accuracy cost of the random projection, measured against real retraining.

    python benchmarks/bench_projection.py [--dims 16 64 256] [--n-loo 40]

Logistic regression on digits (1000 examples) trained with SAM, then retrained to
the SAM fixed point without each of ``--n-loo`` examples (ground truth). For
SAM-HIF(exact) at the fixed point and SAM-GIF on the recorded trajectory: LOO
Pearson/Spearman of the predicted change of the test loss without projection and
with ``projection_dim`` in ``--dims`` (several projection seeds), and the memory of
the cached training side (n x D).
"""

from __future__ import annotations

import argparse
import os
import tempfile

import numpy as np
import torch
from _common import machine, table

from captum_sam import SAMInfluenceFunction, SAMTracInCP, load_trajectory, train_sam
from captum_sam.data import load_digits_data
from captum_sam.evaluation import sam_fixed_point
from captum_sam.evaluation.ground_truth import GroundTruth
from captum_sam.evaluation.metrics import loo_correlation
from captum_sam.models import build_model

LOSS = torch.nn.CrossEntropyLoss(reduction="none")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--dims", type=int, nargs="+", default=[16, 64, 256])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--n-loo", type=int, default=40)
    args = p.parse_args()
    rho, lam = 0.05, 1e-3
    data = load_digits_data(n_train=1000, noise=0.1)
    model = build_model("logreg", data.image_shape, data.num_classes)
    record = tempfile.mkdtemp()
    train_sam(
        model,
        data.train,
        LOSS,
        epochs=30,
        lr=0.5,
        rho=rho,
        batch_size=64,
        weight_decay=lam,
        record_dir=record,
    )
    star = sam_fixed_point(model, data.train, LOSS, rho, lam).model
    ckpt = os.path.join(record, "fixed_point.pt")
    torch.save({"model_state": star.state_dict(), "learning_rate": 1.0}, ckpt)
    test = data.test.tensors
    removed = torch.randperm(1000, generator=torch.Generator().manual_seed(0))[: args.n_loo]
    gt = GroundTruth(star, data.train, LOSS, "fixed_point", rho=rho, weight_decay=lam)
    res = gt.evaluate([[int(k)] for k in removed], test)
    with torch.no_grad():
        base = LOSS(star(test[0]), test[1]).sum()
    actual = res.losses.sum(1) - base
    P = sum(q.numel() for q in model.parameters())
    rows = []
    for name in ("SAM-HIF(exact)", "SAM-GIF"):
        for dim in [None, *args.dims]:
            stats = []
            for seed in range(1 if dim is None else args.seeds):
                kw = {} if dim is None else {"sketch_dim": dim, "sketch_seed": seed}
                if name == "SAM-GIF":
                    est = SAMTracInCP.from_trajectory(
                        model, data.train, record, loss_fn=LOSS, batch_size=250, **kw
                    )
                    width = len(load_trajectory(record).checkpoints) * (dim or P)
                else:
                    est = SAMInfluenceFunction(
                        star,
                        data.train,
                        ckpt,
                        loss_fn=LOSS,
                        batch_size=250,
                        rho=rho,
                        weight_decay=lam,
                        variant="exact",
                        projection_dim=None,  # the exact inverse: no rank cap,
                        hessian_reg=0.0,  # no added regulariser,
                        hessian_inverse_tol=None,  # no eigenvalue dropped
                        **kw,
                    )
                    width = 2 * (dim or P)
                pred = est.influence(test).sum(0)[removed]
                stats.append(loo_correlation(pred, actual))
            pearson = np.array([s[0] for s in stats])
            spear = np.array([s[1] for s in stats])
            rows.append(
                (
                    name,
                    "none" if dim is None else str(dim),
                    f"{pearson.mean():+.3f} ({pearson.std():.3f})",
                    f"{spear.mean():+.3f} ({spear.std():.3f})",
                    f"{1000 * width * 8 / 2**20:.1f}",
                )
            )
    print(f"machine: {machine()}")
    print(
        f"digits logreg, {P} parameters, ground truth: SAM fixed-point retraining, "
        f"{args.n_loo} removed examples; mean (std) over {args.seeds} projection seeds"
    )
    print(
        table(
            rows,
            (
                "estimator",
                "projection_dim",
                "LOO Pearson",
                "LOO Spearman",
                "cached training side, MB (float64)",
            ),
        )
    )


if __name__ == "__main__":
    main()
