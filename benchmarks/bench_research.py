"""Does SAM-awareness help at larger rho? LDS of the estimators on SAM-trained digits models.

    python benchmarks/bench_research.py [--rhos 0.2 0.5] [--subsets 40] [--model mlp|cnn]

The run of ``captum-sam compare --model mlp`` (``CompareConfig(model=..., rho=rho)``:
digits, 1000 training examples with 10% planted label noise, 300 validation, the
remaining 497 as test; MLP 64-32-10 in float64; SAM for 30 epochs, lr 0.5, batch 64,
weight decay 1e-3, seed 0; ``--model cnn``: compare's small CNN, Conv2d 8x3x3-tanh-
AvgPool-Linear, 1370 parameters, the same settings), trained and recorded by compare's own step
(:func:`captum_sam.evaluation.compare._train`). Ground truth:
``GroundTruth(mode="schedule")``, the recorded SAM schedule replayed on the kept
examples with each batch renormalised by its kept count (empty batches skipped), on
``--subsets`` random halves of the training set drawn as compare draws them
(``random_subsets(..., sampler="fraction", fraction=0.5, seed=11)``); cached in
``--out`` so a rerun only recomputes the estimators. A second column (``--truths``)
uses ``GroundTruth(mode="fresh")``: SAM retraining from the recorded initial weights on
the kept examples with new seeded batch orders (seeds 0, 1, 2), test losses averaged
over the seeds; it tells an estimator that predicts retraining from one that
differentiates the recorded batch order itself (the unrolled row). LDS:
:func:`captum_sam.evaluation.metrics.lds` (Spearman over subsets, mean over test
examples). Rows:

* plain IF (``variant="plain"``), GGN and Hessian, ``damping="auto"`` and each fixed
  ``--dampings``; SAM-HIF(Fast) and SAM-HIF(exact) with the GGN at the same dampings
  (all built by compare's :func:`~captum_sam.evaluation.setup.build_estimator`: the
  exact inverse, no rank cap, no extra regulariser);
* plain IF with the GGN averaged over the last ``--last`` epoch checkpoints (gradients
  at the final weights; a small dense wrapper, checked against plain IF at one
  checkpoint);
* SAM-GIF trajectory form (``SAMTracInCP.from_trajectory``) with batch-faithful
  perturbations (``perturbation="batch"``, the recorded batches) and with the
  full-data perturbation (``"dataset"``);
* SAM-GIF unrolled (:class:`~captum_sam.gif.unrolled.SAMUnrolledGIF`, the exact
  derivative of the recorded run, ``removal="renormalise"``);
* Captum ``TracInCP`` on the epoch checkpoints (reference).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time

import torch
from _common import machine, table
from torch.func import functional_call, grad, vmap

from captum_sam.evaluation import GroundTruth
from captum_sam.evaluation.compare import _train
from captum_sam.evaluation.config import CompareConfig
from captum_sam.evaluation.metrics import lds
from captum_sam.evaluation.setup import build_estimator
from captum_sam.evaluation.subsets import random_subsets
from captum_sam.gif.tracincp import SAMTracInCP
from captum_sam.gif.unrolled import SAMUnrolledGIF
from captum_sam.hif.dense import curvature_matrix
from captum_sam.hif.influence import SAMInfluenceFunction

HIF_ROWS = (("if", "ggn"), ("if", "hessian"), ("sam-hif-fast", "ggn"), ("sam-hif-exact", "ggn"))


def averaged_ggn_scores(ctx, checkpoints: list[str], damping: float) -> tuple[torch.Tensor, float]:
    """Plain IF with the GGN averaged over ``checkpoints``; gradients at the final weights.

    Returns the scores and their largest relative deviation from plain IF when only the
    final checkpoint is averaged (a check of the wrapper's convention).
    """
    cfg = ctx.config
    ests = [
        SAMInfluenceFunction(
            ctx.base,
            ctx.data.train,
            path,
            loss_fn=ctx.loss,
            batch_size=250,
            rho=cfg.rho,
            weight_decay=cfg.weight_decay,
            damping=damping,
            variant="plain",
            curvature="ggn",
            solver="dense",
            projection_dim=None,
            hessian_reg=0.0,
            hessian_inverse_tol=None,
        )  # fmt: skip
        for path in checkpoints
    ]
    final = ests[-1]  # checkpoints end with the final weights
    op = final.operator
    params = {n: p.detach() for n, p in ctx.model.named_parameters()}

    def loss_one(p, x, y):
        return ctx.loss(functional_call(ctx.model, p, (x[None],)), y[None])[0]

    def flat_grads(x, y):
        g = vmap(grad(loss_one), in_dims=(None, 0, 0))(params, x, y)
        return torch.cat([g[n].reshape(len(x), -1) for n in op.names], dim=1)

    g_train = flat_grads(*ctx.data.train.tensors)
    g_test = flat_grads(*ctx.test)

    def scores_with(curv: torch.Tensor) -> torch.Tensor:
        a = curv + torch.eye(op.dim, dtype=curv.dtype) * op.regulariser
        return g_test @ torch.linalg.solve(a, g_train.T)

    curvatures = [curvature_matrix(e.operator, 256) for e in ests]
    check = scores_with(curvatures[-1])
    reference = final.influence(ctx.test)
    deviation = float((check - reference).abs().max() / reference.abs().max())
    return scores_with(torch.stack(curvatures).mean(dim=0)), deviation


def estimators(ctx, traj, dampings, last):
    """``(row label, damping shown, thunk -> scores)`` for every row."""
    out = []
    for method, curvature in HIF_ROWS:
        for d in ["auto", *dampings]:
            c = dataclasses.replace(ctx, config=dataclasses.replace(ctx.config, damping=d))
            out.append((f"{method} [{curvature}]", d, lambda c=c, m=method, v=curvature: (
                build_estimator(c, m, v))))  # fmt: skip
    for p in ("batch", "dataset"):
        out.append((f"sam-gif (trajectory, perturbation={p})", "-", lambda p=p: (
            SAMTracInCP.from_trajectory(ctx.model, ctx.data.train, traj, loss_fn=ctx.loss,
                                        batch_size=250, perturbation=p))))  # fmt: skip
    out.append(("sam-gif unrolled (renormalise)", "-", lambda: SAMUnrolledGIF(
        ctx.model, ctx.data.train, traj, loss_fn=ctx.loss, batch_size=250)))  # fmt: skip
    out.append(("captum-tracincp (epoch ckpts)", "-", lambda: build_estimator(
        ctx, "captum-tracincp", None)))  # fmt: skip
    paths = [c.path for c in traj.checkpoints][-last:] if last > 1 else []
    for d in dampings if paths else []:
        out.append((f"if [ggn averaged, last {last} ckpts]", d, lambda d=d: (
            averaged_ggn_scores(ctx, paths, d))))  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=("mlp", "cnn"), default="mlp")
    parser.add_argument("--rhos", type=float, nargs="+", default=[0.2, 0.5])
    parser.add_argument("--dampings", type=float, nargs="+", default=[0.001, 0.01, 0.1])
    parser.add_argument("--subsets", type=int, default=40)
    parser.add_argument(
        "--last", type=int, default=5, help="checkpoints averaged (< 2: no such rows)"
    )
    parser.add_argument(
        "--truths", nargs="+", choices=("schedule", "fresh", "schedule_zero_weight"),
        default=["schedule", "fresh"], help="ground-truth protocols, one LDS column each",
    )  # fmt: skip
    parser.add_argument("--truth-only", action="store_true", help="only the ground truth")
    parser.add_argument("--out", default="/tmp/captum_sam_bench_research")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"{machine()}; {args.model}; {args.subsets} LDS subsets (halves, seed 11); "
          f"ground truth: {', '.join(args.truths)}", flush=True)  # fmt: skip
    header = ("rho", "estimator", "damping d", *(f"LDS ({m})" for m in args.truths), "seconds")
    rows = []
    for rho in args.rhos:
        cfg = CompareConfig(model=args.model, rho=rho)
        out = f"{args.out}-{args.model}-rho{rho:g}"
        ctx, traj, _ = _train(cfg, out, False, False)
        n = len(ctx.data.train)
        masks = random_subsets(n, args.subsets, fraction=cfg.lds_fraction, seed=cfg.seed + 11)
        removed = [torch.nonzero(~m).flatten().tolist() for m in masks]
        truths = {}
        for mode in args.truths:
            gt = GroundTruth(ctx.base, ctx.data.train, ctx.loss, mode, trajectory=traj,
                             seeds=cfg.gt_seeds, cache_dir=os.path.join(out, "truth"))  # fmt: skip
            start = time.perf_counter()
            truths[mode] = gt.evaluate(removed, ctx.test).losses
            print(f"rho {rho:g}: ground truth {mode} ({args.subsets} subsets) in "
                  f"{time.perf_counter() - start:.0f} s", flush=True)  # fmt: skip
        if args.truth_only:
            continue
        for label, d, build in estimators(ctx, traj, args.dampings, args.last):
            start = time.perf_counter()
            try:
                made = build()
                extra = ""
                if isinstance(made, tuple):  # the averaged-curvature wrapper
                    scores, deviation = made
                    extra = f" (1-ckpt check: rel. dev. {deviation:.1e})"
                else:
                    scores = made.influence(ctx.test).detach()
                    used = getattr(made, "damping_used", None)
                    if d == "auto" and used is not None:
                        d = f"auto = {used:.3g}"
                seconds = f"{time.perf_counter() - start:.1f}"
                values = [f"{lds(scores, masks, t)[0]:.3f}" for t in truths.values()]
            except Exception as err:  # one row's failure must not lose the others
                seconds = f"{time.perf_counter() - start:.1f}"
                values, extra = ["failed"] * len(truths), f" ({type(err).__name__}: {err})"
            rows.append((f"{rho:g}", label, str(d), *values, seconds))
            print(table(rows[-1:], header).splitlines()[-1] + extra, flush=True)
    if rows:
        print()
        print(table(rows, header))


if __name__ == "__main__":
    main()
