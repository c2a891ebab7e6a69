"""Shared set-up for the benchmark scripts: a SAM-trained digits model with checkpoints."""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import torch
from torch.utils.data import TensorDataset

from captum_sam import load_trajectory, train_sam
from captum_sam.data import load_digits_data
from captum_sam.models import build_model


def machine() -> str:
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )


def trained_digits(
    model_name: str = "mlp",
    n_train: int = 1000,
    epochs: int = 5,
    dtype: torch.dtype = torch.float32,
    rho: float = 0.05,
    seed: int = 0,
    record_dir: str | None = None,
):
    data = load_digits_data(n_train=n_train, dtype=dtype, seed=seed)
    model = build_model(model_name, data.image_shape, data.num_classes, seed=seed, dtype=dtype)
    record_dir = record_dir or tempfile.mkdtemp(prefix="captum_sam_bench_")
    train_sam(
        model,
        data.train,
        torch.nn.CrossEntropyLoss(reduction="none"),
        epochs=epochs,
        lr=0.5,
        rho=rho,
        batch_size=64,
        weight_decay=1e-3,
        record_dir=record_dir,
        seed=seed,
        overwrite=True,
    )
    return data, model, load_trajectory(record_dir)


def timed(fn: Callable[[], object], repeats: int = 3) -> tuple[float, object]:
    """Median wall time over ``repeats`` runs, and the last result."""
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def table(rows: list[tuple[str, ...]], header: tuple[str, ...]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join(
        [
            line(header),
            "|" + "|".join("-" * (w + 2) for w in widths) + "|",
            *[line(r) for r in rows],
        ]
    )


def rss_mb() -> float:
    """Peak resident memory of this process in MB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_seconds() -> float:
    """User and system CPU time of this process (all its threads)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def warm_then_time(
    call: Callable[..., torch.Tensor], train: TensorDataset, test: TensorDataset, warm_size: int
) -> tuple[dict, torch.Tensor]:
    """``call(train, test)``, timed after a warm-up call on the first ``warm_size``
    training and 2 test examples.

    Returns ``{"seconds", "cpu", "peak_mb", "added_mb"}`` of the timed call (peak
    resident memory of this process; "added" over the memory just before it) and its
    scores.
    """
    call(TensorDataset(*train[:warm_size]), TensorDataset(*test[:2]))  # imports, allocator
    before = rss_mb()
    start, cpu = time.perf_counter(), cpu_seconds()
    scores = call(train, test)
    seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu
    peak = rss_mb()
    return dict(seconds=seconds, cpu=cpu, peak_mb=peak, added_mb=peak - before), scores


def run_in_process(script: str, spec: dict) -> dict:
    """``script --one <spec>`` in a fresh process (its own peak memory); its last JSON line."""
    out = subprocess.run(
        [sys.executable, os.path.abspath(script), "--one", json.dumps(spec)],
        check=True, capture_output=True, text=True, cwd=os.path.dirname(os.path.abspath(script)),
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def cifar_like(n: int, seed: int) -> TensorDataset:
    """``n`` random CIFAR-shaped examples (3x32x32, 10 classes), seeded."""
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(
        torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)
    )
