"""The figures of ``captum-sam compare``, each returned as a matplotlib ``Figure``.

:func:`loo_scatter_figure` (predicted against actual leave-one-out changes),
:func:`mislabel_recall_figure` (how fast a ranking finds the planted noisy labels) and
:func:`removal_figure` (test accuracy after retraining without the top-ranked examples).
They take plain arrays, are built without pyplot (no global figure state) and use no
text smaller than 9 pt; legends sit outside the axes. The report saves them.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from typing import Any

import matplotlib
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

__all__ = [
    "method_styles",
    "least_squares_slope",
    "loo_scatter_figure",
    "mislabel_recall_figure",
    "removal_figure",
]

TEXT_PT = 10  # every title, label, tick and legend entry; the smallest is SMALL_PT
SMALL_PT = 9
LINESTYLES = ("-", "--", "-.", ":")
MARKERS = ("o", "s", "^", "v", "D", "P", "X", "<", ">", "*")


def method_styles(n: int) -> list[dict[str, Any]]:
    """Line properties of ``n`` curves: a distinct (colour, line style) pair for up to 80.

    The colour cycles through ``tab20`` and the line style through four styles, shifted
    by one every 20 curves. Markers differ too, and widths narrow with the index, so a
    curve drawn over an identical earlier one leaves the earlier one visible around it.
    """
    colours = matplotlib.colormaps["tab20"].colors
    return [
        {
            "color": colours[i % 20],
            "linestyle": LINESTYLES[(i + i // 20) % 4],
            "marker": MARKERS[i % len(MARKERS)],
            "linewidth": 3.0 - 1.8 * i / max(n - 1, 1),
        }
        for i in range(n)
    ]


def least_squares_slope(actual: np.ndarray, predicted: np.ndarray) -> tuple[float, float]:
    """``(slope, intercept)`` of the least-squares line of ``predicted`` on ``actual``.

    NaN when fewer than two finite points or ``actual`` is constant.
    """
    ok = np.isfinite(actual) & np.isfinite(predicted)
    a, p = actual[ok], predicted[ok]
    if len(a) < 2 or np.ptp(a) == 0:
        return float("nan"), float("nan")
    slope = float(np.sum((a - a.mean()) * (p - p.mean())) / np.sum((a - a.mean()) ** 2))
    return slope, float(p.mean() - slope * a.mean())


def _wrap(text: str, width_in: float, size: float) -> str:
    """Wrap ``text`` to lines that fit ``width_in`` inches at ``size`` points."""
    chars = max(30, int(width_in * 72 / (0.55 * size)))
    return "\n".join(textwrap.fill(part, chars) for part in text.split("\n"))


def _scatter_panel(
    ax: Axes, label: str, predicted: np.ndarray, actual: np.ndarray, r: float
) -> None:
    slope, intercept = least_squares_slope(actual, predicted)
    ax.scatter(actual, predicted, s=16, color="tab:blue", label="one removed training example")
    finite = actual[np.isfinite(actual)]
    if len(finite):
        ends = np.array([finite.min(), finite.max()])
        ax.plot(ends, ends, "k--", lw=1.2, label="y = x (same scale)")
        if np.isfinite(slope):
            ax.plot(ends, intercept + slope * ends, color="tab:red", lw=1.2, label="least squares")
    r_text = f"{r:+.2f}" if np.isfinite(r) else "n/a"
    slope_text = f"{slope:.3g}" if np.isfinite(slope) else "n/a"
    ax.set_title(f"{label}\nPearson r {r_text}, fitted slope {slope_text}", fontsize=TEXT_PT)
    ax.set_xlabel("actual change (retrained)", fontsize=TEXT_PT)
    ax.set_ylabel("predicted change", fontsize=TEXT_PT)
    ax.tick_params(labelsize=SMALL_PT)


def loo_scatter_figure(
    panels: Sequence[tuple[str, np.ndarray, float]], actual: np.ndarray, retrained: str
) -> Figure:
    """One panel per method: predicted against actual leave-one-out change.

    Args:
        panels: ``(method label, predicted change (n_loo,), Pearson r)`` per method.
        actual: ``(n_loo,)`` actual change of the summed test loss after retraining.
        retrained: How the ground truth retrains, e.g. "to the SAM fixed point".
    """
    cols = min(4, len(panels))
    nrows = (len(panels) + cols - 1) // cols
    width = max(4.0 * cols, 8.0)
    fig = Figure(figsize=(width, 3.6 * nrows + 1.6), layout="constrained")
    axes = fig.subplots(nrows, cols, squeeze=False)
    for ax, (label, predicted, r) in zip(axes.flat, panels):
        _scatter_panel(ax, label, np.asarray(predicted, float), np.asarray(actual, float), r)
    for ax in axes.flat[len(panels) :]:
        ax.axis("off")
    title = (
        "Predicted vs actual change of the summed test loss when one training example is "
        f"removed (retrained {retrained}).\nDashed: y = x. Red: the least-squares fit; the "
        "methods predict on different scales, and its slope says how many times larger the "
        "predicted changes are than the actual ones (1 = same scale). Pearson r ignores the "
        "scale."
    )
    fig.suptitle(_wrap(title, width, TEXT_PT + 1), fontsize=TEXT_PT + 1)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=3, fontsize=TEXT_PT)
    return fig


def mislabel_recall_figure(
    curves: Sequence[tuple[str, np.ndarray, np.ndarray]], ranked_by: str
) -> Figure:
    """Fraction of the planted noisy labels found against the fraction examined.

    Args:
        curves: ``(legend label, fraction examined, fraction found)`` per method.
        ranked_by: What the ranking sorts by, e.g. "self influence".
    """
    fig = Figure(figsize=(10, 6), layout="constrained")
    ax = fig.subplots()
    for i, ((label, x, y), style) in enumerate(zip(curves, method_styles(len(curves)))):
        step = max(1, (len(x) - 1) // 8)
        offset = (i * step) // max(len(curves), 1)
        ax.plot(x, y, label=label, markevery=(offset, step), markersize=6, **style)
    ax.plot([0, 1], [0, 1], color="black", lw=1, ls=(0, (1, 3)), label="random ranking")
    ax.text(
        0.62,
        0.6,
        "random ranking",
        rotation=45,
        transform_rotates_text=True,
        rotation_mode="anchor",
        ha="center",
        va="bottom",
        fontsize=SMALL_PT,
    )
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("fraction of the training data examined, highest ranked first", fontsize=TEXT_PT)
    ax.set_ylabel("fraction of the planted noisy labels found", fontsize=TEXT_PT)
    ax.tick_params(labelsize=SMALL_PT)
    ax.set_title(f"Finding the planted noisy labels: ranking by {ranked_by}", fontsize=TEXT_PT + 1)
    fig.legend(
        loc="outside right upper",
        title="method (mislabel AUC)",
        fontsize=SMALL_PT,
        title_fontsize=SMALL_PT,
    )
    return fig


def removal_figure(curve: Any, method: str, ranked_by: str, noisy_share: float) -> Figure:
    """Test accuracy after retraining without the top-ranked examples vs random ones.

    Args:
        curve: A :class:`~captum_sam.applications.RemovalCurve`.
        method: Label of the method whose ranking was used.
        ranked_by: What the ranking sorts by, e.g. "self influence".
        noisy_share: Planted noisy labels as a fraction of the training set.
    """
    fig = Figure(figsize=(8, 6), layout="constrained")
    ax = fig.subplots()
    removed = 100 * np.asarray(curve.fractions, float)
    ax.plot(
        removed,
        curve.accuracy_top,
        "o-",
        color="tab:blue",
        label=f"accuracy, top ranked by {method} removed",
    )
    ax.plot(
        removed,
        curve.accuracy_random,
        "s--",
        color="tab:orange",
        label="accuracy, random examples removed",
    )
    ax.axvline(
        100 * noisy_share,
        color="grey",
        ls=":",
        label=f"share of planted noisy labels ({noisy_share:.0%})",
    )
    ax.set_xlabel("training data removed (%)", fontsize=TEXT_PT)
    ax.set_ylabel("test accuracy after retraining", fontsize=TEXT_PT)
    ax.tick_params(labelsize=SMALL_PT)
    handles, labels = ax.get_legend_handles_labels()
    if len(curve.noisy_found):
        right = ax.twinx()
        right.plot(
            removed,
            curve.noisy_found,
            "^:",
            color="tab:green",
            label="planted noisy labels removed (right axis)",
        )
        right.set_ylim(0, 1.05)
        right.set_ylabel("fraction of the planted noisy labels removed", fontsize=TEXT_PT)
        right.tick_params(labelsize=SMALL_PT)
        more = right.get_legend_handles_labels()
        handles, labels = handles + more[0], labels + more[1]
    title = (
        f"Removing the training examples {method} ranks most harmful (ranked by {ranked_by}) "
        "vs removing random ones: test accuracy after really retraining without them"
    )
    ax.set_title(_wrap(title, 8, TEXT_PT + 1), fontsize=TEXT_PT + 1)
    fig.legend(handles, labels, loc="outside lower center", ncol=2, fontsize=SMALL_PT)
    return fig
