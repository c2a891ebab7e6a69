"""Editing vs retraining: SAM-GIF's first-order and linearised edits against real replays.

The setting of the default ``captum-sam compare`` (digits, 1000 training examples with 10%
planted label noise, SAM rho 0.05, 30 epochs of batch 64, weight decay 1e-3, seed 0): the
edit forgets the planted-noise examples, and the reference retrains without them by
replaying the recorded schedule, under both removal conventions (``renormalise``: the
kept examples' mean, an emptied batch skipped; ``zero_weight``: removed examples weighted
0, batches still divided by |B_t|). Printed: test accuracy of the edited and retrained
models, the cosine and norm ratio of the edit's parameter change against the
retrained change (both from w_T), and the seconds of the edit and of the replay (the first
linearised edit includes re-running the recorded steps once; later edits reuse them).

    python benchmarks/bench_edit.py [--model mlp] [--rho 0.05] [--epochs 30]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from captum_sam import SAMTracInCP, SAMUnrolledGIF, load_trajectory, train_sam  # noqa: E402
from captum_sam.core.checkpoints import checkpoints_load_func  # noqa: E402
from captum_sam.data import load_dataset  # noqa: E402
from captum_sam.evaluation.config import default_lr  # noqa: E402
from captum_sam.evaluation.metrics import accuracy, loo_correlation, spearman  # noqa: E402
from captum_sam.models import build_model, training_dtype  # noqa: E402
from captum_sam.replay import replay_trajectory  # noqa: E402
from captum_sam.trajectory import Trajectory  # noqa: E402


def replay_without(model, data, loss_fn, traj: Trajectory, removed, removal: str):
    """The recorded schedule replayed without ``removed`` (a new model), by ``removal``."""
    renormalise = removal == "renormalise"
    return replay_trajectory(model, data, loss_fn, traj, removed, renormalise=renormalise)


def flat(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def score_check(model, data, loss, traj, n_loo: int, n_subsets: int, seed: int) -> None:
    """Aggregated scores vs replays: the change of the summed test loss (renormalise)."""
    test = data.test.tensors
    n = len(data.train)
    g = torch.Generator().manual_seed(seed + 7)
    sets = [[int(k)] for k in torch.randperm(n, generator=g)[:n_loo]]
    sets += [torch.randperm(n, generator=g)[: n // 2].tolist() for _ in range(n_subsets)]
    base = float(loss(model(test[0]), test[1]).detach().sum())
    actual = []
    for removed in sets:
        ref = replay_without(model, data.train, loss, traj, removed, "renormalise")
        actual.append(float(loss(ref(test[0]), test[1]).detach().sum()) - base)
    actual = torch.tensor(actual)
    start = time.perf_counter()
    unrolled = SAMUnrolledGIF(model, data.train, traj, loss_fn=loss).influence(test, aggregate=True)
    unrolled_s = time.perf_counter() - start
    first = SAMTracInCP.from_trajectory(model, data.train, traj, loss_fn=loss, batch_size=128)
    first_scores = first.influence(test, aggregate=True)
    print(f"aggregated scores (summed test loss), renormalise replays; unrolled {unrolled_s:.1f} s")
    print("| estimator | LOO Pearson | LOO Spearman | subsets Spearman |")
    print("|---|---|---|---|")
    for name, sc in (("SAM-GIF first order", first_scores), ("SAMUnrolledGIF", unrolled)):
        pred = torch.stack([sc[0, s].sum() for s in sets]).detach()
        loo, act = pred[:n_loo], actual[:n_loo]
        pearson, loo_spearman = loo_correlation(loo.numpy(), act.numpy())
        print(
            f"| {name} | {pearson:.3f} | {loo_spearman:.3f} | "
            f"{spearman(pred[n_loo:].numpy(), actual[n_loo:].numpy()):.3f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="logreg")
    parser.add_argument("--rho", type=float, default=0.05)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scores", action="store_true", help="also check aggregated scores")
    parser.add_argument("--n-loo", type=int, default=40)
    parser.add_argument("--subsets", type=int, default=20)
    parser.add_argument("--segment-curvatures", nargs="*", default=["ggn", "hessian"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    dtype = training_dtype(args.model)
    data = load_dataset("digits", None, 1000, 300, None, 0.1, args.seed, dtype)
    model = build_model(args.model, data.image_shape, data.num_classes, seed=args.seed, dtype=dtype)
    loss = torch.nn.CrossEntropyLoss(reduction="none")
    record = tempfile.mkdtemp(prefix="bench_edit_")
    lr = default_lr(args.model)
    train_sam(model, data.train, loss, epochs=args.epochs, lr=lr, rho=args.rho, batch_size=64,
              weight_decay=1e-3, record_dir=record, seed=args.seed, overwrite=True)  # fmt: skip
    traj = load_trajectory(record)
    removed = torch.nonzero(data.noisy).flatten().tolist()
    test = data.test.tensors
    w_t = flat(model)
    print(
        f"digits {args.model} ({w_t.numel()} parameters, {dtype}), rho {args.rho}, "
        f"{args.epochs} epochs x {len(traj.steps) // args.epochs} steps, lr {lr}; "
        f"removing the {len(removed)} planted-noise examples of {len(data.train)}; "
        f"original test accuracy {accuracy(model, test):.4f}"
    )
    if args.scores:
        score_check(model, data, loss, traj, args.n_loo, args.subsets, args.seed)
        return
    est = SAMTracInCP.from_trajectory(model, data.train, traj, loss_fn=loss, batch_size=128)

    def per_example(m, path):  # one epoch per checkpoint: weight eta/|B| per example
        return checkpoints_load_func(m, path) / 64

    ckpt = SAMTracInCP(model, data.train, [c.path for c in traj.checkpoints],
                       checkpoints_load_func=per_example, loss_fn=loss, batch_size=128,
                       rho=args.rho)  # fmt: skip
    steps = -(-len(data.train) // 64)
    edits = [("first_order", est, {}), ("linearised", est, {}),
             ("ckpt first_order", ckpt, {"method": "first_order"})]  # fmt: skip
    for curv in args.segment_curvatures:
        for k in (steps, None):
            opts = {"method": "segment", "curvature": curv, "steps_per_checkpoint": k,
                    "weight_decay": 1e-3}  # fmt: skip
            edits.append((f"ckpt segment {curv} K={k or 'inf'}", ckpt, opts))
    print(
        "| edit | removal | edit acc | retrained acc | gap | cosine | norm ratio | edit s "
        "| replay s |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for removal in ("renormalise", "zero_weight"):
        start = time.perf_counter()
        ref = replay_without(model, data.train, loss, traj, removed, removal)
        replay_s = time.perf_counter() - start
        true = flat(ref) - w_t
        ref_acc = accuracy(ref, test)
        for method, estimator, opts in edits:
            start = time.perf_counter()
            opts = {"method": method, **opts}
            edited = estimator.edited_model(removed, removal=removal, **opts)
            seconds = time.perf_counter() - start
            change = flat(edited) - w_t
            cos = float(torch.nn.functional.cosine_similarity(change, true, dim=0))
            acc = accuracy(edited, test)
            print(
                f"| {method} | {removal} | {acc:.4f} | {ref_acc:.4f} | {acc - ref_acc:+.4f} | "
                f"{cos:.3f} | {float(change.norm() / true.norm()):.3f} | {seconds:.1f} | "
                f"{replay_s:.1f} |"
            )


if __name__ == "__main__":
    main()
