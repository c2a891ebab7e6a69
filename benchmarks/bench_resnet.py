"""ResNet-18 on CIFAR-shaped data: SAM-GIF and SAM-HIF(Fast) EK-FAC time and peak memory.

    python benchmarks/bench_resnet.py [--n-train 2000] [--n-test 100] [--rows gif-self,...]

The setting of issue 15's ResNet target: ``captum_sam.models.ResNet18`` (torchvision's
ResNet-18 with a 32x32 stem, 11.2M parameters, float32), random 3x32x32 inputs with 10
classes (timing does not depend on the data), 3 checkpoints (random weights moved a
little each time; BatchNorm running statistics from train-mode passes over 256
examples, then eval mode, ``batchnorm="eval"``), batch size 64. Rows (each in a fresh
process, so its peak resident memory is its own; a warm-up call on one batch first):

* ``gif-self`` / ``gif-influence``: ``SAMTracInCP`` (rho 0.05), every parameter (the
  BatchNorm ones included), self influence of the training set / influence on the test
  set;
* ``gif-self-layers`` / ``gif-self-layers-rho0`` / ``captum-self-layers``: the same self
  influence on the convolution and linear layers only (``layers=``), ours at rho 0.05
  and at rho 0 (plain TracIn: must equal Captum's) and Captum's
  ``TracInCP(sample_wise_grads_per_batch=True)`` (whose hooks take only those layers);
  ``gif-influence-layers`` / ``gif-influence-layers-rho0`` / ``captum-influence-layers``:
  the same three on influence on the test set;
* ``gif-influence-proj`` / ``gif-self-proj``: ``gif-influence`` / ``gif-self`` with
  ``projection_dim=2048`` (per layer from the factors, Kronecker style, BatchNorm
  parameters by a dense Gaussian);
* ``fast-self`` / ``fast-self-rho0`` / ``captum-fast-self`` / ``fast-influence`` /
  ``captum-fast-influence``: the final layer's weight only, ``SAMTracInCPFast`` (rho 0.05
  with the perturbation of every parameter, as training made it, and rho 0) against
  Captum's ``TracInCPFast`` (reducing loss, same batch size);
  ``fast-self-attributed`` / ``fast-influence-attributed``: rho 0.05 with
  ``perturbation_scope="attributed"`` (the final layer's weight alone perturbed, an
  approximation: no backward pass through the network);
* ``captum-arnoldi``: Captum's ``ArnoldiInfluenceFunction`` on the convolution and
  linear layers with ``--arnoldi-dim`` Arnoldi steps (Captum's default 200 is hours
  here: run a few and read the set-up time per step, reported as ``setup s``; top
  ``min(50, steps - 1)`` directions), set-up plus influence on the test set;
* ``hif-fast-ekfac``: ``SAMInfluenceFunction(variant="fast", curvature="ekfac")`` on the
  convolution and linear layers (K-FAC has no BatchNorm factors: they are refused by
  name), set-up (factors and eigen-corrections over the training set) plus influence
  on the test set, with the exact inverse in each layer's Kronecker eigenbasis
  (``projection_dim=None``; Captum's default of 50 top directions would form a
  ``P x 50`` matrix, 2.2 GB here); ``hif-fast-ekfac-sampled``: the same with
  ``kfac_samples=1`` (one random-sign pseudo-gradient per example instead of 10).

Issue 15's target: each of SAM-GIF (3 checkpoints) and SAM-HIF(Fast) EK-FAC under 10
minutes and 4 GB on 2 CPU cores at n 2000 and 100 test examples. For EK-FAC,
``--test-budget-gib`` sets how much of the solved test rows (45 MB each, 4.5 GB in all)
is held at once, hence how many passes over the training data ``influence`` makes
(each over a group of layers; the library's default is 1 GiB).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch
from _common import cifar_like as data
from _common import machine, run_in_process, table, warm_then_time
from torch import nn
from torch.utils.data import TensorDataset

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

ROWS = (
    "gif-self", "gif-influence", "gif-self-layers", "gif-self-layers-rho0", "captum-self-layers",
    "hif-fast-ekfac", "hif-fast-ekfac-sampled", "gif-influence-proj", "gif-self-proj",
    "fast-self", "fast-self-rho0", "captum-fast-self", "fast-influence", "captum-fast-influence",
    "fast-self-attributed", "fast-influence-attributed", "gif-influence-layers",
    "gif-influence-layers-rho0", "captum-influence-layers", "captum-arnoldi",
)  # fmt: skip


PROJECTION = 2048  # projection_dim of the *-proj rows


def resnet() -> nn.Module:
    from captum_sam.models import build_model

    # eval mode: Captum uses the model as given (a train-mode BatchNorm would normalise with
    # each scoring batch's statistics); captum_sam's estimators attribute in eval mode
    return build_model("resnet18", (3, 32, 32), 10, seed=0, dtype=torch.float32).eval()


def kernel_layers(model: nn.Module) -> list[str]:
    """The convolution and linear layers (what K-FAC and Captum's hooks take)."""
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def write_checkpoints(directory: str, count: int) -> list[str]:
    torch.manual_seed(0)
    model, paths = resnet(), []
    x = data(256, 9).tensors[0]
    with torch.no_grad():
        model.train()
        for i in range(0, len(x), 64):  # running statistics of real activations
            model(x[i : i + 64])
    for c in range(count):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.001 * torch.randn_like(p))
        path = os.path.join(directory, f"ckpt{c}.pt")
        torch.save({"model_state": model.state_dict(), "learning_rate": 0.1}, path)
        paths.append(path)
    return paths


def measure(spec: dict) -> dict:
    """One row in this process: seconds, CPU seconds, peak and added MB, a score summary."""
    from captum.influence import TracInCP, TracInCPFast

    from captum_sam import SAMInfluenceFunction, SAMTracInCPFast, checkpoints_load_func
    from captum_sam.gif.tracincp import SAMTracInCP

    train, test = data(spec["n_train"], 0), data(spec["n_test"], 1)
    ckpts, bs, row = spec["ckpts"], spec["batch_size"], spec["row"]
    none = nn.CrossEntropyLoss(reduction="none")
    layers = kernel_layers(resnet())

    def call(train: TensorDataset, test: TensorDataset) -> torch.Tensor:
        if "fast-" in row and not row.startswith("hif"):  # the final layer's weight only
            model, total = resnet(), nn.CrossEntropyLoss(reduction="sum")
            if row.startswith("captum"):
                est = TracInCPFast(model, model.fc, train, ckpts, checkpoints_load_func,
                                   loss_fn=total, batch_size=bs)  # fmt: skip
            else:
                scope = "attributed" if row.endswith("attributed") else "trainable"
                est = SAMTracInCPFast(model, model.fc, train, ckpts, loss_fn=total,
                                      batch_size=bs, rho=0.0 if row.endswith("rho0") else 0.05,
                                      perturbation_scope=scope,
                                      batchnorm_tolerance=None)  # fmt: skip
            return est.influence(test.tensors) if "influence" in row else est.self_influence()
        if row.startswith("gif"):
            est = SAMTracInCP(resnet(), train, ckpts, loss_fn=none, batch_size=bs,
                              rho=0.0 if row.endswith("rho0") else 0.05,
                              layers=layers if "layers" in row else None,
                              projection_dim=PROJECTION if row.endswith("proj") else None,
                              batchnorm_tolerance=None)  # fmt: skip
            if row.startswith("gif-influence"):
                return est.influence(test.tensors)
            return est.self_influence()
        if row.startswith("captum-") and row.endswith("-layers"):
            est = TracInCP(resnet(), train, ckpts, checkpoints_load_func=checkpoints_load_func,
                           loss_fn=nn.CrossEntropyLoss(reduction="sum"), batch_size=bs,
                           layers=layers, sample_wise_grads_per_batch=True)  # fmt: skip
            return est.influence(test.tensors) if "influence" in row else est.self_influence()
        if row == "captum-arnoldi":
            from captum_sam._captum import ArnoldiInfluenceFunction

            steps, start = spec["arnoldi_dim"], time.perf_counter()
            est = ArnoldiInfluenceFunction(resnet(), train, ckpts[-1], checkpoints_load_func,
                                           layers=layers, loss_fn=none, batch_size=bs,
                                           arnoldi_dim=steps,
                                           projection_dim=min(50, steps - 1))  # fmt: skip
            setup["seconds"] = time.perf_counter() - start
            return est.influence(test.tensors)
        samples = 1 if row.endswith("sampled") else None
        est = SAMInfluenceFunction(resnet(), train, ckpts[-1], loss_fn=none, batch_size=bs,
                                   rho=0.05, variant="fast", curvature="ekfac",
                                   layers=layers, projection_dim=None,
                                   kfac_samples=samples)  # fmt: skip
        return est.influence(test.tensors)

    if spec.get("test_budget_gib"):  # the Hessian family's test-row budget (default 1 GiB)
        from captum_sam.hif import sides

        sides.TEST_BUDGET_BYTES = int(spec["test_budget_gib"] * (1 << 30))
    setup: dict = {}  # Captum Arnoldi's set-up time (of the timed call: the last one)
    timing, scores = warm_then_time(call, train, test, bs)
    return dict(timing, finite=bool(torch.isfinite(scores).all()), shape=list(scores.shape),
                scores=scores.double().flatten()[:2000].tolist(),
                setup_seconds=setup.get("seconds"))  # fmt: skip


def run(spec: dict) -> dict:
    """:func:`measure` in a fresh process (its own peak memory)."""
    return run_in_process(__file__, spec)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--n-train", type=int, default=2000)
    p.add_argument("--n-test", type=int, default=100)
    p.add_argument("--checkpoints", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of {ROWS}")
    p.add_argument(
        "--test-budget-gib", type=float, default=None,
        help="captum_sam.hif.sides.TEST_BUDGET_BYTES in GiB (default: the library's 1 GiB)",
    )  # fmt: skip
    p.add_argument("--arnoldi-dim", type=int, default=200, help="captum-arnoldi's steps")
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(measure(json.loads(args.one))))
        return
    rows = [r for r in args.rows.split(",") if r]
    unknown = sorted(set(rows) - set(ROWS))
    if unknown:
        raise SystemExit(f"unknown rows {unknown}; choose from {ROWS}")
    ckpts = write_checkpoints(tempfile.mkdtemp(prefix="bench_resnet_"), args.checkpoints)
    print(
        f"machine: {machine()}; ResNet-18 (32x32 stem, float32); n_train {args.n_train}, "
        f"n_test {args.n_test}, {args.checkpoints} checkpoints, batch {args.batch_size}, "
        f"test-row budget {args.test_budget_gib or 1} GiB"
    )
    results, out = {}, []
    for row in rows:
        spec = dict(row=row, n_train=args.n_train, n_test=args.n_test, ckpts=ckpts,
                    batch_size=args.batch_size, test_budget_gib=args.test_budget_gib,
                    arnoldi_dim=args.arnoldi_dim)  # fmt: skip
        r = results[row] = run(spec)
        out.append((row, f"{r['seconds']:.1f}", f"{r['cpu']:.1f}", f"{r['peak_mb']:.0f}",
                    f"{r['added_mb']:.0f}", str(r["finite"])))  # fmt: skip
        print(out[-1], flush=True)
        if r.get("setup_seconds") is not None:
            print(f"  {row}: set-up {r['setup_seconds']:.1f} s for {args.arnoldi_dim} steps")
    print(table(out, ("row", "wall s", "CPU s", "peak MB", "added MB", "finite")))
    pairs = [(f"gif-{c}-layers-rho0", f"captum-{c}-layers") for c in ("self", "influence")]
    pairs += [("fast-self-rho0", "captum-fast-self"), ("fast-self", "captum-fast-self"),
              ("fast-influence", "captum-fast-influence"),
              ("fast-self-attributed", "captum-fast-self"),
              ("fast-influence-attributed", "captum-fast-influence")]  # fmt: skip
    for ours, theirs in pairs:
        if ours in results and theirs in results:
            a, b = (torch.tensor(results[k]["scores"]) for k in (ours, theirs))
            diff = float((a - b).abs().max() / b.abs().max())
            ratio = results[theirs]["seconds"] / results[ours]["seconds"]
            print(
                f"{ours} vs {theirs}: Captum time / ours {ratio:.2f}x; max difference / "
                f"max |score| {diff:.1e}"
            )
    for call in ("self", "influence"):
        ours, theirs = f"gif-{call}-layers", f"captum-{call}-layers"
        if ours in results and theirs in results:
            a, b = (torch.tensor(results[k]["scores"]) for k in (ours, theirs))
            corr = torch.corrcoef(torch.stack([a, b]))[0, 1]
            ratio = results[theirs]["seconds"] / results[ours]["seconds"]
            print(
                f"{call} on the same layers: Captum time / ours {ratio:.2f}x; Pearson of the "
                f"scores (ours at rho 0.05, Captum plain TracIn) {float(corr):.3f}"
            )


if __name__ == "__main__":
    main()
