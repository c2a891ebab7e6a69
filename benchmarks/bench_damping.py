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

Exploratory extra rows, not rules of the library: ``d = 1 / sum_t lr_t`` (the inverse
of the training horizon: gradient descent run for a total step ``sum lr`` moves a
direction of mean-loss curvature ``lambda`` by at most about ``min(sum lr, 1 / lambda)``,
so curvatures below ``1 / sum lr`` act as if damped by it), and for the Hessian that
plus the auto rule's shift ``max(0, -lambda_min) / n``.
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
    parser.add_argument("--truth", choices=(*PROTOCOLS, "both"), default="both")
    parser.add_argument("--record", default="/tmp/captum_sam_bench_damping")
    args = parser.parse_args()
    torch.set_num_threads(1)
    protocols = tuple(PROTOCOLS) if args.truth == "both" else (args.truth,)
    print(f"{machine()}; {args.subsets} LDS subsets (halves), truth: {', '.join(protocols)}")
    rows, summary = [], []
    for rho in args.rhos:
        cfg = CompareConfig(model="mlp", rho=rho)
        data = load_data(cfg)
        model = build_model("mlp", data.image_shape, data.num_classes, seed=0, dtype=torch.float64)
        record = f"{args.record}-rho{rho:g}"
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
        horizon = 1.0 / sum(step.lr for step in traj.steps)  # exploratory, see the docstring
        for curvature in ("ggn", "hessian"):
            results = {}
            candidates = [*args.dampings, "auto", horizon]
            for damping in candidates:
                start = time.perf_counter()
                est = SAMInfluenceFunction(
                    model, data.train, traj.final.path, loss_fn=LOSS, batch_size=250,
                    rho=rho, weight_decay=cfg.weight_decay, damping=damping, variant="plain",
                    curvature=curvature, solver="dense", projection_dim=None,
                    hessian_reg=0.0, hessian_inverse_tol=None,
                )  # fmt: skip
                scores = est.influence(test)
                seconds = time.perf_counter() - start
                values = {p: lds(scores, masks, truths[p])[0] for p in protocols}
                results[damping] = values
                shown = f"auto = {est.damping_used:.3g}" if damping == "auto" else f"{damping:g}"
                if damping == horizon:
                    shown = f"1/sum(lr) = {damping:.3g}"
                elif isinstance(damping, float) and damping not in args.dampings:
                    shown = f"shift + 1/sum(lr) = {damping:.3g}"
                if damping == "auto" and curvature == "hessian":  # exploratory: shift + horizon
                    shift = max(0.0, -est.damping_rule.min_eigenvalue) / len(data.train)
                    candidates.append(shift + horizon)
                rows.append(
                    (f"{rho:g}", curvature, shown, *(f"{values[p]:.3f}" for p in protocols),
                     f"{seconds:.1f}")
                )  # fmt: skip
                print(table(rows[-1:], header(protocols)).splitlines()[-1], flush=True)
            for p in protocols:
                best = max(args.dampings, key=lambda d: results[d][p])
                gap = results[best][p] - results["auto"][p]
                summary.append(
                    (f"{rho:g}", curvature, p, f"{best:g}", f"{results[best][p]:.3f}",
                     f"{results['auto'][p]:.3f}", f"{gap:+.3f}",
                     f"{results[best][p] - results[horizon][p]:+.3f}")
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
                "gap of 1/sum(lr)",
            ),
        )  # fmt: skip
    )


def header(protocols: tuple[str, ...]) -> tuple[str, ...]:
    return ("rho", "curvature", "damping d", *(f"LDS ({p})" for p in protocols), "seconds")


if __name__ == "__main__":
    main()
