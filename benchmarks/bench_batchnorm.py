"""BatchNorm: how far eval mode is from what training saw, and what ``batchnorm="batch"`` recovers.

A short SAM run of ResNet-18 (32x32 stem, float32) on generated CIFAR-shaped data,
recorded; then, at every checkpoint, the mean loss on recorded batches in eval mode
(running statistics) and in train mode (batch statistics), and at the perturbed
weights :math:`w_t + \\epsilon_t` of the first recorded step at the last checkpoint,
the cosine of three per-example gradients with the train-mode one (statistics
differentiated, what training backpropagated for that example):

* eval: running statistics (``batchnorm="eval"``),
* batch: the recorded batch's statistics held constant (``batchnorm="batch"``), as the
  estimator computes it (checked against autograd);

and the same cosines for the sums over the whole recorded batch.

Usage: ``python benchmarks/bench_batchnorm.py [--n 320] [--epochs 3] [--examples 8]``.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
import warnings

import torch
import torch.nn.functional as nnf

from captum_sam import SAMTracInCP, train_sam
from captum_sam.core.batchnorm import BatchStatistics, batchnorm_layers
from captum_sam.data import load_synthetic_cifar
from captum_sam.models import build_model


def flat(grads: dict, names: list[str]) -> torch.Tensor:
    return torch.cat([grads[n].reshape(-1) for n in names])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=320)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--examples", type=int, default=8)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--rho", type=float, default=0.05)
    args = parser.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}")
    data = load_synthetic_cifar(n_train=args.n, n_val=1, n_test=64, dtype=torch.float32)
    model = build_model("resnet18", data.image_shape, 10, dtype=torch.float32)
    loss_fn = torch.nn.CrossEntropyLoss(reduction="none")
    with tempfile.TemporaryDirectory() as tmp:
        run = os.path.join(tmp, "run")
        start = time.perf_counter()
        steps = args.epochs * -(-args.n // args.batch_size)
        train_sam(model, data.train, loss_fn, epochs=args.epochs, lr=args.lr, rho=args.rho,
                  batch_size=args.batch_size, momentum=0.9, record_dir=run,
                  save_every=max(1, steps // 3))  # fmt: skip
        print(
            f"ResNet-18, synthetic-cifar n={args.n}, {args.epochs} epochs of batch "
            f"{args.batch_size}, lr {args.lr}, momentum 0.9, rho {args.rho}: "
            f"{steps} steps in {time.perf_counter() - start:.0f} s"
        )
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            est = SAMTracInCP.from_trajectory(
                model, data.train, run, loss_fn=loss_fn, batchnorm="batch", batch_size=16
            )
        e = est.engines
        scratch = e.loader.scratch
        stats = BatchStatistics(batchnorm_layers(scratch))
        print("\n| checkpoint | eval-mode loss | train-mode loss | relative gap |")
        print("|---|---|---|---|")
        for ckpt in dict.fromkeys(t.checkpoint for t in e.terms):
            state = e.loader(ckpt)
            batches = [e.points.fetch(t.indices) for t in e.terms if t.checkpoint == ckpt][:4]
            count = sum(len(b[1]) for b in batches)
            losses = {}
            for mode, floss in (("eval", e.quantities.train_loss), ("train", e.points.loss)):
                bound = floss.bind(state.frozen)  # e.points.loss runs in train mode
                with torch.no_grad():
                    losses[mode] = sum(float(bound.summed_loss(state.params, b)) for b in batches)
            ev, tr = losses["eval"] / count, losses["train"] / count
            print(f"| {os.path.basename(ckpt)} | {ev:.3f} | {tr:.3f} | {abs(ev - tr) / tr:.3g} |")
        print(f"\nwarnings at construction: {sum('BatchNorm' in str(w.message) for w in caught)}")

        # per-example gradients at w_t + eps_t of the first step at the last checkpoint
        last = e.terms[-1].checkpoint
        term = next(t for t in e.terms if t.checkpoint == last)
        batch = e.points.fetch(term.indices)
        eps = e.points.eps([term])
        moved, moved_frozen = e.points.moved([term], eps)
        w = {n: v[0] for n, v in moved.items()}
        fr = {n: v[0] for n, v in moved_frozen.items()}
        names = list(w)
        x, y = batch
        sub = (x[: args.examples], y[: args.examples])
        lib = e.vmap.grads([term], sub, e.quantities.train_loss, False, True, project=False)[1]
        batch_fr = stats.stacked_frozen(
            e.quantities.train_loss, {n: v[None] for n, v in w.items()},
            {n: v[None] for n, v in fr.items()}, batch,
        )  # fmt: skip
        batch_fr = {n: v[0] for n, v in batch_fr.items()}
        train_loss = stats.train_loss(e.quantities.train_loss)
        rows = []
        for k in range(args.examples):
            leaves = {n: v.detach().clone().requires_grad_(True) for n, v in w.items()}
            out = train_loss.bind(fr).outputs(leaves, (x,))  # train mode, whole batch
            g_train = torch.autograd.grad(nnf.cross_entropy(out[k : k + 1], y[k : k + 1]),
                                          list(leaves.values()))  # fmt: skip
            g_train = torch.cat([g.reshape(-1) for g in g_train])
            grads = {}
            for mode, frozen in (("eval", fr), ("batch", batch_fr)):
                leaves = {n: v.detach().clone().requires_grad_(True) for n, v in w.items()}
                out = e.quantities.train_loss.bind(frozen).outputs(leaves, (x[k : k + 1],))
                g = torch.autograd.grad(nnf.cross_entropy(out, y[k : k + 1]), list(leaves.values()))
                grads[mode] = torch.cat([t.reshape(-1) for t in g])
            g_lib = torch.cat([lib[n][0, k].reshape(-1) for n in names])
            cos = {m: float(nnf.cosine_similarity(g, g_train, dim=0)) for m, g in grads.items()}
            rel = float((g_lib - grads["batch"]).norm() / grads["batch"].norm())
            rows.append((cos["eval"], cos["batch"], rel))
            print(
                f"example {k}: cos(eval, train) {cos['eval']:.3f}  cos(batch, train) "
                f"{cos['batch']:.3f}  |estimator - autograd| / |autograd| (batch) {rel:.1e}"
            )
        # the batch sums: train mode's batch gradient against the two modes' sums
        sums = {}
        for mode, floss, frozen in (
            ("train", train_loss, fr),
            ("eval", e.quantities.train_loss, fr),
            ("batch", e.quantities.train_loss, batch_fr),
        ):
            leaves = {n: v.detach().clone().requires_grad_(True) for n, v in w.items()}
            out = floss.bind(frozen).outputs(leaves, (x,))
            total = nnf.cross_entropy(out, y, reduction="sum")
            g = torch.autograd.grad(total, list(leaves.values()))
            sums[mode] = torch.cat([t.reshape(-1) for t in g])
        batch_cos = {
            m: float(nnf.cosine_similarity(sums[m], sums["train"], dim=0))
            for m in ("eval", "batch")
        }
        print(
            f"batch sums (all {len(y)} examples): cos(eval, train) {batch_cos['eval']:.3f}, "
            f"cos(batch, train) {batch_cos['batch']:.3f}"
        )
        mean = [sum(r[i] for r in rows) / len(rows) for i in range(3)]
        print(
            f"\nmean over {len(rows)} examples of a recorded batch of {len(y)} at "
            f"{os.path.basename(last)} + eps: cos(eval, train) {mean[0]:.3f}, "
            f"cos(batch, train) {mean[1]:.3f}; estimator vs autograd (batch) max rel. "
            f"diff {max(r[2] for r in rows):.1e}"
        )


if __name__ == "__main__":
    main()
