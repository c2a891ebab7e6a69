"""SAM-HIF per variant and solver vs Captum's influence functions and vs retraining.

    python benchmarks/bench_hif.py [--n-train 1000] [--n-test 100] [--quick]

Digits MLP (2410 parameters) trained with recorded SAM. For every configuration, in
one run: set-up (curvature, factorisation), ``influence`` for ``--n-test`` test
examples, and ``self_influence`` timed on a subset and reported per 1000 training
examples. ``factorize=False`` rows form the dense GGN from curvature-vector products
instead of layer factors. Reference points: Captum's ``NaiveInfluenceFunction`` (full Hessian,
eigendecomposition) and ``ArnoldiInfluenceFunction`` on the same model, and one SAM
leave-one-out retraining (replaying the recorded schedule). Ratios are what to
compare; absolute times depend on the machine.
"""

from __future__ import annotations

import argparse
import copy
import time
import warnings
from functools import partial

import torch
from _common import machine, table, trained_digits

from captum_sam import checkpoints_load_func, replay_trajectory
from captum_sam._captum import ArnoldiInfluenceFunction, NaiveInfluenceFunction
from captum_sam.hif.influence import SAMInfluenceFunction
from captum_sam.solvers import ConvergenceWarning

LOSS = torch.nn.CrossEntropyLoss(reduction="none")


def clock(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--n-train", type=int, default=1000)
    p.add_argument("--n-test", type=int, default=100)
    p.add_argument(
        "--self-subset",
        type=int,
        default=200,
        help="training examples timed for self_influence with iterative solvers",
    )
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--quick", action="store_true", help="fewer configurations")
    args = p.parse_args()
    data, model, traj = trained_digits(
        n_train=args.n_train, epochs=args.epochs, dtype=torch.float64
    )
    ckpt, lam, rho = traj.final.path, traj.weight_decay, traj.steps[0].rho
    n = len(data.train)
    test = tuple(t[: args.n_test] for t in data.test.tensors)
    bs = 250
    subset = tuple(t[: args.self_subset] for t in data.train.tensors)

    t_retrain, _ = clock(lambda: replay_trajectory(model, data.train, LOSS, traj, remove=[0]))

    configs = [  # (variant, curvature, solver, options, damping, factorize)
        ("fast", "hessian", "dense", {}, 0.0, True),
        ("full", "hessian", "dense", {}, 0.0, True),
        ("exact", "hessian", "dense", {}, 0.0, True),
        ("plain", "hessian", "dense", {}, 0.0, True),
        ("fast", "ggn", "dense", {}, 1e-3, True),
        ("fast", "ggn", "dense", {}, 1e-3, False),
        ("exact", "ggn", "dense", {}, 1e-3, True),
        ("exact", "ggn", "dense", {}, 1e-3, False),
        ("fast", "ggn", "cg", {"tol": 1e-6}, 1e-3, True),
        ("exact", "ggn", "gmres", {"tol": 1e-6}, 1e-3, True),
        ("exact", "ggn", "bicgstab", {"tol": 1e-6}, 1e-3, True),
        ("fast", "ggn", "neumann", {"tol": 1e-4, "neumann_terms": 300}, 1e-3, True),
        ("fast", "ggn", "lissa", {"lissa_depth": 200, "scale": None}, 1e-3, True),
        ("fast", "ggn", "arnoldi", {"rank": 50}, 1e-3, True),
    ]
    if args.quick:
        configs = configs[:2] + configs[4:6] + configs[8:10]
    rows = []
    for variant, curvature, solver, opts, damping, factorize in configs:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            start = time.perf_counter()
            est = SAMInfluenceFunction(
                model,
                data.train,
                ckpt,
                loss_fn=LOSS,
                batch_size=bs,
                rho=rho,
                weight_decay=lam,
                damping=damping,
                variant=variant,
                projection_dim=None,  # the exact inverse: no rank cap,
                hessian_reg=0.0,  # no added regulariser,
                hessian_inverse_tol=None,  # no eigenvalue dropped
                curvature=curvature,
                solver=solver,
                solver_options=opts,
                factorize=factorize,
            )
            t_setup = time.perf_counter() - start
            t_inf, _ = clock(partial(est.influence, test))
            dense = solver == "dense"
            t_self, _ = clock(partial(est.self_influence, None if dense else subset))
        per_1000 = t_self * 1000 / (n if dense else args.self_subset)
        resid = est.last_residual
        worst = f"{float(resid.max()):.1e}" if resid is not None else "-"
        warned = "yes" if any(issubclass(w.category, ConvergenceWarning) for w in caught) else ""
        total = t_setup + t_inf
        rows.append(
            (
                f"SAM-HIF {variant} {curvature} {solver}"
                + ("" if factorize else ", factorize=False"),
                f"{t_setup:.2f}",
                f"{t_inf:.2f}",
                f"{per_1000:.2f}",
                worst + (" (warned)" if warned else ""),
                f"{t_retrain * n / total:.0f}x",
            )
        )

    P = sum(p.numel() for p in model.parameters())
    t_setup, naive = clock(
        lambda: NaiveInfluenceFunction(
            copy.deepcopy(model),
            data.train,
            ckpt,
            checkpoints_load_func,
            loss_fn=LOSS,
            batch_size=bs,
            sketch_dim=P,
            hessian_reg=n * lam,
        )
    )
    t_inf, _ = clock(lambda: naive.influence(test))
    t_self, _ = clock(lambda: naive.self_influence())
    rows.append(
        (
            "Captum NaiveInfluenceFunction (full rank)",
            f"{t_setup:.2f}",
            f"{t_inf:.2f}",
            f"{t_self * 1000 / n:.2f}",
            "-",
            f"{t_retrain * n / (t_setup + t_inf):.0f}x",
        )
    )
    t_setup, arnoldi = clock(
        lambda: ArnoldiInfluenceFunction(
            copy.deepcopy(model),
            data.train,
            ckpt,
            checkpoints_load_func,
            loss_fn=LOSS,
            batch_size=bs,
            hessian_reg=n * lam,
        )
    )
    t_inf, _ = clock(lambda: arnoldi.influence(test))
    t_self, _ = clock(lambda: arnoldi.self_influence())
    rows.append(
        (
            "Captum ArnoldiInfluenceFunction (defaults)",
            f"{t_setup:.2f}",
            f"{t_inf:.2f}",
            f"{t_self * 1000 / n:.2f}",
            "-",
            f"{t_retrain * n / (t_setup + t_inf):.0f}x",
        )
    )

    print(f"machine: {machine()}")
    print(
        f"digits MLP, {P} parameters, float64, n_train={n}, {args.n_test} test examples; "
        f"one SAM LOO retraining (replayed schedule, {len(traj.steps)} steps): "
        f"{t_retrain:.2f} s"
    )
    print(
        table(
            rows,
            (
                "estimator",
                "set-up s",
                f"influence({args.n_test}) s",
                "self_influence s / 1000",
                "worst residual",
                "LOO-for-all-n retraining / (set-up + influence)",
            ),
        )
    )


if __name__ == "__main__":
    main()
