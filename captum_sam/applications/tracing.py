"""Proponents and opponents of test predictions, drawn as image grids."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from captum_sam.core.data import fetch_batch

__all__ = ["TraceResult", "trace", "plot_trace"]


@dataclass
class TraceResult:
    """Most helpful and most harmful training examples per test example.

    All tensors are ``(n_test, k)``; helpful scores are the highest influence
    scores (best first), harmful the lowest (most negative first).
    """

    helpful: Tensor
    helpful_scores: Tensor
    harmful: Tensor
    harmful_scores: Tensor


def trace(
    estimator: Any, test_batch: tuple[Any, ...], k: int = 5, show_progress: bool = False
) -> TraceResult:
    """Proponents and opponents of every example in ``test_batch``.

    Args:
        estimator: Any Captum-style estimator (``influence(inputs, k=...)``).
        test_batch: ``(features..., labels)``.
        k: Examples per side.
        show_progress: Progress bars.
    """
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"`k` must be a positive int, got {k!r}")
    pro = estimator.influence(test_batch, k=k, proponents=True, show_progress=show_progress)
    con = estimator.influence(test_batch, k=k, proponents=False, show_progress=show_progress)
    return TraceResult(pro.indices, pro.influence_scores, con.indices, con.influence_scores)


def _image(x: Tensor, image_shape: Sequence[int] | None) -> Any:
    img = x.detach().cpu().to(torch.float32)
    if image_shape is not None:
        img = img.reshape(*image_shape)
    if img.dim() == 3 and img.shape[0] in (1, 3):
        img = img.permute(1, 2, 0)
    if img.dim() == 3 and img.shape[-1] == 1:
        img = img[..., 0]
    if img.dim() == 1:
        side = int(round(img.numel() ** 0.5))
        if side * side != img.numel():
            raise ValueError("cannot draw a non-square flat input: pass `image_shape`")
        img = img.reshape(side, side)
    lo, hi = float(img.min()), float(img.max())
    return ((img - lo) / (hi - lo if hi > lo else 1.0)).numpy()


def plot_trace(
    result: TraceResult,
    test_batch: tuple[Any, ...],
    train_dataset: Dataset,
    path: str | os.PathLike[str],
    predictions: Tensor | None = None,
    image_shape: Sequence[int] | None = None,
    class_names: Sequence[str] | None = None,
    noisy: Tensor | None = None,
    title: str | None = None,
) -> str:
    """Draw one row per test example: the example, its helpful and harmful examples.

    Args:
        result: From :func:`trace`.
        test_batch: The traced batch; its first element holds the images.
        train_dataset: The training set the indices refer to.
        path: PNG file to write.
        predictions: Predicted classes of the test examples (shown in titles).
        image_shape: Shape to reshape flat inputs to, e.g. ``(1, 8, 8)``.
        class_names: Label names.
        noisy: Boolean mask of training examples with a planted wrong label
            (marked "noisy" in the titles).
        title: Figure title.

    Returns:
        The path written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_test, k = result.helpful.shape
    name = (lambda c: class_names[int(c)]) if class_names else (lambda c: str(int(c)))
    cols = 1 + 2 * k
    fig, axes = plt.subplots(
        n_test, cols, figsize=(1.25 * cols, 1.55 * n_test + 0.6), squeeze=False
    )
    x_test, y_test = test_batch[0], test_batch[-1]
    for i in range(n_test):
        ax = axes[i, 0]
        ax.imshow(_image(x_test[i], image_shape), cmap="gray")
        label = f"test y={name(y_test[i])}"
        if predictions is not None:
            label += f"\npred={name(predictions[i])}"
        ax.set_title(label, fontsize=7, color="black")
        for side, (idx, scores, color) in enumerate(
            [
                (result.helpful, result.helpful_scores, "tab:green"),
                (result.harmful, result.harmful_scores, "tab:red"),
            ]
        ):
            rows = fetch_batch(train_dataset, idx[i].tolist())
            for j in range(k):
                ax = axes[i, 1 + side * k + j]
                ax.imshow(_image(rows[0][j], image_shape), cmap="gray")
                tag = " noisy" if noisy is not None and bool(noisy[idx[i, j]]) else ""
                ax.set_title(
                    f"#{int(idx[i, j])} y={name(rows[-1][j])}{tag}\n{float(scores[i, j]):+.2g}",
                    fontsize=6,
                    color=color,
                )
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(
        title or f"test example | {k} most helpful (green) | {k} most harmful (red)", fontsize=9
    )
    fig.tight_layout()
    path = os.fspath(path)
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path
