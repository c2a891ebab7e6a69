"""Time and peak memory as the training set and the model grow.

    python benchmarks/bench_scaling.py [--sizes 1000 2000 4000] [--hidden 32 64 128]

Each configuration runs in a fresh process (peak resident memory from the OS,
minus a baseline process that builds the same data and model and trains it; time:
the median of three runs). Data:
a generated 10-class Gaussian mixture in 64 dimensions (digits has only 1797
images), MLP with one tanh hidden layer, 3 recorded checkpoints. Measured:
``SAMTracInCP.self_influence`` over the training set, with and without a random
projection, and ``SAMInfluenceFunction`` (fast, GGN, CG) influence of 50 test
examples. Linear growth in n means the seconds per 1000 examples stay flat.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time

import torch
from torch.utils.data import TensorDataset

LOSS = torch.nn.CrossEntropyLoss(reduction="none")
METHODS = ("baseline", "gif-self", "gif-self-proj", "hif-fast-cg")


def synthetic(n: int, seed: int = 0) -> tuple[TensorDataset, tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(10, 64, generator=g) * 1.5
    y = torch.randint(0, 10, (n + 50,), generator=g)
    x = (centers[y] + torch.randn(n + 50, 64, generator=g)).double()
    return TensorDataset(x[:n], y[:n]), (x[n:], y[n:])


def one(method: str, n: int, hidden: int) -> dict[str, float]:
    from captum_sam import SAMInfluenceFunction, SAMTracInCP, load_trajectory, train_sam
    from captum_sam.models import build_model

    train, test = synthetic(n)
    model = build_model("mlp", (1, 8, 8), 10, hidden=hidden)
    record = tempfile.mkdtemp()
    train_sam(
        model,
        train,
        LOSS,
        epochs=3,
        lr=0.3,
        rho=0.05,
        batch_size=128,
        weight_decay=1e-3,
        record_dir=record,
    )
    ckpts = [c.path for c in load_trajectory(record).checkpoints]

    def work() -> None:
        if method.startswith("gif"):
            proj = {"projection_dim": 64} if method.endswith("proj") else {}
            est = SAMTracInCP(model, train, ckpts, loss_fn=LOSS, batch_size=250, **proj)
            est.self_influence()
        elif method == "hif-fast-cg":
            est = SAMInfluenceFunction(
                model,
                train,
                record,
                loss_fn=LOSS,
                batch_size=500,
                weight_decay=1e-3,
                damping=1e-3,
                variant="fast",
                projection_dim=None,  # the exact inverse: no rank cap,
                hessian_reg=0.0,  # no added regulariser,
                hessian_inverse_tol=None,  # no eigenvalue dropped
                curvature="ggn",
                solver="cg",
                solver_options={"tol": 1e-5},
            )
            est.influence(test)

    times = []
    for _ in range(3 if method != "baseline" else 1):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    seconds = sorted(times)[len(times) // 2]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "seconds": seconds,
        "peak_mb": peak,
        "params": sum(p.numel() for p in model.parameters()),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 2000, 4000])
    p.add_argument("--hidden", type=int, nargs="+", default=[32, 64, 128])
    p.add_argument("--one", nargs=3, metavar=("METHOD", "N", "HIDDEN"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(one(args.one[0], int(args.one[1]), int(args.one[2]))))
        return

    def run(method: str, n: int, hidden: int) -> dict[str, float]:
        out = subprocess.run(
            [sys.executable, __file__, "--one", method, str(n), str(hidden)],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        return json.loads(out.strip().splitlines()[-1])

    from _common import machine, table

    rows = []
    configs = [(n, args.hidden[0]) for n in args.sizes] + [
        (args.sizes[0], h) for h in args.hidden[1:]
    ]
    for n, hidden in configs:
        base = run("baseline", n, hidden)
        for method in METHODS[1:]:
            r = run(method, n, hidden)
            rows.append(
                (
                    method,
                    str(n),
                    str(int(r["params"])),
                    f"{r['seconds']:.2f}",
                    f"{1000 * r['seconds'] / n:.3f}",
                    f"{r['peak_mb'] - base['peak_mb']:.0f}",
                )
            )
    print(f"machine: {machine()}")
    print(
        table(
            rows,
            (
                "method",
                "n_train",
                "parameters",
                "seconds",
                "s per 1000 examples",
                "peak MB over baseline",
            ),
        )
    )


if __name__ == "__main__":
    main()
