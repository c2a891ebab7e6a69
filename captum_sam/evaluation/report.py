"""The report of ``captum-sam compare``: the results table, ``report.md`` and the plots.

:func:`format_table` renders one row of metrics per estimator (markdown or plain
text), :func:`findings` says in words what a reader should look out for; the private
helpers write ``report.md`` from the results dictionary that
:func:`~captum_sam.evaluation.compare.run_compare` builds, and the PNG plots (LOO
scatter, mislabel recall, harmful-data removal and the trace of misclassified test
examples, drawn by :mod:`captum_sam.evaluation.figures`). A row with an ``"error"`` key
is an estimator that failed: it has no metrics and no scores.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from captum_sam.applications.tracing import trace, trace_figure
from captum_sam.evaluation.config import PROTOCOLS
from captum_sam.evaluation.findings import findings, removal_ranked_by, succeeded
from captum_sam.evaluation.metrics import recall_curve

if TYPE_CHECKING:
    from captum_sam.evaluation.setup import Context

__all__ = ["format_table", "findings"]

COLUMNS = [
    ("method", "label", "{}"),
    ("LOO Pearson", "loo_pearson", "{:+.3f}"),
    ("LOO Spearman", "loo_spearman", "{:+.3f}"),
    ("LDS", "lds", "{:+.3f}"),
    ("damping", "damping", "{}"),
    ("mislabel AUC", "mislabel_auc", "{:.3f}"),
    ("AUC self-infl.", "mislabel_auc_self", "{:.3f}"),
    ("recall@10%", "recall_at_10", "{:.2f}"),
    ("recall@40%", "recall_at_40", "{:.2f}"),
    ("edit acc (retrained)", None, ""),
    ("runtime s", "runtime_s", "{:.2f}"),
    ("vs retraining", "speedup_vs_retraining", "{:.0f}x"),
]
# columns a failed estimator still has a value for, or that make no sense for it
_KEPT_WHEN_FAILED = {"label", "runtime_s"}
_NA_WHEN_FAILED = {"speedup_vs_retraining", "damping"}
RANKED_BY = {
    "influence": "most negative influence on the validation loss",
    "self": "highest self influence",
}
RETRAINED = {
    "fixed_point": "to the full-batch SAM fixed point",
    "fixed_point_zero_weight": "to the full-batch SAM fixed point (zero weight)",
    "schedule": "by replaying the recorded SAM schedule",
    "schedule_zero_weight": "by replaying the recorded SAM schedule (zero weight)",
    "fresh": "from the initial weights on new seeded batches",
}


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _cell(row: dict[str, Any], key: str | None, fmt: str) -> str:
    failed = "error" in row
    if failed and key not in _KEPT_WHEN_FAILED:
        return "n/a" if key in _NA_WHEN_FAILED else "failed"
    if key is None:
        if "edit_accuracy" not in row:
            return "n/a"
        return f"{row['edit_accuracy']:.3f} ({row['retrained_accuracy']:.3f})"
    value = row.get(key)
    return "n/a" if _missing(value) else fmt.format(value)


def format_table(rows: Sequence[dict[str, Any]], markdown: bool = True) -> str:
    """The comparison table, one method per row.

    A failed estimator's row (one with an ``"error"`` key) reads "failed" in its metric
    cells; a metric that was not computed (None or NaN, e.g. the mislabel metrics with no
    planted noisy labels) reads "n/a".
    """
    header = [c[0] for c in COLUMNS]
    body = [[_cell(r, key, fmt) for _, key, fmt in COLUMNS] for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *body)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), sep, *[line(b) for b in body]])


def _report(results: dict[str, Any]) -> str:
    cfg, gt, data = results["config"], results["ground_truth"], results["data"]
    truth = protocol_sentence(results)
    warnings_found = findings(results) or ["Nothing flagged."]
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
        "## What to look out for",
        "",
        *[f"- {text}" for text in warnings_found],
        "",
        *_failed_section(results["methods"]),
        *_columns_section(results),
        *_removal_section(results),
    ]
    return "\n".join(lines)


def protocol_sentence(results: dict[str, Any]) -> str:
    """What "retrained without" meant in this run: the protocol's name and description."""
    cfg, gt = results["config"], results["ground_truth"]
    mode = gt["mode"]
    text = f"protocol `{mode}`, {PROTOCOLS.get(mode, mode)}"
    if mode == "fresh":
        text += f" (seeds {', '.join(str(s) for s in gt.get('seeds') or cfg['gt_seeds'])})"
    if mode.startswith("fixed_point") and gt.get("fixed_point_residual") is not None:
        text += (
            f"; Newton residual {gt['fixed_point_residual']:.1e}, the Hessian-based "
            "estimators are evaluated at the full-data fixed point"
        )
    sampler = gt.get("lds_sampler", cfg.get("lds_sampler", "fraction"))
    return f"{text}; LDS subsets drawn by the `{sampler}` sampler"


def _failed_section(rows: Sequence[dict[str, Any]]) -> list[str]:
    failed = [r for r in rows if "error" in r]
    if not failed:
        return []
    return [
        "## Estimators that failed",
        "",
        *[
            f"- `{r['label']}` ({r['description']}), after {r['runtime_s']:.1f} s: {r['error']}"
            for r in failed
        ],
        "",
        'They have no metrics ("failed" in the table) and no plots; '
        "`results.json` keeps each one's traceback.",
        "",
    ]


def _columns_section(results: dict[str, Any]) -> list[str]:
    cfg, gt = results["config"], results["ground_truth"]
    forgotten = (
        f"the {gt['edit_set_size']} noisy examples"
        if results["data"]["noisy"]
        else f"{gt['edit_set_size']} random training examples"
    )
    return [
        "## Columns",
        "",
        f"- **LOO Pearson / Spearman**: correlation, over {gt['n_loo']} removed training "
        "examples, between the predicted change of the summed test loss (the sum of the "
        "method's influence scores over the test set) and the actual change after retraining. "
        "The correlations ignore the scale, and methods predict on very different scales: "
        "`loo_scatter.png` gives each method's fitted slope (1 = same scale as the actual "
        "change).",
        f"- **LDS**: linear datamodeling score over {gt['lds_subsets']} random subsets "
        + (
            f"keeping each example with probability {cfg['lds_fraction']:.0%}"
            if cfg.get("lds_sampler") == "bernoulli"
            else f"of {cfg['lds_fraction']:.0%} of the training set"
        )
        + ": per test example, the Spearman "
        "correlation between the predicted and the actual test loss of the model retrained "
        "on the subset, averaged over test examples.",
        "- **damping**: the d added as n d to the curvature's diagonal (beyond weight "
        "decay) in each Hessian-based row; `auto`: chosen from the curvature alone "
        "(0.1 x its mean eigenvalue, plus the shift that makes an indefinite Hessian "
        "positive semi-definite; K-FAC: per layer; at a run's last iterate at least 1/T, "
        "T the sum of its learning rates), never from the ground truth. n/a: no "
        "curvature is inverted.",
        f"- **mislabel AUC, recall@10% / 40%**: ranking training examples by "
        f"{RANKED_BY[cfg['mislabel_by']]}, the area under the ROC curve for the planted noisy "
        "labels, and the fraction of them found after examining the top 10% / 40% of the "
        "training set. **AUC self-infl.**: the same AUC when ranking by self influence "
        "instead. n/a: no planted noisy labels.",
        f"- **edit acc (retrained)**: test accuracy of the model edited to forget {forgotten} "
        "without retraining, and in parentheses of the "
        "model really retrained without them (SAM-GIF against the replayed schedule, the "
        "others against the ground truth above). `sam-gif` edits by the linearised replay "
        "of the recorded run, `sam-gif-ckpt` by segments between its checkpoints "
        '(`method="segment"`), the Hessian rows by one Newton step. n/a: the estimator '
        "cannot edit.",
        "- **runtime s**: set-up plus influence of every training example on every test "
        "example. **vs retraining**: time of retraining once per training example divided "
        "by the runtime.",
        "",
        "Method descriptions:",
        "",
        *[f"- `{r['label']}`: {r['description']}" for r in results["methods"]],
        "",
        _plots_line(results),
        "",
    ]


def _plots_line(results: dict[str, Any]) -> str:
    """The plots :func:`_plots` wrote for these results."""
    if not succeeded(results["methods"]):
        return "No plots: every estimator failed."
    names = ["loo_scatter.png"]
    if results["data"]["noisy"]:
        names.append("mislabel_recall.png")
    if results.get("removal_curve"):
        names.append("harmful_removal.png")
    return "Plots: " + ", ".join(f"`{n}`" for n in [*names, "trace.png"]) + "."


def _removal_section(results: dict[str, Any]) -> list[str]:
    rc = results.get("removal_curve")
    if not rc:
        return []
    lines = [
        "## Harmful-data removal (retrained)",
        "",
        f"Ranked by `{removal_ranked_by(results)}`: {RANKED_BY[results['config']['mislabel_by']]}.",
        f"Random removal: the mean over {results['config'].get('removal_repeats', 1)} random "
        "draws of as many examples.",
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
    return [*lines, ""]


def _save(fig: Any, path: str) -> None:
    from captum_sam.core.files import atomic_write

    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120, bbox_inches="tight"))


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
    """Write the PNG plots of the estimators that succeeded (none if every one failed)."""
    from captum_sam.evaluation import figures  # matplotlib is an optional dependency

    done = [r for r in succeeded(rows) if r["label"] in scores]
    if not done:
        return
    cfg, noisy = ctx.config, ctx.data.noisy
    panels = [
        (r["label"], scores[r["label"]]["test"].sum(dim=0)[loo_idx].cpu().numpy(), r["loo_pearson"])
        for r in done
    ]
    retrained = RETRAINED[cfg.resolved_ground_truth]
    fig = figures.loo_scatter_figure(panels, loo_actual.cpu().numpy(), retrained)
    _save(fig, os.path.join(out, "loo_scatter.png"))
    ranked_by = RANKED_BY[cfg.mislabel_by]
    if int(noisy.sum()):
        key = "suspicion" if cfg.mislabel_by == "influence" else "self"
        by = {r["label"]: scores[r["label"]][key] for r in done}
        curves = [
            (
                f"{r['label']} ({_cell(r, 'mislabel_auc', '{:.2f}')})",
                *recall_curve(by[r["label"]], noisy),
            )
            for r in done
        ]
        fig = figures.mislabel_recall_figure(curves, ranked_by)
        _save(fig, os.path.join(out, "mislabel_recall.png"))
    if removal is not None:
        share = float(noisy.double().mean())
        fig = figures.removal_figure(removal, done[0]["label"], ranked_by, share)
        _save(fig, os.path.join(out, "harmful_removal.png"))
    _trace_plot(out, ctx, done[0]["label"], scores[done[0]["label"]]["estimator"], base)


def _trace_plot(out: str, ctx: Context, label: str, estimator: Any, base: nn.Module) -> None:
    """``trace.png``: misclassified test examples with the training examples behind them."""
    x, y = ctx.test
    with torch.no_grad():
        pred = base.eval()(x).argmax(dim=1)
    wrong = torch.nonzero(pred != y).flatten()[: ctx.config.trace_examples]
    shown = "misclassified test examples"
    if len(wrong) == 0:
        wrong = torch.arange(min(ctx.config.trace_examples, len(y)))
        shown = "test examples (none is misclassified)"
    batch = (x[wrong], y[wrong])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        result = trace(estimator, batch, k=ctx.config.trace_k)
    fig = trace_figure(
        result,
        batch,
        ctx.data.train,
        predictions=pred[wrong],
        noisy=ctx.data.noisy,
        clean_labels=ctx.data.clean_labels,
        title=f"{label}: {shown}, each followed by the training examples it ranks most "
        "helpful (green) and most harmful (red)",
    )
    _save(fig, os.path.join(out, "trace.png"))
