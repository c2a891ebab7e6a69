"""SAM-GIF self influence vs Captum's TracInCP on the digits MLP, measured in one run.

    python benchmarks/bench_gif.py [--n-train 1000] [--checkpoints 5] [--repeats 3]

Prints the median time of each path and the ratios (Captum time / our time); absolute
times depend on the machine, ratios measured in the same run are what to compare.
"""

from __future__ import annotations

import argparse
import copy

import torch
from _common import machine, table, timed, trained_digits
from captum.influence import TracInCP

from captum_sam import checkpoints_load_func
from captum_sam.gif.tracincp import SAMTracInCP

RHO0 = "SAMTracInCP rho=0 (plain TracIn, factored)"
HOOKS = "Captum TracInCP hooks (sample_wise_grads_per_batch)"
LOOP = "Captum TracInCP default loop"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--n-train", type=int, default=1000)
    p.add_argument("--checkpoints", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    args = p.parse_args()
    dtype = getattr(torch, args.dtype)
    data, model, traj = trained_digits(n_train=args.n_train, epochs=args.checkpoints, dtype=dtype)
    ckpts = [c.path for c in traj.checkpoints]
    none, total = (
        torch.nn.CrossEntropyLoss(reduction="none"),
        torch.nn.CrossEntropyLoss(reduction="sum"),
    )
    bs = args.batch_size

    def ours(perturbation: str, rho: float = 0.05, factorize: bool = True):
        est = SAMTracInCP(
            model,
            data.train,
            ckpts,
            loss_fn=none,
            batch_size=bs,
            rho=rho,
            perturbation=perturbation,
            factorize=factorize,
        )
        return est.self_influence()

    def captum(hooks: bool):
        est = TracInCP(
            copy.deepcopy(model),
            data.train,
            ckpts,
            checkpoints_load_func=checkpoints_load_func,
            loss_fn=total if hooks else none,
            batch_size=bs,
            sample_wise_grads_per_batch=hooks,
        )
        return est.self_influence()

    x, y = data.train.tensors

    def floor() -> None:  # one batched forward+backward over the data, per checkpoint
        for i in range(0, len(y), bs):
            model.zero_grad()
            none(model(x[i : i + bs]), y[i : i + bs]).mean().backward()

    built = SAMTracInCP(model, data.train, ckpts, loss_fn=none, batch_size=bs, rho=0.05)
    built.self_influence()  # first call: the factored-path check and the perturbation
    paths = [
        ("SAMTracInCP perturbation=dataset (factored)", lambda: ours("dataset"), args.repeats),
        (
            "  the same, self_influence() of an estimator built before",
            built.self_influence,
            args.repeats,
        ),
        (
            "SAMTracInCP perturbation=dataset, factorize=False (vmap)",
            lambda: ours("dataset", factorize=False),
            args.repeats,
        ),
        ("SAMTracInCP perturbation=example (vmap)", lambda: ours("example"), args.repeats),
        (RHO0, lambda: ours("dataset", 0.0), args.repeats),
        (HOOKS, lambda: captum(True), args.repeats),
        (LOOP, lambda: captum(False), 1),
    ]
    t_floor, _ = timed(floor, 5 * args.repeats)
    times, results = {}, {}
    for label, fn, reps in paths:
        times[label], results[label] = timed(fn, reps)
    t_hook, t_loop = times[HOOKS], times[LOOP]
    s_loop = results[LOOP]
    agree = torch.allclose(results[RHO0], s_loop, rtol=1e-4, atol=1e-6) and torch.allclose(
        results[HOOKS], s_loop, rtol=1e-3, atol=1e-5
    )
    n_params = sum(p.numel() for p in model.parameters())
    print(f"machine: {machine()}")
    print(
        f"digits MLP ({n_params} parameters, {args.dtype}), self_influence over {args.n_train} "
        f"training examples, {len(ckpts)} checkpoints, batch size {bs}; floor (one batched "
        f"forward+backward over the data) {t_floor * 1e3:.2f} ms per checkpoint"
    )
    rows = [
        (
            label,
            f"{t:.3f}",
            f"{t_loop / t:.1f}x",
            f"{t_hook / t:.2f}x",
            f"{t / (len(ckpts) * t_floor):.1f}x",
        )
        for label, t in times.items()
    ]
    headers = ("path", "median s", "speed-up vs loop", "speed-up vs hooks", "floors per ckpt")
    print(table(rows, headers))
    print(f"rho=0 scores equal Captum's: {agree}")


if __name__ == "__main__":
    main()
