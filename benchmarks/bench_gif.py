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
from captum_sam.tracincp import SAMTracInCP


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

    def ours(perturbation: str, rho: float = 0.05):
        est = SAMTracInCP(
            model,
            data.train,
            ckpts,
            loss_fn=none,
            batch_size=bs,
            rho=rho,
            perturbation=perturbation,
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

    t_dataset, s_dataset = timed(lambda: ours("dataset"), args.repeats)
    t_example, _ = timed(lambda: ours("example"), args.repeats)
    t_rho0, s_rho0 = timed(lambda: ours("dataset", 0.0), args.repeats)
    t_hook, s_hook = timed(lambda: captum(True), args.repeats)
    t_loop, s_loop = timed(lambda: captum(False), 1)
    agree = torch.allclose(s_rho0, s_loop, rtol=1e-4, atol=1e-6) and torch.allclose(
        s_hook, s_loop, rtol=1e-3, atol=1e-5
    )
    n_params = sum(p.numel() for p in model.parameters())
    print(f"machine: {machine()}")
    print(
        f"digits MLP ({n_params} parameters, {args.dtype}), self_influence over {args.n_train} "
        f"training examples, {len(ckpts)} checkpoints, batch size {bs}"
    )
    rows = [
        (
            "SAMTracInCP perturbation=dataset",
            f"{t_dataset:.3f}",
            f"{t_loop / t_dataset:.1f}x",
            f"{t_hook / t_dataset:.2f}x",
        ),
        (
            "SAMTracInCP perturbation=example",
            f"{t_example:.3f}",
            f"{t_loop / t_example:.1f}x",
            f"{t_hook / t_example:.2f}x",
        ),
        (
            "SAMTracInCP rho=0 (plain TracIn)",
            f"{t_rho0:.3f}",
            f"{t_loop / t_rho0:.1f}x",
            f"{t_hook / t_rho0:.2f}x",
        ),
        (
            "Captum TracInCP hooks (sample_wise_grads_per_batch)",
            f"{t_hook:.3f}",
            f"{t_loop / t_hook:.1f}x",
            "1.00x",
        ),
        ("Captum TracInCP default loop", f"{t_loop:.3f}", "1.0x", f"{t_hook / t_loop:.2f}x"),
    ]
    print(table(rows, ("path", "median s", "speed-up vs loop", "speed-up vs hooks")))
    print(f"rho=0 scores equal Captum's: {agree}")


if __name__ == "__main__":
    main()
