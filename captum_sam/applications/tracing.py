"""Proponents and opponents of test predictions, drawn as image grids."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from captum_sam.core.data import fetch_batch
from captum_sam.core.errors import check_k
from captum_sam.core.files import atomic_write

__all__ = ["TraceResult", "trace", "trace_figure", "plot_trace"]


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
    k = check_k(k)  # numpy and tensor integers too, as `influence` takes them
    if k < 1:
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


def _train_caption(
    index: int, given: int, clean_labels: Tensor | None, noisy: Tensor | None, name: Any
) -> str:
    """``label 3`` when the trained-on label is the true one, else ``given 3 (true 5)``."""
    if clean_labels is not None:
        true = int(clean_labels[index])
        return (
            f"label {name(given)}" if true == given else f"given {name(given)} (true {name(true)})"
        )
    if noisy is not None:
        return f"given {name(given)} (noisy)" if bool(noisy[index]) else f"label {name(given)}"
    return f"given {name(given)}"


def _caption(k: int, clean_labels: Tensor | None, noisy: Tensor | None) -> str:
    """What the colours and the label wording of :func:`trace_figure` mean."""
    colours = (
        f"Green: the {k} most helpful training examples (highest influence scores); "
        f"red: the {k} most harmful (most negative scores)."
    )
    if clean_labels is not None:
        labels = (
            '"given 3 (true 5)": trained on label 3, a planted wrong label whose true class '
            'is 5; "label 3": given and true label agree.'
        )
    elif noisy is not None:
        labels = '"given 3 (noisy)": trained on a planted wrong label 3; "label 3": a clean one.'
    else:
        labels = '"given": the label the model was trained on.'
    return f"{colours} {labels}"


def _draw_examples(
    axes: Sequence[Any],
    train_dataset: Dataset,
    indices: Tensor,
    scores: Tensor,
    color: str,
    image_shape: Sequence[int] | None,
    caption: Callable[[int, int], str],
) -> None:
    """Training examples ``indices`` (k,) in ``axes``, titled in ``color``."""
    batch = fetch_batch(train_dataset, indices.tolist())
    images, labels = batch[0], batch[-1]
    for ax, index, score, image, given in zip(axes, indices, scores, images, labels):
        ax.imshow(_image(image, image_shape), cmap="gray")
        ax.set_title(
            f"{caption(int(index), int(given))}\n#{int(index)}, score {float(score):+.2g}",
            fontsize=9,
            color=color,
        )
        for spine in ax.spines.values():
            spine.set(color=color, linewidth=2)


def trace_figure(
    result: TraceResult,
    test_batch: tuple[Any, ...],
    train_dataset: Dataset,
    predictions: Tensor | None = None,
    image_shape: Sequence[int] | None = None,
    class_names: Sequence[str] | None = None,
    noisy: Tensor | None = None,
    title: str | None = None,
    clean_labels: Tensor | None = None,
) -> Any:
    """The figure of :func:`plot_trace` (a matplotlib ``Figure``; same arguments)."""
    from matplotlib.figure import Figure

    n_test, k = result.helpful.shape
    name = (lambda c: class_names[int(c)]) if class_names else (lambda c: str(int(c)))
    fig = Figure(figsize=(1.7 * (1 + 2 * k), 2.0 * n_test + 1.4), layout="constrained")
    axes = fig.subplots(n_test, 1 + 2 * k, squeeze=False)
    x_test, y_test = test_batch[0], test_batch[-1]
    caption = lambda index, given: _train_caption(index, given, clean_labels, noisy, name)  # noqa: E731
    for i in range(n_test):
        axes[i, 0].imshow(_image(x_test[i], image_shape), cmap="gray")
        label = f"test: true {name(y_test[i])}"
        if predictions is not None:
            label += f",\npredicted {name(predictions[i])}"
        axes[i, 0].set_title(label, fontsize=9, color="black")
        helpful = (result.helpful[i], result.helpful_scores[i], "tab:green")
        harmful = (result.harmful[i], result.harmful_scores[i], "tab:red")
        _draw_examples(axes[i, 1 : 1 + k], train_dataset, *helpful, image_shape, caption)
        _draw_examples(axes[i, 1 + k :], train_dataset, *harmful, image_shape, caption)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(
        title or f"Test examples, their {k} most helpful and {k} most harmful training examples",
        fontsize=10,
    )
    fig.supxlabel(_caption(k, clean_labels, noisy), fontsize=9, wrap=True)
    return fig


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
    clean_labels: Tensor | None = None,
) -> str:
    """Draw one row per test example: the example, its helpful and harmful examples.

    Training examples are captioned ``label 3`` when the label they were trained on is
    the true one and ``given 3 (true 5)`` when it is a planted wrong label (needs
    ``clean_labels``; with ``noisy`` alone: ``given 3 (noisy)``); test examples
    ``true 3, predicted 5``. A caption under the grid says what green and red mean.

    Args:
        result: From :func:`trace`.
        test_batch: The traced batch; its first element holds the images.
        train_dataset: The training set the indices refer to (with the given labels).
        path: PNG file to write.
        predictions: Predicted classes of the test examples (shown in titles).
        image_shape: Shape to reshape flat inputs to, e.g. ``(1, 8, 8)``.
        class_names: Label names.
        noisy: Boolean mask ``(n_train,)`` of training examples with a planted wrong label.
        title: Figure title.
        clean_labels: True labels ``(n_train,)`` of the training examples (e.g.
            :attr:`~captum_sam.data.SplitData.clean_labels`), shown next to wrong ones.

    Returns:
        The path written.
    """
    fig = trace_figure(
        result,
        test_batch,
        train_dataset,
        predictions=predictions,
        image_shape=image_shape,
        class_names=class_names,
        noisy=noisy,
        title=title,
        clean_labels=clean_labels,
    )
    path = os.fspath(path)
    fmt = os.path.splitext(path)[1].lstrip(".").lower()
    if not fmt:  # as savefig(path) does: the default format, appended
        import matplotlib

        fmt = matplotlib.rcParams["savefig.format"]
        path = f"{path}.{fmt}"
    atomic_write(path, lambda f: fig.savefig(f, format=fmt, dpi=130))  # never a partial file
    return path
