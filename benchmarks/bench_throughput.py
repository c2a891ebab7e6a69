"""Per-example gradient throughput, and every estimator against retraining.

    python benchmarks/bench_throughput.py [--n-train 1000] [--repeats 3]

Digits MLP (2410 parameters). Part 1: self influence of the whole training set at
one checkpoint, set-up included: our factored path (layer inputs and output
gradients, no per-example gradient formed) and our ``torch.func`` ``vmap`` path
(``factorize=False``, per-example gradients) vs Captum's ``TracInCP`` default loop
and its hook path (``sample_wise_grads_per_batch=True``), against the floor of one
batched forward+backward pass over the same data (the cost of a training epoch
without the SAM step). Part 2: each estimator's time to score every training
example against the test set, against one SAM leave-one-out retraining (replaying
the recorded schedule), as the speed-up over retraining once per training example.
Estimators take the median of ``--repeats`` runs (a single run when slower than 2 s),
each built afresh; one retraining is timed after each estimator and the ratio uses
the median of all of them, so that both sides see the same drift in machine speed.
"""

from __future__ import annotations

import argparse
import copy
import statistics

import torch
from _common import machine, table, timed, trained_digits
from captum.influence import TracInCP

from captum_sam import (
    SAMInfluenceFunction,
    SAMTracInCP,
    checkpoints_load_func,
    replay_trajectory,
)
from captum_sam._captum import ArnoldiInfluenceFunction

NONE = torch.nn.CrossEntropyLoss(reduction="none")
SUM = torch.nn.CrossEntropyLoss(reduction="sum")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--n-train", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    data, model, traj = trained_digits(n_train=args.n_train, epochs=20, dtype=torch.float32)
    n, bs = len(data.train), args.batch_size
    last = [traj.checkpoints[-1].path]
    x, y = data.train.tensors

    def floor() -> None:
        for i in range(0, n, bs):
            model.zero_grad()
            NONE(model(x[i : i + bs]), y[i : i + bs]).mean().backward()

    def ours(rho: float, factorize: bool = True) -> torch.Tensor:
        return SAMTracInCP(
            model, data.train, last, loss_fn=NONE, batch_size=bs, rho=rho, factorize=factorize
        ).self_influence()

    def captum(hooks: bool) -> torch.Tensor:
        return TracInCP(
            copy.deepcopy(model),
            data.train,
            last,
            checkpoints_load_func,
            loss_fn=SUM if hooks else NONE,
            batch_size=bs,
            sample_wise_grads_per_batch=hooks,
        ).self_influence()

    t_floor, _ = timed(floor, args.repeats)
    rows = []
    for label, fn, reps in [
        ("floor: batched forward+backward", floor, args.repeats),
        ("captum_sam factored, rho=0 (one pass)", lambda: ours(0.0), args.repeats),
        ("captum_sam SAM-GIF factored, rho=0.05 (w, w+eps)", lambda: ours(0.05), args.repeats),
        (
            "captum_sam torch.func vmap, rho=0 (one gradient set)",
            lambda: ours(0.0, False),
            args.repeats,
        ),
        (
            "captum_sam SAM-GIF vmap, rho=0.05 (w and w+eps sets)",
            lambda: ours(0.05, False),
            args.repeats,
        ),
        ("Captum TracInCP hooks", lambda: captum(True), args.repeats),
        ("Captum TracInCP default loop", lambda: captum(False), 1),
    ]:
        t, _ = timed(fn, reps)
        rows.append((label, f"{t:.3f}", f"{n / t:,.0f}", f"{t / t_floor:.1f}x"))
    print(f"machine: {machine()}")
    print(f"digits MLP, float32, {n} training examples, batch {bs}, one checkpoint")
    print(
        table(
            rows,
            (
                "self influence of the training set (incl. set-up)",
                "seconds",
                "examples/s",
                "vs floor",
            ),
        )
    )

    # ----------------------------------------------------------- vs retraining
    def retrain() -> None:
        replay_trajectory(model, data.train, NONE, traj, remove=[0])

    retrains = [timed(retrain, args.repeats)[0]]
    test = data.test.tensors
    ckpts = [c.path for c in traj.checkpoints]

    def hif(variant: str, **kw) -> SAMInfluenceFunction:
        return SAMInfluenceFunction(
            model,
            data.train,
            traj.final.path,
            loss_fn=NONE,
            batch_size=bs,
            weight_decay=1e-3,
            damping=1e-3,
            variant=variant,
            projection_dim=None,  # the exact inverse: no rank cap,
            hessian_reg=0.0,  # no added regulariser,
            hessian_inverse_tol=None,  # no eigenvalue dropped
            curvature="ggn",
            **kw,
        )

    estimators = {
        "SAM-GIF (trajectory)": lambda: SAMTracInCP.from_trajectory(
            model, data.train, traj, loss_fn=NONE, batch_size=bs
        ),
        "SAM-GIF (checkpoints)": lambda: SAMTracInCP(
            model, data.train, ckpts, loss_fn=NONE, batch_size=bs
        ),
        "SAM-GIF (checkpoints), factorize=False": lambda: SAMTracInCP(
            model, data.train, ckpts, loss_fn=NONE, batch_size=bs, factorize=False
        ),
        "SAM-HIF(Fast) GGN dense": lambda: hif("fast"),
        "SAM-HIF(Fast) GGN dense, factorize=False": lambda: hif("fast", factorize=False),
        "SAM-HIF(exact) GGN dense": lambda: hif("exact"),
        "SAM-HIF(exact) GGN dense, factorize=False": lambda: hif("exact", factorize=False),
        "SAM-HIF(Fast) GGN cg": lambda: hif("fast", solver="cg", solver_options={"tol": 1e-5}),
        "Captum TracInCP hooks": lambda: TracInCP(
            copy.deepcopy(model),
            data.train,
            ckpts,
            checkpoints_load_func,
            loss_fn=SUM,
            batch_size=bs,
            sample_wise_grads_per_batch=True,
        ),
        "Captum ArnoldiInfluenceFunction": lambda: ArnoldiInfluenceFunction(
            copy.deepcopy(model),
            data.train,
            traj.final.path,
            checkpoints_load_func,
            loss_fn=NONE,
            batch_size=bs,
            hessian_reg=n * 2e-3,
        ),
    }
    times = {}
    for label, build in estimators.items():
        t, _ = timed(lambda build=build: build().influence(test), 1)
        if t < 2.0:  # quick ones: the median of --repeats runs, like the retraining
            t, _ = timed(lambda build=build: build().influence(test), args.repeats)
        times[label] = t
        retrains.append(timed(retrain, 1)[0])  # interleaved: the machine's speed drifts
    t_retrain = statistics.median(retrains)
    rows = [(k, f"{t:.2f}", f"{n * t_retrain / t:,.0f}x") for k, t in times.items()]
    print(
        f"\none SAM LOO retraining (replay of {len(traj.steps)} steps): {t_retrain:.2f} s "
        f"(median of {len(retrains)}, interleaved with the estimators: "
        f"{min(retrains):.2f}-{max(retrains):.2f} s); "
        f"retraining once per training example: {n * t_retrain:.0f} s"
    )
    print(
        table(
            rows,
            (
                f"set-up + influence of {len(test[0])} test examples",
                "seconds",
                "faster than n retrainings",
            ),
        )
    )


if __name__ == "__main__":
    main()
