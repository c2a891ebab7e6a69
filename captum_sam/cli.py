"""The ``captum-sam`` command.

Both subcommands refuse an ``--out`` directory that holds anything, unless
``--overwrite`` is given; then they first remove only the files an earlier run of the
same command wrote there and keep everything else. Errors print one line,
``captum-sam: error: <message>``; set the environment variable ``CAPTUM_SAM_DEBUG=1``
to get their traceback instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import sys
from collections.abc import Sequence
from typing import Any

from captum_sam.evaluation.config import (
    CURVATURES,
    DATASETS,
    DIGITS_SIZE,
    GROUND_TRUTHS,
    LDS_SAMPLERS,
    METHODS,
    MODEL_NAMES,
    PROTOCOLS,
    QUICK,
    SYNTHETIC_CIFAR_SIZE,
    CompareConfig,
    check_model_data,
    default_lr,
    default_n_test,
)
from captum_sam.outdir import (
    RunFailed,
    UsageError,
    check_training_settings,
    compare_layout,
    error_message,
    make_out_ready,
    out_lock,
    require_writable_dir,
    train_layout,
    usage_errors,
    work_started,
)

__all__ = ["main", "build_parser"]

DEBUG_ENV = "CAPTUM_SAM_DEBUG"
ESTIMATOR_FAILED = 3  # exit status: the report was written, but an estimator failed
DEFAULTS = {f.name: f.default for f in dataclasses.fields(CompareConfig)}
TRAIN_VAL = 300  # validation examples held out by `captum-sam train` (as compare does)


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Show each option's default, unless it has none or its help already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if "default" in text or any(default is v for v in (None, False, argparse.SUPPRESS)):
            return text
        return f"{text} (default: %(default)s)"


def _parser(sub: argparse._SubParsersAction, name: str, **kw: str) -> argparse.ArgumentParser:
    return sub.add_parser(name, formatter_class=_HelpFormatter, **kw)


# --------------------------------------------------------------------------- train

TRAIN_DESCRIPTION = f"""\
Train a model with SAM (on scikit-learn's bundled 8x8 digits unless --dataset says
otherwise; nothing is downloaded) and record its trajectory in --out: a manifest.json
(learning rate, rho, which examples were in each batch, SHA-256 of every file) and one
checkpoint per epoch. The recording is what SAMTracInCP.from_trajectory,
SAMTracInCP(checkpoints=OUT) and the ground truth's schedule replay read. --n-train
examples are used for training, {TRAIN_VAL} are held out for validation and the rest of
digits ({default_n_test("synthetic-cifar")} generated synthetic-cifar examples, 1000 of
MNIST/CIFAR-10) for the test accuracy printed at the end.

examples:
  captum-sam train --model mlp --out runs/mlp
  captum-sam train --model convnet --dataset synthetic-cifar --epochs 5 --out runs/convnet"""

MODEL_HELP = (
    "logreg: multinomial logistic regression (convex); mlp: one tanh hidden layer of 32 "
    "units; cnn: one 8-channel 3x3 convolution, tanh, 2x2 average pooling and a linear "
    "head; convnet: one 32-channel 3x3 convolution, ReLU, 2x2 max-pooling and a linear "
    "head (83k parameters on 32x32 colour images); resnet18: ResNet-18 with a 32x32 "
    "stem and BatchNorm (11.2M parameters, trained in float32; not on digits, and slow "
    "on a CPU: each epoch over 1000 images takes minutes)"
)
DATASET_HELP = (
    "digits: scikit-learn's bundled 8x8 digits; synthetic-cifar: generated 3x32x32 "
    f"images of 10 classes (at most {SYNTHETIC_CIFAR_SIZE} in all, no files needed); mnist "
    "or cifar10: torchvision's files in --data-dir (default: detected from --data-dir "
    "when it is given, else digits)"
)


def _add_training_args(p: argparse.ArgumentParser, compare: bool) -> None:
    d = DEFAULTS
    p.add_argument("--model", choices=MODEL_NAMES, default=d["model"], help=MODEL_HELP)
    p.add_argument("--dataset", choices=DATASETS, default=None, help=DATASET_HELP)
    p.add_argument(
        "--data-dir",
        default=None,
        help="a torchvision root holding MNIST/raw/... or cifar-10-batches-py/ (nothing is "
        "downloaded)",
    )
    p.add_argument(
        "--noise",
        type=float,
        default=d["noise"] if compare else 0.0,
        help="fraction of training labels flipped to another class (the planted "
        "mislabeled examples the detection metrics look for)",
    )
    if compare:
        p.add_argument(
            "--n-train",
            type=int,
            default=None,
            help=f"training examples (default: {d['n_train']}; --quick: {QUICK['n_train']})",
        )
    else:
        p.add_argument("--n-train", type=int, default=1000, help="training examples")
    p.add_argument(
        "--epochs",
        type=int,
        default=None if compare else d["epochs"],
        help=f"SAM epochs (default: {d['epochs']}"
        + (f"; --quick: {QUICK['epochs']})" if compare else ")"),
    )
    p.add_argument(
        "--lr",
        type=float,
        default=None,
        help=f"SGD learning rate of SAM (default: {default_lr('mlp')}; "
        f"{default_lr('convnet')} for convnet and resnet18)",
    )
    p.add_argument(
        "--rho",
        type=float,
        default=d["rho"],
        help="SAM radius rho (0 is plain SGD); the SAM-aware estimators use the same rho",
    )
    p.add_argument("--adaptive", action="store_true", help="ASAM: the perturbation scaled by |w|")
    p.add_argument("--batch-size", type=int, default=d["batch_size"], help="SAM batch size")
    p.add_argument(
        "--weight-decay",
        type=float,
        default=d["weight_decay"],
        help="L2 weight decay (lambda/2 |w|^2 added to the loss; part of every estimator's "
        "curvature)",
    )
    p.add_argument(
        "--seed", type=int, default=d["seed"], help="seed of the split, noise, init and batches"
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="write into a non-empty --out: first remove the files an earlier run of "
        "this command wrote there (other files are kept, and named)",
    )
    p.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bars (the step lines are still printed)",
    )


def _dataset(args: argparse.Namespace) -> str:
    """``--dataset``, detected from ``--data-dir`` when left at digits; checked with the model.

    A missing torchvision, needed by MNIST and CIFAR-10 alone, is a usage error.
    """
    dataset = args.dataset
    if dataset is None:  # not given: from --data-dir, else the bundled digits
        dataset = "digits" if args.data_dir is None else _detect_dataset(args.data_dir)
    check_model_data(args.model, dataset, args.data_dir)
    if dataset in ("mnist", "cifar10") and importlib.util.find_spec("torchvision") is None:
        raise UsageError(
            f"--dataset {dataset} reads torchvision's files, and torchvision is not "
            "installed: pip install 'captum-sam[vision]' (a torchvision matching your torch)"
        )
    return dataset


def _check_train_args(args: argparse.Namespace) -> str:
    """What ``train`` would refuse, checked before torch is imported; the data set's name."""
    if args.lr is None:
        args.lr = default_lr(args.model)
    check_training_settings(args.epochs, args.batch_size, args.lr, args.rho, args.weight_decay)
    if not 0 <= args.seed < 2**63:
        raise ValueError(f"--seed must be in [0, 2**63), got {args.seed}")
    dataset = _dataset(args)
    totals = {"digits": (DIGITS_SIZE, 1), "synthetic-cifar": (SYNTHETIC_CIFAR_SIZE, 200)}
    if dataset in totals:
        total, test = totals[dataset]
        room = total - TRAIN_VAL - test
        if not 1 <= args.n_train <= room:
            raise ValueError(
                f"--n-train must be in [1, {room}] ({total} {dataset} images, {TRAIN_VAL} "
                f"held out for validation, {'at least 1' if test == 1 else test} for the "
                f"test), got {args.n_train}"
            )
    elif args.n_train < 1:
        raise ValueError(f"--n-train must be >= 1, got {args.n_train}")
    if not 0 <= args.noise < 1:
        raise ValueError(f"--noise is a fraction of labels, in [0, 1); got {args.noise}")
    return dataset


def cmd_train(args: argparse.Namespace) -> int:
    """Train a reference model with SAM and record the trajectory."""
    dataset = _check_train_args(args)
    with out_lock(args.out, args.overwrite, "train"):  # one command per --out at a time
        return _run_train(args, dataset)


def _run_train(args: argparse.Namespace, dataset: str) -> int:
    """:func:`cmd_train` once ``--out`` is checked and held."""
    from captum_sam.data import load_dataset
    from captum_sam.models import build_model, training_dtype

    dtype = training_dtype(args.model)
    data = load_dataset(
        dataset, args.data_dir, args.n_train, TRAIN_VAL, None, args.noise, args.seed, dtype
    )
    model = build_model(args.model, data.image_shape, data.num_classes, seed=args.seed, dtype=dtype)
    make_out_ready(args.out, train_layout(), args.overwrite)
    with work_started():
        return _train_and_report(args, dataset, data, model)


def _train_and_report(args: argparse.Namespace, dataset: str, data: Any, model: Any) -> int:
    """The work of ``train`` once ``--out`` is ready: train, record, print the summary."""
    import torch

    from captum_sam.evaluation.metrics import accuracy
    from captum_sam.training import train_sam

    print(
        f"SAM training {args.model} on {dataset}: {len(data.train)} examples "
        f"({int(data.noisy.sum())} noisy labels), {args.epochs} epochs",
        flush=True,
    )
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
        adaptive=args.adaptive,
        show_progress=not args.no_progress,
        overwrite=args.overwrite,
    )
    train_acc = accuracy(model, data.train.tensors)
    print(
        f"data: {dataset}, {len(data.train)} train ({int(data.noisy.sum())} noisy labels), "
        f"{len(data.val)} validation, {len(data.test)} test"
    )
    print(
        f"model: {args.model}, SAM rho={args.rho}{' (ASAM)' if args.adaptive else ''}, "
        f"{args.epochs} epochs, final loss {result.epoch_losses[-1]:.4f}"
    )
    print(f"train accuracy (given labels): {train_acc:.4f}")
    print(f"test accuracy: {accuracy(model, data.test.tensors):.4f}")
    print(f"trajectory recorded in {result.record_dir}")
    return 0


# --------------------------------------------------------------------------- compare

COMPARE_DESCRIPTION = """\
Train a model with SAM (recorded), attribute its training data with every estimator,
SAM-aware and Captum's standard ones on the same model, retrain for real without the
removed examples (the ground truth), then print one table and write report.md,
results.json and four plots into --out.

The default run (logistic regression on the bundled digits, 1000 training examples)
takes about 6 minutes of CPU time (3 minutes of wall time on an idle 2-core machine);
--quick (200 examples, 10 epochs) about 1.3 minutes of CPU time. Nothing is
downloaded: MNIST or CIFAR-10 are used only from files already on disk (--data-dir)."""

COMPARE_EPILOG = f"""\
methods (--methods, comma-separated; default: all, fewer on a CNN):
{chr(10).join(f"  {name:<16}{text}" for name, text in METHODS.items())}

exit status: 0 done; {ESTIMATOR_FAILED} report written but an estimator failed (its row says why);
2 bad command line (checked before any work); 1 the run failed after it started (an
I/O error, a file found corrupt).

examples:
  captum-sam compare --quick
  captum-sam compare --model mlp --curvature both --out runs/mlp
  captum-sam compare --dataset mnist --data-dir ~/data --model cnn --n-train 2000
  captum-sam compare --model convnet --dataset synthetic-cifar --quick
  captum-sam compare --model convnet --dataset synthetic-cifar --quick --curvature ekfac

CNNs (convnet, resnet18) run sam-gif, sam-gif-ckpt and captum-tracincp by default: a
dense P x P curvature does not fit, so the Hessian rows (sam-hif*, if) solve with
conjugate gradients or GMRES, one system per example, and they and captum-arnoldi
took over 10 minutes on 60 training examples of convnet (name them in --methods to
run them anyway). With --curvature kfac or ekfac, convnet also runs sam-hif-fast and if
(inverted exactly in each layer's Kronecker eigenbasis, no solver)."""


def _damping(text: str) -> float | str:
    """``--damping``: ``auto`` or a number."""
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a number, got {text!r}") from None


def _add_compare_args(p: argparse.ArgumentParser) -> None:
    d = DEFAULTS
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"small settings for a first look: {QUICK['n_train']} training, "
        f"{QUICK['n_test']} test examples, {QUICK['epochs']} epochs, {QUICK['n_loo']} "
        f"leave-one-out and {QUICK['lds_subsets']} LDS retrainings",
    )
    p.add_argument(
        "--methods",
        default=None,
        help="comma-separated estimators to compare (default: all; on convnet and resnet18 "
        "sam-gif, sam-gif-ckpt, captum-tracincp; see below)",
    )
    p.add_argument(
        "--curvature",
        choices=CURVATURES,
        default=d["curvature"],
        help="curvature of the Hessian-based estimators: the Hessian, the Gauss-Newton "
        "matrix (GGN), its K-FAC or EK-FAC approximation (nn.Linear/nn.Conv2d layers), or "
        "both Hessian and GGN (one row each)",
    )
    p.add_argument(
        "--damping",
        type=_damping,
        default=d["damping"],
        help="d added as n*d to the curvature's diagonal (beyond --weight-decay) before "
        "inverting; 'auto' (default): 0.1 x the curvature's mean eigenvalue (at least "
        "1/sum of the learning rates when attributing at the run's last iterate) plus the "
        "shift that makes an indefinite Hessian positive semi-definite, per row (the report "
        "prints each row's value)",
    )
    p.add_argument(
        "--ground-truth",
        choices=GROUND_TRUTHS,
        default=d["ground_truth"],
        help="how 'retrained without' is computed: "
        + "; ".join(f"{name}: {text}" for name, text in PROTOCOLS.items())
        + "; auto: fixed_point for logreg, schedule otherwise",
    )
    p.add_argument(
        "--gt-seeds",
        type=_seeds,
        default=d["gt_seeds"],
        help="batch-order seeds of --ground-truth fresh, comma-separated, results averaged "
        f"(default: {','.join(str(s) for s in d['gt_seeds'])})",
    )
    p.add_argument(
        "--n-val",
        type=int,
        default=None,
        help=f"clean validation examples, used to rank mislabeled training data "
        f"(default: {d['n_val']}; --quick: {QUICK['n_val']})",
    )
    p.add_argument(
        "--n-test",
        type=int,
        default=None,
        help=f"test examples (default: the rest of digits, 200 of synthetic-cifar, 1000 of "
        f"MNIST/CIFAR-10; "
        f"--quick: {QUICK['n_test']})",
    )
    p.add_argument(
        "--n-loo",
        type=int,
        default=None,
        help=f"training examples removed one at a time and retrained without "
        f"(default: {d['n_loo']}; --quick: {QUICK['n_loo']})",
    )
    p.add_argument(
        "--lds-subsets",
        type=int,
        default=None,
        help=f"random training subsets retrained on for the LDS (default: "
        f"{d['lds_subsets']}; --quick: {QUICK['lds_subsets']})",
    )
    p.add_argument(
        "--lds-fraction",
        type=float,
        default=d["lds_fraction"],
        help="fraction of the training set each LDS subset keeps (bernoulli: the "
        "probability that each example is kept)",
    )
    p.add_argument(
        "--lds-sampler",
        choices=LDS_SAMPLERS,
        default=d["lds_sampler"],
        help="fraction: every LDS subset keeps exactly that fraction; bernoulli: each "
        "example kept independently with that probability",
    )
    p.add_argument(
        "--mislabel-by",
        choices=("influence", "self"),
        default=d["mislabel_by"],
        help="rank suspected mislabeled examples by their (most negative) influence on the "
        "validation set, or by self influence",
    )
    p.add_argument(
        "--cache-dir",
        default=None,
        help="ground-truth retraining cache, reused by later runs with the same settings "
        "(default: OUT/cache)",
    )


def _seeds(text: str) -> tuple[int, ...]:
    """``--gt-seeds``: distinct integers separated by commas."""
    try:
        seeds = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers like 0,1,2, got {text!r}") from None
    if len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"the seeds must be distinct, got {text!r}")
    return seeds


def _compare_config(args: argparse.Namespace) -> CompareConfig:
    """The run's settings from the command line: every check before any work."""
    settings = dict(QUICK) if args.quick else {}
    for key in ("n_train", "n_val", "n_test", "epochs", "n_loo", "lds_subsets"):
        value = getattr(args, key)
        if value is not None:
            settings[key] = value
    methods = tuple(m.strip() for m in args.methods.split(",")) if args.methods else None
    dataset = _dataset(args)
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
        lds_sampler=args.lds_sampler,
        gt_seeds=args.gt_seeds,
        mislabel_by=args.mislabel_by,
        seed=args.seed,
        **({"methods": methods} if methods else {}),
        **settings,
    )
    check_training_settings(
        config.epochs, config.batch_size, config.lr, config.rho, config.weight_decay
    )
    return config


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
    config = _compare_config(args)
    with usage_errors():
        if args.cache_dir is not None:
            require_writable_dir(args.cache_dir, "--cache-dir")
    with out_lock(args.out, args.overwrite, "compare"):  # one command per --out at a time
        return _run_compare(args, config)


def _run_compare(args: argparse.Namespace, config: CompareConfig) -> int:
    """:func:`cmd_compare` once ``--out`` is checked and held."""
    from captum_sam.evaluation import compare
    from captum_sam.evaluation.report import findings, format_table

    if config.data_dir is not None:  # files on disk may be unreadable: before anything is removed
        from captum_sam.evaluation.setup import load_data

        load_data(config)
    make_out_ready(args.out, compare_layout(), args.overwrite)
    with work_started():
        results = compare.run_compare(
            config, args.out, show_progress=not args.no_progress, cache_dir=args.cache_dir
        )
    gt = results["ground_truth"]
    print()
    print(
        f"{args.model} on {results['data']['name']}, ground truth `{gt['mode']}`: "
        f"{PROTOCOLS[gt['mode']]} ({gt['retrain_seconds_mean']:.2f} s per retraining); "
        "test accuracy "
        f"{results['accuracy']['trained']:.3f}"
    )
    print(format_table(results["methods"]))
    notes = findings(results)
    if notes:
        print("\nworth a look (details in report.md):")
        print("\n".join(f"- {_first_sentence(note)}" for note in notes))
    print(
        f"\nreport: {args.out}/report.md, results.json and plots "
        f"({results['seconds_total']:.0f} s in all)"
    )
    failed = [r["label"] for r in results["methods"] if "error" in r]
    return ESTIMATOR_FAILED if failed else 0


def _first_sentence(text: str) -> str:
    """The first sentence of a finding (report.md has the rest: numbers and reasons)."""
    head, sep, _ = text.partition(". ")
    return head + "." if sep else text


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``captum-sam`` (imports no torch)."""
    parser = argparse.ArgumentParser(
        prog="captum-sam",
        description="Which training examples made a SAM-trained model behave as it does? "
        "SAM-aware influence estimators side by side with Captum's, judged against real "
        "retraining.",
        epilog="Start with `captum-sam compare --quick`; `captum-sam COMMAND --help` lists "
        "each command's options.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    train = _parser(
        sub,
        "train",
        help="train a model with SAM and record its trajectory",
        description=TRAIN_DESCRIPTION,
    )
    _add_training_args(train, compare=False)
    train.add_argument("--out", default="runs/train", help="directory of the recording")
    train.set_defaults(func=cmd_train)

    cmp = _parser(
        sub,
        "compare",
        help="SAM-aware vs Captum estimators against real retraining, side by side",
        description=COMPARE_DESCRIPTION,
        epilog=COMPARE_EPILOG,
    )
    _add_training_args(cmp, compare=True)
    _add_compare_args(cmp)
    cmp.add_argument(
        "--out", default="runs/compare", help="directory of report.md, results.json and plots"
    )
    cmp.set_defaults(func=cmd_compare)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``captum-sam`` command.

    Returns:
        The exit status: 0 on success; 3 when ``compare`` wrote its report but an
        estimator failed (its row and the report say why); 2 when the command line
        cannot be carried out as given (a bad value, a missing path, an ``--out`` that is
        not a directory, not writable, or not empty without ``--overwrite``: all checked
        before any work); 1 when the run fails after its work started (another
        ``OSError`` such as a full disk, or a file found corrupt on the way). Errors
        print one line ``captum-sam: error: <message>`` to stderr, or raise with the
        traceback when the environment variable ``CAPTUM_SAM_DEBUG`` is set (not
        ``0``). Any other exception is a bug and propagates with its traceback.
    """
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except RunFailed as err:
        if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
            raise
        print(f"captum-sam: error: {err}", file=sys.stderr)
        return 1
    except (UsageError, ValueError, TypeError, OSError) as err:
        if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
            raise
        print(f"captum-sam: error: {error_message(err)}", file=sys.stderr)
        runtime = isinstance(err, OSError) and not isinstance(err, FileNotFoundError)
        return 1 if runtime else 2


if __name__ == "__main__":
    sys.exit(main())
