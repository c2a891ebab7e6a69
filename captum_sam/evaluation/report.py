"""The report of ``captum-sam compare``: the results table, ``report.md`` and the plots.

:func:`format_table` renders one row of metrics per estimator (markdown or plain
text); the private helpers write ``report.md`` from the results dictionary that
:func:`~captum_sam.evaluation.compare.run_compare` builds, and the PNG plots (LOO
scatter, mislabel recall, harmful-data removal and the trace of misclassified test
examples).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from captum_sam.applications import plot_trace, trace
from captum_sam.evaluation.metrics import recall_curve

if TYPE_CHECKING:
    from captum_sam.evaluation.setup import Context

__all__ = ["format_table"]

COLUMNS = [
    ("method", "label", "{}"),
    ("LOO Pearson", "loo_pearson", "{:+.3f}"),
    ("LOO Spearman", "loo_spearman", "{:+.3f}"),
    ("LDS", "lds", "{:+.3f}"),
    ("mislabel AUC", "mislabel_auc", "{:.3f}"),
    ("AUC self-infl.", "mislabel_auc_self", "{:.3f}"),
    ("recall@10%", "recall_at_10", "{:.2f}"),
    ("recall@40%", "recall_at_40", "{:.2f}"),
    ("edit acc (retrained)", None, ""),
    ("runtime s", "runtime_s", "{:.2f}"),
    ("vs retraining", "speedup_vs_retraining", "{:.0f}x"),
]


def format_table(rows: Sequence[dict[str, Any]], markdown: bool = True) -> str:
    """The comparison table, one method per row."""
    header = [c[0] for c in COLUMNS]
    body = []
    for r in rows:
        cells = []
        for _, key, fmt in COLUMNS:
            if key is None:
                cells.append(
                    f"{r['edit_accuracy']:.3f} ({r['retrained_accuracy']:.3f})"
                    if "edit_accuracy" in r
                    else "n/a"
                )
            else:
                value = r.get(key)
                cells.append(
                    "n/a"
                    if value is None or (isinstance(value, float) and np.isnan(value))
                    else fmt.format(value)
                )
        body.append(cells)
    widths = [max(len(str(x)) for x in col) for col in zip(header, *body)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), sep, *[line(b) for b in body]])


def _report(results: dict[str, Any]) -> str:
    cfg, gt, data = results["config"], results["ground_truth"], results["data"]
    mode = gt["mode"]
    ranked_by = (
        "most negative validation influence score"
        if cfg["mislabel_by"] == "influence"
        else "highest self influence"
    )
    truth = (
        "retraining to the full-batch SAM fixed point (Newton, residual "
        f"{gt['fixed_point_residual']:.1e}) from the trained weights; the Hessian-based "
        "estimators are evaluated at that fixed point"
        if mode == "fixed_point"
        else "replaying the recorded SAM schedule without the removed examples"
    )
    lines = [
        "# captum-sam compare",
        "",
        f"{cfg['model']} on {data['name']}: {data['n_train']} training examples "
        f"({data['noisy']} planted noisy labels), {data['n_val']} validation, "
        f"{data['n_test']} test; SAM rho={cfg['rho']}, weight decay {cfg['weight_decay']}, "
        f"{cfg['epochs']} epochs, curvature {cfg['curvature']}, damping {cfg['damping']}.",
        f"Test accuracy of the trained model: {results['accuracy']['trained']:.3f}.",
        "",
        f"Ground truth: {truth}. One retraining takes {gt['retrain_seconds_mean']:.2f} s.",
        "",
        format_table(results["methods"]),
        "",
        "## Columns",
        "",
        f"- **LOO Pearson / Spearman**: correlation, over {gt['n_loo']} removed training "
        "examples, between the predicted change of the summed test loss (the sum of the "
        "method's influence scores over the test set) and the actual change after retraining.",
        f"- **LDS**: linear datamodeling score over {gt['lds_subsets']} random subsets of "
        f"{cfg['lds_fraction']:.0%} of the training set: per test example, the Spearman "
        "correlation between the predicted and the actual test loss of the model retrained "
        "on the subset, averaged over test examples.",
        f"- **mislabel AUC, recall@10% / 40%**: ranking training examples by "
        f"{ranked_by}, "
        "the area under the ROC curve for the planted noisy labels, and the fraction of them "
        "found after examining the top 10% / 40% of the training set. **AUC self-infl.**: "
        "the same AUC when ranking by self influence instead.",
        f"- **edit acc (retrained)**: test accuracy of the model edited to forget the "
        f"{gt['edit_set_size']} noisy examples without retraining, and in parentheses of the "
        "model really retrained without them (SAM-GIF against the replayed schedule, the "
        "others against the ground truth above). n/a: the estimator cannot edit.",
        "- **runtime s**: set-up plus influence of every training example on every test "
        "example. **vs retraining**: time of retraining once per training example divided "
        "by the runtime.",
        "",
        "Method descriptions:",
        "",
        *[f"- `{r['label']}`: {r['description']}" for r in results["methods"]],
        "",
        "Plots: `loo_scatter.png`, `mislabel_recall.png`, `harmful_removal.png`, `trace.png`.",
        "",
    ]
    if results.get("removal_curve"):
        rc = results["removal_curve"]
        lines += [
            "## Harmful-data removal (retrained)",
            "",
            "| removed | accuracy (top harmful) | accuracy (random) | noisy labels found |",
            "|---|---|---|---|",
        ]
        for i, f in enumerate(rc["fractions"]):
            found = rc["noisy_found"][i] if rc["noisy_found"] else float("nan")
            lines.append(
                f"| {f:.0%} | {rc['accuracy_top'][i]:.3f} | "
                f"{rc['accuracy_random'][i]:.3f} | {found:.2f} |"
            )
        lines.append("")
    return "\n".join(lines)


def _plots(
    out: str,
    ctx: Context,
    rows: list[dict[str, Any]],
    scores: dict[str, Any],
    loo_idx: list[int],
    loo_actual: Tensor,
    removal: Any,
    base: nn.Module,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not rows:
        return
    cols = min(4, len(rows))
    nrows = (len(rows) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(3.2 * cols, 3.0 * nrows), squeeze=False)
    for ax, row in zip(axes.ravel(), rows):
        pred = scores[row["label"]]["test"].sum(dim=0)[loo_idx].cpu().numpy()
        ax.scatter(loo_actual.cpu().numpy(), pred, s=10)
        ax.set_title(f"{row['label']}\nPearson {row['loo_pearson']:+.2f}", fontsize=8)
        ax.set_xlabel("actual change of test loss", fontsize=7)
        ax.set_ylabel("predicted", fontsize=7)
        ax.tick_params(labelsize=6)
    for ax in axes.ravel()[len(rows) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "loo_scatter.png"), dpi=120)
    plt.close(fig)

    noisy = ctx.data.noisy
    if int(noisy.sum()):
        fig, ax = plt.subplots(figsize=(5, 4))
        for row in rows:
            by = (
                scores[row["label"]]["suspicion"]
                if ctx.config.mislabel_by == "influence"
                else scores[row["label"]]["self"]
            )
            x, y = recall_curve(by, noisy)
            ax.plot(x, y, label=f"{row['label']} (AUC {row['mislabel_auc']:.2f})", lw=1.2)
        ax.plot([0, 1], [0, 1], "k--", lw=0.8, label="random")
        ax.set_xlabel("fraction of training data examined")
        ax.set_ylabel("fraction of noisy labels found")
        ax.legend(fontsize=6)
        fig.tight_layout()
        fig.savefig(os.path.join(out, "mislabel_recall.png"), dpi=120)
        plt.close(fig)

    if removal is not None:
        fig, ax1 = plt.subplots(figsize=(5, 4))
        ax1.plot(
            removal.fractions,
            removal.accuracy_top,
            "o-",
            label=f"remove top harmful ({rows[0]['label']})",
        )
        ax1.plot(removal.fractions, removal.accuracy_random, "s--", label="remove at random")
        ax1.set_xlabel("fraction of training data removed")
        ax1.set_ylabel("test accuracy after retraining")
        ax2 = ax1.twinx()
        ax2.plot(
            removal.fractions,
            removal.noisy_found,
            "^:",
            color="tab:green",
            label="noisy labels found",
        )
        ax2.set_ylabel("fraction of noisy labels removed")
        h1, l1 = ax1.get_legend_handles_labels()
        h2, l2 = ax2.get_legend_handles_labels()
        ax1.legend(h1 + h2, l1 + l2, fontsize=7, loc="lower right")
        fig.tight_layout()
        fig.savefig(os.path.join(out, "harmful_removal.png"), dpi=120)
        plt.close(fig)

    est = scores[rows[0]["label"]]["estimator"]
    x, y = ctx.test
    with torch.no_grad():
        pred = base.eval()(x).argmax(dim=1)
    wrong = torch.nonzero(pred != y).flatten()[: ctx.config.trace_examples]
    if len(wrong) == 0:
        wrong = torch.arange(min(ctx.config.trace_examples, len(y)))
    batch = (x[wrong], y[wrong])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        result = trace(est, batch, k=ctx.config.trace_k)
    plot_trace(
        result,
        batch,
        ctx.data.train,
        os.path.join(out, "trace.png"),
        predictions=pred[wrong],
        noisy=noisy,
        title=f"{rows[0]['label']}: misclassified test digits, helpful (green) and "
        "harmful (red) training examples",
    )
