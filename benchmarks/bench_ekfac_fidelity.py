"""K-FAC and EK-FAC against the dense GGN: LDS and time of SAM-HIF(Fast) and plain IF.

    python benchmarks/bench_ekfac_fidelity.py [--n-train 500] [--n-test 100] [--subsets 20]

Digits MLP (64-32-10, 2410 parameters, float64) trained with recorded SAM. Ground truth
for LDS: the recorded schedule replayed on ``--subsets`` random halves of the training
set (``GroundTruth(mode="schedule")``), the same for every row. Each row times the
estimator's set-up (curvature and inverse) plus ``influence`` on the test examples, and
gives the Spearman correlation of its scores with the dense-GGN scores of the same
variant. ``damping=None`` is the K-FAC default (0.1 x each layer's mean eigenvalue).
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import torch
from _common import machine, table, trained_digits

from captum_sam.evaluation import GroundTruth
from captum_sam.evaluation.ground_truth import random_subsets
from captum_sam.evaluation.metrics import lds, spearman
from captum_sam.hif.influence import SAMInfluenceFunction

LOSS = torch.nn.CrossEntropyLoss(reduction="none")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n-train", type=int, default=500)
    parser.add_argument("--n-test", type=int, default=100)
    parser.add_argument("--subsets", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--damping", type=float, default=1e-3)
    args = parser.parse_args()
    torch.manual_seed(0)
    record = tempfile.mkdtemp(prefix="captum_sam_ekfac_")
    data, model, traj = trained_digits(
        "mlp", n_train=args.n_train, epochs=args.epochs, dtype=torch.float64, record_dir=record
    )
    xt, yt = (t[: args.n_test] for t in data.test.tensors)
    truth = GroundTruth(model, data.train, LOSS, "schedule", trajectory=traj)
    start = time.perf_counter()
    masks = random_subsets(args.n_train, args.subsets, fraction=0.5, seed=0)
    removals = [torch.nonzero(~m).flatten().tolist() for m in masks]
    losses = truth.evaluate(removals, (xt, yt)).losses  # (subsets, n_test), once
    retrain = time.perf_counter() - start
    print(f"{machine()}; n_train {args.n_train}, n_test {len(xt)}, {args.subsets} subsets")
    print(f"ground truth: {args.subsets} schedule replays in {retrain:.1f} s")

    def run(variant: str, curvature: str, damping: float | None):
        start = time.perf_counter()
        est = SAMInfluenceFunction(
            model, data.train, traj.final.path, loss_fn=LOSS, batch_size=250, rho=0.05,
            weight_decay=1e-3, damping=damping, variant=variant, curvature=curvature,
            solver="dense" if curvature == "ggn" else "auto", projection_dim=None,
            hessian_reg=0.0, hessian_inverse_tol=None,
        )  # fmt: skip
        scores = est.influence((xt, yt))
        return time.perf_counter() - start, scores, est

    run("fast", "kfac", None)  # warm-up (first-call overheads), not timed
    rows = []
    for variant in ("fast", "plain"):
        dense_time, dense, _ = run(variant, "ggn", args.damping)
        settings = [
            ("ggn", args.damping),
            ("kfac", args.damping),
            ("kfac", None),
            ("ekfac", args.damping),
            ("ekfac", None),
        ]
        for curvature, damping in settings:
            if curvature == "ggn":
                seconds, scores = dense_time, dense
                used = args.damping
            else:
                seconds, scores, est = run(variant, curvature, damping)
                used = est.damping_used
            shown = (
                f"{used:g}"
                if isinstance(used, float)
                else "None: " + ", ".join(f"{k} {v:.2g}" for k, v in used.items())
            )
            value = lds(scores, masks, losses)[0]
            rho_dense = np.nanmean(
                [spearman(scores[j].numpy(), dense[j].numpy()) for j in range(len(xt))]
            )
            rows.append(
                (
                    variant,
                    curvature if curvature != "ggn" else "ggn (dense)",
                    shown,
                    f"{value:.3f}",
                    f"{rho_dense:.3f}",
                    f"{seconds:.2f}",
                    f"{dense_time / seconds:.1f}x",
                )
            )
            print(table(rows[-1:], HEADER).splitlines()[-1], flush=True)
    print()
    print(table(rows, HEADER))


HEADER = (
    "variant",
    "curvature",
    "damping d (per layer)",
    "LDS",
    "Spearman vs dense GGN",
    "seconds",
    "speed vs dense",
)

if __name__ == "__main__":
    main()
