"""Multi-process attribution on torch.distributed (gloo, CPU): time and agreement.

    python benchmarks/bench_distributed.py [--world 1 2] [--n-train 1000]

Spawns ``world`` processes with one thread each (gloo backend, file store), computes
SAM-GIF self influence and SAM-HIF(Fast, GGN, CG) influence on the digits MLP, and
reports wall time per world size and the largest difference from one process.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _common import machine, table, trained_digits

from captum_sam import SAMInfluenceFunction, SAMTracInCP, load_trajectory
from captum_sam.data import load_digits_data
from captum_sam.models import build_model

LOSS = torch.nn.CrossEntropyLoss(reduction="none")


def work(rank: int, world: int, directory: str, n_train: int) -> None:
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group(
            "gloo", init_method=f"file://{directory}/store-{world}", rank=rank, world_size=world
        )
    data = load_digits_data(n_train=n_train, dtype=torch.float64)  # as recorded by main()
    model = build_model("mlp", data.image_shape, data.num_classes)
    traj = load_trajectory(os.path.join(directory, "run"))
    ckpts = [c.path for c in traj.checkpoints]
    times, out = {}, {}
    # warm-up outside the timings: the first torch.func call of a process is slow
    SAMTracInCP(model, data.train, ckpts[:1], loss_fn=LOSS, factorize=False).self_influence()
    if world > 1:
        dist.barrier()
    start = time.perf_counter()
    out["gif"] = SAMTracInCP(
        model, data.train, ckpts, loss_fn=LOSS, batch_size=100
    ).self_influence()
    times["SAM-GIF self_influence"] = time.perf_counter() - start
    start = time.perf_counter()
    hif = SAMInfluenceFunction(
        model,
        data.train,
        traj.final.path,
        loss_fn=LOSS,
        batch_size=100,
        weight_decay=1e-3,
        damping=1e-3,
        variant="fast",
        projection_dim=None,  # the exact inverse: no rank cap,
        hessian_reg=0.0,  # no added regulariser,
        hessian_inverse_tol=None,  # no eigenvalue dropped
        curvature="ggn",
        solver="cg",
        solver_options={"tol": 1e-6},
    )
    out["hif"] = hif.influence(tuple(t[:50] for t in data.test.tensors))
    times["SAM-HIF(Fast) GGN cg influence(50)"] = time.perf_counter() - start
    if rank == 0:
        torch.save({"times": times, "out": out}, os.path.join(directory, f"world{world}.pt"))
    if world > 1:
        dist.barrier()  # no rank tears down while another still communicates
        dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--world", type=int, nargs="+", default=[1, 2])
    p.add_argument("--n-train", type=int, default=1000)
    args = p.parse_args()
    directory = tempfile.mkdtemp()
    trained_digits(
        n_train=args.n_train,
        epochs=5,
        dtype=torch.float64,
        record_dir=os.path.join(directory, "run"),
    )  # record once, shared
    results = {}
    for world in args.world:
        mp.spawn(work, args=(world, directory, args.n_train), nprocs=world, join=True)
        results[world] = torch.load(os.path.join(directory, f"world{world}.pt"))
    base = results[args.world[0]]
    rows = []
    for name in base["times"]:
        for world in args.world:
            t = results[world]["times"][name]
            key = "gif" if name.startswith("SAM-GIF") else "hif"
            diff = (results[world]["out"][key] - base["out"][key]).abs().max().item()
            rows.append(
                (name, str(world), f"{t:.2f}", f"{base['times'][name] / t:.2f}x", f"{diff:.1e}")
            )
    print(f"machine: {machine()} (one thread per process)")
    print(table(rows, ("work", "processes", "seconds", "speed-up", "max |difference|")))


if __name__ == "__main__":
    main()
