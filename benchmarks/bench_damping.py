"""``damping="auto"`` against fixed damping: LDS of plain IF (GGN, Hessian) on SAM-trained MLPs.

    python benchmarks/bench_damping.py [--subsets 20] [--truth renormalised|schedule|both]

The run of ``captum-sam compare --model mlp`` (digits, 1000 training examples with 10%
planted label noise, 300 validation, the remaining 497 as test; MLP 64-32-10, 2410
parameters, float64; SAM for 30 epochs, lr 0.5, batch 64, weight decay 1e-3) at each
``--rhos``. For each, plain IF (``SAMInfluenceFunction(variant="plain")``, the exact
inverse: ``projection_dim=None``, ``hessian_reg=0``, ``hessian_inverse_tol=None``) with
the GGN and the Hessian at every ``--dampings`` and at ``damping="auto"``, scored by
LDS on ``--subsets`` random halves of the training set (seed 11, as compare's
default seed 0 draws them). Ground truth (``--truth``), both
:class:`~captum_sam.evaluation.GroundTruth` protocols replaying the recorded schedule:

* ``renormalised`` (``mode="schedule"``, the default protocol): each batch's loss the
  mean over its kept examples (empty batches skipped), i.e. training on the subset with
  the recorded batches and learning rates;
* ``zero-weight`` (``mode="schedule_zero_weight"``): removed examples weighted 0 with
  the full batch size kept (each kept example's step is halved on average).

``auto+T``: ``damping="auto"`` with ``training_horizon=T``, the sum of the run's
learning rates (:func:`captum_sam.hif.damping.training_horizon`; the mean term is then
at least ``n / T``). ``--epochs`` other than 30 trains a second model (a held-out
check of the horizon term, whose ``T`` scales with the run).
Ground-truth losses are cached next to ``--record`` (``*-truth-<protocol>-<subsets>.pt``).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import time

import torch
from _common import machine, table

from captum_sam import load_trajectory, train_sam
from captum_sam.evaluation import GroundTruth
from captum_sam.evaluation.config import CompareConfig
from captum_sam.evaluation.metrics import lds
from captum_sam.evaluation.setup import load_data
from captum_sam.evaluation.subsets import random_subsets
from captum_sam.hif.damping import training_horizon
from captum_sam.hif.influence import SAMInfluenceFunction
from captum_sam.models import build_model

LOSS = torch.nn.CrossEntropyLoss(reduction="none")


PROTOCOLS = {"renormalised": "schedule", "zero-weight": "schedule_zero_weight"}


def truth_losses(protocol, model, data, traj, masks, test) -> torch.Tensor:
    """Test losses ``(subsets, n_test)`` of the models retrained on each subset."""
    gt = GroundTruth(model, data.train, LOSS, PROTOCOLS[protocol], trajectory=traj)
    return gt.evaluate([torch.nonzero(~m).flatten().tolist() for m in masks], test).losses


def weights_digest(traj) -> str:
    """A short hash of the trained weights (the truth cache's key with the subsets)."""
    state = torch.load(traj.final.path, map_location="cpu", weights_only=True)["model_state"]
    flat = torch.cat([v.reshape(-1).double() for _, v in sorted(state.items())])
    return hashlib.sha256(flat.numpy().tobytes()).hexdigest()[:12]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rhos", type=float, nargs="+", default=[0.05, 0.2, 0.5])
    parser.add_argument("--dampings", type=float, nargs="+", default=[0.001, 0.01, 0.1, 1.0])
    parser.add_argument("--subsets", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=30, help="SAM epochs (compare's: 30)")
    parser.add_argument("--truth", choices=(*PROTOCOLS, "both"), default="both")
    parser.add_argument("--record", default="/tmp/captum_sam_bench_damping")
    args = parser.parse_args()
    torch.set_num_threads(1)
    protocols = tuple(PROTOCOLS) if args.truth == "both" else (args.truth,)
    print(
        f"{machine()}; {args.epochs} epochs; {args.subsets} LDS subsets (halves), truth: "
        f"{', '.join(protocols)}"
    )
    rows, summary = [], []
    for rho in args.rhos:
        cfg = CompareConfig(model="mlp", rho=rho, epochs=args.epochs)
        data = load_data(cfg)
        model = build_model("mlp", data.image_shape, data.num_classes, seed=0, dtype=torch.float64)
        record = f"{args.record}-rho{rho:g}" + ("" if args.epochs == 30 else f"-e{args.epochs}")
        train_sam(
            model, data.train, LOSS, epochs=cfg.epochs, lr=cfg.lr, rho=rho,
            batch_size=cfg.batch_size, weight_decay=cfg.weight_decay, record_dir=record,
            seed=0, overwrite=True,
        )  # fmt: skip
        traj = load_trajectory(record)
        test = data.test.tensors
        masks = random_subsets(len(data.train), args.subsets, "fraction", 0.5, cfg.seed + 11)
        start = time.perf_counter()
        truths = {}
        for p in protocols:  # cached next to the record: a rerun reuses the retrainings
            cache = f"{record}-truth-{p}-{args.subsets}-{weights_digest(traj)}.pt"
            if os.path.exists(cache):
                truths[p] = torch.load(cache)
            else:
                truths[p] = truth_losses(p, model, data, traj, masks, test)
                torch.save(truths[p], cache)
        print(f"rho {rho:g}: ground truth in {time.perf_counter() - start:.0f} s", flush=True)
        horizon = training_horizon(traj)
        for curvature in ("ggn", "hessian"):
            results = {}
            for damping in [*args.dampings, "auto", "auto+T"]:
                start = time.perf_counter()
                est = SAMInfluenceFunction(
                    model, data.train, traj.final.path, loss_fn=LOSS, batch_size=250,
                    rho=rho, weight_decay=cfg.weight_decay, variant="plain",
                    damping="auto" if damping == "auto+T" else damping,
                    training_horizon=horizon if damping == "auto+T" else None,
                    curvature=curvature, solver="dense", projection_dim=None,
                    hessian_reg=0.0, hessian_inverse_tol=None,
                )  # fmt: skip
                scores = est.influence(test)
                seconds = time.perf_counter() - start
                values = {p: lds(scores, masks, truths[p])[0] for p in protocols}
                results[damping] = values
                shown = (
                    f"{damping} = {est.damping_used:.3g}" if damping in AUTOS else f"{damping:g}"
                )
                rows.append(
                    (f"{rho:g}", curvature, shown, *(f"{values[p]:.3f}" for p in protocols),
                     f"{seconds:.1f}")
                )  # fmt: skip
                print(table(rows[-1:], header(protocols)).splitlines()[-1], flush=True)
            for p in protocols:
                best = max(args.dampings, key=lambda d: results[d][p])
                top = results[best][p]
                summary.append(
                    (f"{rho:g}", curvature, p, f"{best:g}", f"{top:.3f}",
                     f"{results['auto'][p]:.3f}", f"{top - results['auto'][p]:+.3f}",
                     f"{results['auto+T'][p]:.3f}", f"{top - results['auto+T'][p]:+.3f}")
                )  # fmt: skip
    print()
    print(table(rows, header(protocols)))
    print()
    print(
        table(
            summary,
            (
                "rho",
                "curvature",
                "truth",
                "best fixed d",
                "its LDS",
                "auto LDS",
                "gap",
                "auto+T LDS",
                "gap (auto+T)",
            ),
        )  # fmt: skip
    )


AUTOS = ("auto", "auto+T")


def header(protocols: tuple[str, ...]) -> tuple[str, ...]:
    return ("rho", "curvature", "damping d", *(f"LDS ({p})" for p in protocols), "seconds")


if __name__ == "__main__":
    main()
