"""SAM-GIF on a small CNN vs Captum's TracInCP: time and peak memory, measured in one run.

    python benchmarks/bench_cnn_gif.py [--n-train 2000] [--n-test 100] [--checkpoints 3]
        [--skip-loop] [--merge-budgets-mib 256 ...]

CIFAR-shaped random data (3x32x32, 10 classes), the CNN
Conv2d(3, 32, 3, padding=1)-ReLU-MaxPool2d(2)-Flatten-Linear(8192, 10) in float32,
``--checkpoints`` checkpoints (random weights; timing does not depend on training).
Each measurement runs in a fresh process, so its peak resident memory
(``ru_maxrss``) is its own; "added" is the peak minus the resident memory just before
the timed call. CPU seconds (user + system, all threads) are reported next to wall
seconds: on a machine shared with other work they move much less. Before the timed
call each process runs the same call once on one batch with a separate estimator
(lazy imports, first allocations), so the time is that of the computation; a fresh
estimator is then built and timed (nothing cached).
Ratios are Captum's time over ours, measured side by side in this run.
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
from torch.utils.data import TensorDataset

HERE = os.path.dirname(os.path.abspath(__file__))


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 16 * 16, 10),
    )


def write_checkpoints(directory: str, count: int) -> list[str]:
    torch.manual_seed(0)
    model, paths = cnn(), []
    for c in range(count):
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(0.9).add_(0.01 * torch.randn_like(p))
        path = os.path.join(directory, f"ckpt{c}.pt")
        torch.save({"model_state": model.state_dict(), "learning_rate": 0.1}, path)
        paths.append(path)
    return paths


def measure(spec: dict) -> dict:
    """Run one measurement in this process: ``{"seconds", "peak_mb", "added_mb", "scores"}``."""
    from captum.influence import TracInCP, TracInCPFast

    from captum_sam import checkpoints_load_func
    from captum_sam.gif.fast import SAMTracInCPFast
    from captum_sam.gif.tracincp import SAMTracInCP

    train, test = data(spec["n_train"], 0), data(spec["n_test"], 1)
    ckpts, bs = spec["ckpts"], spec["batch_size"]
    none, total = nn.CrossEntropyLoss(reduction="none"), nn.CrossEntropyLoss(reduction="sum")

    def call(train: TensorDataset, test: TensorDataset) -> torch.Tensor:
        if spec["who"] in ("ours-fast", "captum-fast"):  # the final layer's weight only
            model = cnn()
            kind = SAMTracInCPFast if spec["who"] == "ours-fast" else TracInCPFast
            extra = {"rho": spec["rho"]} if spec["who"] == "ours-fast" else {}
            est = kind(
                model, model[4], train, ckpts, checkpoints_load_func=checkpoints_load_func,
                loss_fn=total, batch_size=bs, **extra,
            )  # fmt: skip
        elif spec["who"] == "ours":
            est = SAMTracInCP(
                cnn(), train, ckpts, loss_fn=none, batch_size=bs, rho=spec["rho"],
                projection_dim=spec.get("projection_dim"),
            )  # fmt: skip
        else:
            hooks = spec["who"] == "captum-hooks"
            est = TracInCP(
                cnn(), train, ckpts, checkpoints_load_func=checkpoints_load_func,
                loss_fn=total if hooks else none, batch_size=bs,
                sample_wise_grads_per_batch=hooks,
            )  # fmt: skip
        return est.self_influence() if spec["what"] == "self" else est.influence(test.tensors)

    if "merge_budget" in spec:  # how many bytes merged self influence may keep
        from captum_sam.gif import checkpoint_form

        checkpoint_form.MERGE_BUDGET_BYTES = spec["merge_budget"]
    # warm-up on a few examples with another estimator: lazy imports, allocator
    timing, scores = warm_then_time(call, train, test, bs)
    return dict(timing, scores=scores.double().tolist())


def run(spec: dict) -> dict:
    """:func:`measure` in a fresh process (its own peak memory)."""
    return run_in_process(__file__, spec)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--n-train", type=int, default=2000)
    p.add_argument("--n-test", type=int, default=100)
    p.add_argument("--checkpoints", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--projection-dim", type=int, default=256)
    p.add_argument("--skip-loop", action="store_true", help="skip Captum's default loop")
    p.add_argument(
        "--merge-budgets-mib", type=int, nargs="*", default=[],
        help="extra self-influence rows with these MERGE_BUDGET_BYTES (MiB)",
    )  # fmt: skip
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(measure(json.loads(args.one))))
        return
    directory = tempfile.mkdtemp(prefix="captum_sam_bench_cnn_")
    base = dict(
        n_train=args.n_train, n_test=args.n_test, batch_size=args.batch_size,
        ckpts=write_checkpoints(directory, args.checkpoints),
    )  # fmt: skip
    who = [
        ("SAMTracInCP rho=0.05", dict(who="ours", rho=0.05)),
        (
            "SAMTracInCP rho=0.05, MERGE_BUDGET_BYTES=0 (3 passes)",
            dict(who="ours", rho=0.05, merge_budget=0),
        ),
        *(
            (
                f"SAMTracInCP rho=0.05, MERGE_BUDGET_BYTES={mib} MiB",
                dict(who="ours", rho=0.05, merge_budget=mib << 20),
            )
            for mib in args.merge_budgets_mib
        ),
        ("SAMTracInCP rho=0", dict(who="ours", rho=0.0)),
        (
            f"SAMTracInCP rho=0.05 projection_dim={args.projection_dim}",
            dict(who="ours", rho=0.05, projection_dim=args.projection_dim),
        ),
        ("Captum TracInCP hooks (sample_wise_grads_per_batch)", dict(who="captum-hooks")),
        ("SAMTracInCPFast rho=0.05 (final layer)", dict(who="ours-fast", rho=0.05)),
        ("SAMTracInCPFast rho=0 (final layer)", dict(who="ours-fast", rho=0.0)),
        ("Captum TracInCPFast (final layer)", dict(who="captum-fast")),
    ]
    if not args.skip_loop:
        who.append(("Captum TracInCP default loop", dict(who="captum-loop")))
    results = {}
    for what in ("self", "influence"):
        for label, spec in who:
            if what == "influence" and "merge_budget" in spec:
                continue  # self influence only
            results[what, label] = run({**base, **spec, "what": what})
            r = results[what, label]
            print(
                f"  {what:9s} {label}: {r['seconds']:.1f} s, peak {r['peak_mb']:.0f} MB", flush=True
            )
    hooks = "Captum TracInCP hooks (sample_wise_grads_per_batch)"
    fast = "Captum TracInCPFast (final layer)"
    n_params = sum(p.numel() for p in cnn().parameters())
    print(f"machine: {machine()}")
    print(
        f"CNN ({n_params} parameters, float32), {args.n_train} training and {args.n_test} test "
        f"examples (3x32x32), {args.checkpoints} checkpoints, batch size {args.batch_size}"
    )
    rows = []
    for (what, label), r in results.items():
        ref = results[what, fast if "Fast" in label else hooks]
        rows.append(
            (
                what, label, f"{r['seconds']:.1f}", f"{ref['seconds'] / r['seconds']:.2f}x",
                f"{r['cpu']:.1f}", f"{ref['cpu'] / r['cpu']:.2f}x",
                f"{r['peak_mb']:.0f}", f"{r['added_mb']:.0f}",
            )
        )  # fmt: skip
    header = (
        "call", "path", "wall s", "wall vs Captum", "CPU s", "CPU vs Captum", "peak MB",
        "added MB",
    )  # fmt: skip
    print(table(rows, header))
    print(
        "Captum column: Captum TracInCPFast for the final-layer rows, Captum TracInCP hooks "
        "for the others"
    )
    for what in ("self", "influence"):
        for ours_label, ref in (
            ("SAMTracInCP rho=0", hooks),
            ("SAMTracInCPFast rho=0 (final layer)", fast),
        ):
            ours = torch.tensor(results[what, ours_label]["scores"])
            theirs = torch.tensor(results[what, ref]["scores"])
            rel = float((ours - theirs).abs().max() / theirs.abs().max())
            print(f"{what}: {ours_label} vs {ref}, max difference / max |score| = {rel:.1e}")
        proj = next(k for k in results if k[0] == what and "projection" in k[1])
        exact = torch.tensor(results[what, "SAMTracInCP rho=0.05"]["scores"]).flatten()
        approx = torch.tensor(results[proj]["scores"]).flatten()
        corr = float(torch.corrcoef(torch.stack([exact, approx]))[0, 1])
        print(f"{what}: projected vs exact rho=0.05 scores, Pearson {corr:.3f}")


if __name__ == "__main__":
    main()
