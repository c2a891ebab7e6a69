"""SAM-HIF(Fast) with EK-FAC vs Captum's ArnoldiInfluenceFunction on a small CNN.

    python benchmarks/bench_cnn_hif.py [--n-train 1000 2000] [--widths 32 64]
        [--n-test 100] [--batch-size 64] [--skip-captum-above 2000]
        [--rows ours-k50 ours-exact captum]

CIFAR-shaped random data (3x32x32, 10 classes) and the CNN of ``bench_cnn_gif.py``,
Conv2d(3, w, 3, padding=1)-ReLU-MaxPool2d(2)-Flatten-Linear(256 w, 10), float32, one
checkpoint (random weights: the cost of these estimators does not depend on training).
For each training-set size and width, each in a fresh process (its own peak memory):

* ``ours EK-FAC k=50``: ``SAMInfluenceFunction(variant="fast", curvature="ekfac")``
  with the defaults a Captum user gets by swapping the class name (``projection_dim=50``:
  Captum's top-50 eigen-directions of the inverse, here taken from the exact EK-FAC
  eigenbasis; ``kfac_samples=None``: the exact output Hessian, 10 backward passes per
  example and pass), rho 0.05;
* ``ours EK-FAC exact``: the same with ``projection_dim=None`` (every direction, the
  inverse applied in each layer's Kronecker eigenbasis);
* ``Captum Arnoldi k=50``: Captum's ``ArnoldiInfluenceFunction`` with its defaults
  (``arnoldi_dim=200`` Hessian-vector products over the whole training set, top 50),
  the same layers (the convolution and the linear layer, every parameter).

Each row is set-up plus ``influence`` on ``--n-test`` test examples. The two estimators
approximate different matrices (EK-FAC of the GGN at ``w + eps`` against Arnoldi's
Krylov approximation of the Hessian at ``w``): compare cost, not scores. Captum's
Arnoldi makes one pass over the training data per Arnoldi step, so it is skipped above
``--skip-captum-above`` examples.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

import torch
from _common import cifar_like as data
from _common import machine, run_in_process, table, warm_then_time
from torch import nn


def cnn(width: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(width * 16 * 16, 10),
    )


def write_checkpoint(directory: str, width: int) -> str:
    torch.manual_seed(0)
    path = os.path.join(directory, f"cnn{width}.pt")
    torch.save({"model_state": cnn(width).state_dict(), "learning_rate": 0.1}, path)
    return path


def measure(spec: dict) -> dict:
    """One row in this process: seconds, CPU seconds, peak and added MB."""
    from captum_sam import checkpoints_load_func
    from captum_sam._captum import ArnoldiInfluenceFunction
    from captum_sam.hif.influence import SAMInfluenceFunction

    train, test = data(spec["n_train"], 0), data(spec["n_test"], 1)
    width, bs = spec["width"], spec["batch_size"]
    loss = nn.CrossEntropyLoss(reduction="none")

    def call(train, test) -> torch.Tensor:
        model = cnn(width)
        if spec["who"] == "captum":
            est = ArnoldiInfluenceFunction(
                model, train, spec["ckpt"], checkpoints_load_func, layers=["0", "4"],
                loss_fn=loss, batch_size=bs,
            )  # fmt: skip
        else:
            est = SAMInfluenceFunction(
                model, train, spec["ckpt"], loss_fn=loss, batch_size=bs, rho=0.05,
                variant="fast", curvature="ekfac", layers=["0", "4"],
                projection_dim=spec["projection_dim"],
            )  # fmt: skip
        return est.influence(test.tensors)

    timing, scores = warm_then_time(call, train, test, bs)
    return dict(timing, finite=bool(torch.isfinite(scores).all()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n-train", type=int, nargs="+", default=[1000, 2000])
    p.add_argument("--widths", type=int, nargs="+", default=[32, 64])
    p.add_argument("--n-test", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--skip-captum-above", type=int, default=2000)
    p.add_argument(
        "--rows", nargs="+", choices=("ours-k50", "ours-exact", "captum"),
        default=["ours-k50", "ours-exact", "captum"], help="which estimators to run",
    )  # fmt: skip
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(measure(json.loads(args.one))))
        return
    directory = tempfile.mkdtemp(prefix="captum_sam_bench_cnn_hif_")
    print(f"machine: {machine()}; n_test {args.n_test}, batch {args.batch_size}", flush=True)
    every = {
        "ours-k50": ("ours EK-FAC k=50", dict(who="ours", projection_dim=50)),
        "ours-exact": ("ours EK-FAC exact", dict(who="ours", projection_dim=None)),
        "captum": ("Captum Arnoldi k=50", dict(who="captum")),
    }
    who = [every[name] for name in every if name in args.rows]
    rows = []
    for width in args.widths:
        ckpt = write_checkpoint(directory, width)
        params = sum(q.numel() for q in cnn(width).parameters())
        for n in args.n_train:
            for label, extra in who:
                if extra["who"] == "captum" and n > args.skip_captum_above:
                    continue
                spec = dict(
                    n_train=n, n_test=args.n_test, batch_size=args.batch_size, width=width,
                    ckpt=ckpt, **extra,
                )  # fmt: skip
                r = run_in_process(__file__, spec)
                rows.append(
                    (
                        label, str(params), str(n), f"{r['seconds']:.1f}", f"{r['cpu']:.1f}",
                        f"{r['peak_mb']:.0f}", f"{r['added_mb']:.0f}", str(r["finite"]),
                    )
                )  # fmt: skip
                print(table(rows[-1:], HEADER).splitlines()[-1], flush=True)
    print()
    print(table(rows, HEADER))


HEADER = ("estimator", "parameters", "n_train", "wall s", "CPU s", "peak MB", "added MB", "finite")

if __name__ == "__main__":
    main()
