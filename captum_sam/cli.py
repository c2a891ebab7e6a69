"""The ``captum-sam`` command."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import torch

__all__ = ["main"]


def _accuracy(model: torch.nn.Module, dataset: torch.utils.data.TensorDataset) -> float:
    x, y = dataset.tensors
    was = model.training
    model.eval()
    with torch.no_grad():
        acc = (model(x).argmax(dim=1) == y).double().mean().item()
    model.train(was)
    return acc


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
    from captum_sam.models import build_model
    from captum_sam.trajectory import train_sam

    data = load_digits_data(n_train=args.n_train, noise=args.noise, seed=args.seed)
    model = build_model(args.model, data.image_shape, data.num_classes, seed=args.seed)
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
        overwrite=True,
    )
    train_acc = _accuracy(model, data.train)
    print(
        f"data: digits, {len(data.train)} train ({int(data.noisy.sum())} noisy labels), "
        f"{len(data.test)} test"
    )
    print(
        f"model: {args.model}, SAM rho={args.rho}, {args.epochs} epochs, "
        f"final loss {result.epoch_losses[-1]:.4f}"
    )
    print(f"train accuracy (given labels): {train_acc:.4f}")
    print(f"test accuracy: {_accuracy(model, data.test):.4f}")
    print(f"trajectory recorded in {result.record_dir}")
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
    train.set_defaults(func=cmd_train)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``captum-sam`` command."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"captum-sam: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
