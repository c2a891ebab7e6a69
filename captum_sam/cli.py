"""The ``captum-sam`` command.

Both subcommands refuse an ``--out`` directory that holds anything, unless
``--overwrite`` is given; then they first remove only the files an earlier run of the
same command wrote there and keep everything else. Errors print one line,
``captum-sam: error: <message>``; set the environment variable ``CAPTUM_SAM_DEBUG=1``
to get their traceback instead.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import torch

from captum_sam.outdir import (
    UsageError,
    check_training_settings,
    compare_layout,
    error_message,
    make_out_ready,
    refuse_non_empty,
    require_writable_dir,
    train_layout,
    usage_errors,
)

__all__ = ["main"]

DEBUG_ENV = "CAPTUM_SAM_DEBUG"
# --------------------------------------------------------------------------- commands


def _add_training_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", choices=("logreg", "mlp", "cnn"), default="logreg")
    p.add_argument("--noise", type=float, default=0.0, help="fraction of training labels flipped")
    p.add_argument("--n-train", type=int, default=1000)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--lr", type=float, default=0.5)
    p.add_argument("--rho", type=float, default=0.05)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--weight-decay", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)


def cmd_train(args: argparse.Namespace) -> int:
    """Train a reference model with SAM on digits and record the trajectory."""
    from captum_sam.data import load_digits_data
    from captum_sam.evaluation.metrics import accuracy
    from captum_sam.models import build_model
    from captum_sam.training import train_sam

    with usage_errors():
        refuse_non_empty(args.out, args.overwrite)
    check_training_settings(args.epochs, args.batch_size, args.lr, args.rho, args.weight_decay)
    data = load_digits_data(n_train=args.n_train, noise=args.noise, seed=args.seed)
    model = build_model(args.model, data.image_shape, data.num_classes, seed=args.seed)
    make_out_ready(args.out, train_layout(), args.overwrite)
    result = train_sam(
        model,
        data.train,
        torch.nn.CrossEntropyLoss(reduction="none"),
        epochs=args.epochs,
        lr=args.lr,
        rho=args.rho,
        batch_size=args.batch_size,
        weight_decay=args.weight_decay,
        record_dir=args.out,
        seed=args.seed,
        show_progress=True,
        overwrite=args.overwrite,
    )
    train_acc = accuracy(model, data.train.tensors)
    print(
        f"data: digits, {len(data.train)} train ({int(data.noisy.sum())} noisy labels), "
        f"{len(data.test)} test"
    )
    print(
        f"model: {args.model}, SAM rho={args.rho}, {args.epochs} epochs, "
        f"final loss {result.epoch_losses[-1]:.4f}"
    )
    print(f"train accuracy (given labels): {train_acc:.4f}")
    print(f"test accuracy: {accuracy(model, data.test.tensors):.4f}")
    print(f"trajectory recorded in {result.record_dir}")
    return 0


QUICK = dict(
    n_train=200,
    n_val=100,
    n_test=150,
    epochs=10,
    n_loo=12,
    lds_subsets=6,
    removal_fractions=(0.0, 0.1, 0.2),
    trace_examples=3,
    trace_k=3,
)


def _detect_dataset(data_dir: str) -> str:
    for name, marker in (("mnist", "MNIST"), ("cifar10", "cifar-10-batches-py")):
        if os.path.isdir(os.path.join(data_dir, marker)):
            return name
    raise FileNotFoundError(
        f"--data-dir {data_dir!r} holds neither torchvision's MNIST ({data_dir}/MNIST/raw/...) "
        f"nor CIFAR-10 ({data_dir}/cifar-10-batches-py/...); nothing is downloaded"
    )


def cmd_compare(args: argparse.Namespace) -> int:
    """Run the side-by-side comparison and write the report."""
    from captum_sam.evaluation.compare import CompareConfig, run_compare
    from captum_sam.evaluation.report import format_table

    settings = dict(QUICK) if args.quick else {}
    for key in ("n_train", "n_val", "n_test", "epochs", "n_loo", "lds_subsets"):
        value = getattr(args, key)
        if value is not None:
            settings[key] = value
    methods = tuple(m.strip() for m in args.methods.split(",")) if args.methods else None
    dataset = args.dataset
    if args.data_dir is not None and dataset == "digits":
        dataset = _detect_dataset(args.data_dir)
    config = CompareConfig(
        model=args.model,
        dataset=dataset,
        data_dir=args.data_dir,
        noise=args.noise,
        rho=args.rho,
        adaptive=args.adaptive,
        lr=args.lr,
        batch_size=args.batch_size,
        weight_decay=args.weight_decay,
        damping=args.damping,
        curvature=args.curvature,
        ground_truth=args.ground_truth,
        lds_fraction=args.lds_fraction,
        mislabel_by=args.mislabel_by,
        seed=args.seed,
        **({"methods": methods} if methods else {}),
        **settings,
    )
    check_training_settings(
        config.epochs, config.batch_size, config.lr, config.rho, config.weight_decay
    )
    with usage_errors():
        refuse_non_empty(args.out, args.overwrite)
        if args.cache_dir is not None:
            require_writable_dir(args.cache_dir, "--cache-dir")
    make_out_ready(args.out, compare_layout(), args.overwrite)
    results = run_compare(
        config, args.out, show_progress=not args.no_progress, cache_dir=args.cache_dir
    )
    gt = results["ground_truth"]
    print()
    print(
        f"{args.model} on {results['data']['name']}, ground truth: {gt['mode']} retraining "
        f"({gt['retrain_seconds_mean']:.2f} s each); test accuracy "
        f"{results['accuracy']['trained']:.3f}"
    )
    print(format_table(results["methods"]))
    print(
        f"\nreport: {args.out}/report.md, results.json and plots "
        f"({results['seconds_total']:.0f} s in all)"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``captum-sam``."""
    parser = argparse.ArgumentParser(
        prog="captum-sam",
        description="Data attribution for SAM-trained models, side by side with Captum.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a model with SAM on digits and record it")
    _add_training_args(train)
    train.add_argument("--out", default="runs/train", help="record directory")
    train.add_argument(
        "--overwrite",
        action="store_true",
        help="write into a non-empty --out: first remove the manifest and checkpoints an "
        "earlier run wrote there (other files are kept)",
    )
    train.set_defaults(func=cmd_train)

    from captum_sam.evaluation.compare import METHODS

    cmp = sub.add_parser(
        "compare",
        help="SAM-aware vs Captum estimators against real retraining, side by side",
        description="Train with SAM (recorded), attribute with every estimator, retrain "
        "for the ground truth, print one table and write report.md, results.json and plots.",
    )
    cmp.add_argument("--model", choices=("logreg", "mlp", "cnn"), default="logreg")
    cmp.add_argument("--curvature", choices=("hessian", "ggn", "both"), default="hessian")
    cmp.add_argument("--damping", type=float, default=0.0)
    cmp.add_argument("--rho", type=float, default=0.05)
    cmp.add_argument("--adaptive", action="store_true", help="ASAM")
    cmp.add_argument("--noise", type=float, default=0.1)
    cmp.add_argument("--n-train", type=int, default=None, help="default 1000 (quick: 200)")
    cmp.add_argument("--n-val", type=int, default=None)
    cmp.add_argument("--n-test", type=int, default=None)
    cmp.add_argument("--epochs", type=int, default=None, help="default 30 (quick: 10)")
    cmp.add_argument("--lr", type=float, default=0.5)
    cmp.add_argument("--batch-size", type=int, default=64)
    cmp.add_argument("--weight-decay", type=float, default=1e-3)
    cmp.add_argument("--seed", type=int, default=0)
    cmp.add_argument(
        "--methods", default=None, help="comma-separated subset of: " + ", ".join(METHODS)
    )
    cmp.add_argument(
        "--ground-truth",
        choices=("auto", "fixed_point", "schedule"),
        default="auto",
        help="auto: fixed_point for logreg, schedule otherwise",
    )
    cmp.add_argument("--n-loo", type=int, default=None, help="removed examples (default 40)")
    cmp.add_argument("--lds-subsets", type=int, default=None, help="default 20")
    cmp.add_argument("--lds-fraction", type=float, default=0.5)
    cmp.add_argument("--mislabel-by", choices=("influence", "self"), default="influence")
    cmp.add_argument("--quick", action="store_true", help="small settings, under a minute")
    cmp.add_argument("--dataset", choices=("digits", "mnist", "cifar10"), default="digits")
    cmp.add_argument(
        "--data-dir",
        default=None,
        help="torchvision MNIST or CIFAR-10 files already on disk (no download)",
    )
    cmp.add_argument("--out", default="runs/compare")
    cmp.add_argument(
        "--overwrite",
        action="store_true",
        help="write into a non-empty --out: first remove the report.md, results.json, plots, "
        "fixed_point.pt and trajectory/ an earlier run wrote there (other files, and the "
        "ground-truth cache, are kept)",
    )
    cmp.add_argument("--cache-dir", default=None, help="ground-truth cache (default OUT/cache)")
    cmp.add_argument("--no-progress", action="store_true")
    cmp.set_defaults(func=cmd_compare)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``captum-sam`` command.

    Returns:
        The exit status: 0 on success; 2 when the command line cannot be carried out
        as given (a bad value, a missing path, an ``--out`` that is not a directory, not
        writable, or not empty without ``--overwrite``: all checked before any work);
        1 when the run fails with another ``OSError`` (a full disk, say). Both print one
        line ``captum-sam: error: <message>`` to stderr, or raise with the traceback when
        the environment variable ``CAPTUM_SAM_DEBUG`` is set (not ``0``). Any other
        exception is a bug and propagates with its traceback.
    """
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (UsageError, ValueError, TypeError, OSError) as err:
        if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
            raise
        print(f"captum-sam: error: {error_message(err)}", file=sys.stderr)
        runtime = isinstance(err, OSError) and not isinstance(err, FileNotFoundError)
        return 1 if runtime else 2


if __name__ == "__main__":
    sys.exit(main())
