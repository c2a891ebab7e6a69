"""What a reader of ``captum-sam compare`` should look out for, in words.

:func:`findings` turns the results of
:func:`~captum_sam.evaluation.compare.run_compare` into short paragraphs, each with its
numbers and likely reason: failed estimators, mislabel metrics missing for want of
planted noisy labels, edits that lose accuracy, and harmful-data removal doing worse
than random removal. Nothing here judges a method in advance: every flag is computed.
``report.md`` lists them and the command prints them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

__all__ = ["findings", "removal_ranked_by", "succeeded"]

_TOL = 1e-9  # accuracies are multiples of 1 / n_test


def succeeded(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows of the estimators that did not fail (rows without an ``"error"`` key)."""
    return [r for r in rows if "error" not in r]


def findings(results: dict[str, Any]) -> list[str]:
    """What a reader of the comparison should look out for, in words, computed from numbers.

    Flags estimators that failed, mislabel metrics missing because no noisy label was
    planted, edits that lose test accuracy against the unedited model, and removals of
    the top-ranked "harmful" examples that do worse than random removal, each with its
    numbers and likely reason. ``report.md`` lists them and the command prints them.

    Args:
        results: As :func:`~captum_sam.evaluation.compare.run_compare` returns them.

    Returns:
        One paragraph per finding; empty when there is nothing to flag.
    """
    rows = results["methods"]
    return [
        *[
            f"`{r['label']}` failed ({r['error']}): no metrics, no plots."
            for r in rows
            if "error" in r
        ],
        *_noise_findings(results),
        *[_edit_finding(r, results) for r in succeeded(rows) if _edit_lost(r)],
        *_removal_findings(results),
    ]


def _fewer(drop: float, n_test: int) -> str:
    return f"{round(drop * n_test)} of {n_test} test examples fewer right"


def _noise_findings(results: dict[str, Any]) -> list[str]:
    data, noise = results["data"], results["config"]["noise"]
    if data["noisy"]:
        return []
    why = (
        "--noise 0"
        if noise == 0
        else f"--noise {noise:g} plants no noisy label among {data['n_train']} examples"
    )
    return [
        f"{why}: no mislabel metrics (mislabel AUC and recall are n/a), no harmful-data "
        f"removal curve, and the edit forgets {results['ground_truth']['edit_set_size']} "
        "random training examples instead of noisy ones."
    ]


def _edit_lost(row: dict[str, Any]) -> bool:
    return "edit_accuracy" in row and row["edit_accuracy"] < row["original_accuracy"] - _TOL


def _edit_finding(row: dict[str, Any], results: dict[str, Any]) -> str:
    size, data = results["ground_truth"]["edit_set_size"], results["data"]
    edit, before = row["edit_accuracy"], row["original_accuracy"]
    retrained = row["retrained_accuracy"]
    forgotten = f"the {size} planted noisy" if data["noisy"] else f"{size} random training"
    text = (
        f"`{row['label']}`: the model edited to forget {forgotten} examples has test accuracy "
        f"{edit:.3f}, {before - edit:.3f} below the unedited model's {before:.3f} "
        f"({_fewer(before - edit, data['n_test'])}); really retraining without them gives "
        f"{retrained:.3f}."
    )
    if edit >= retrained - _TOL:
        return (
            f"{text} The edit does as well as retraining: the loss is what forgetting these "
            "examples costs, not an error of the edit."
        )
    return (
        f"{text} The edit is {retrained - edit:.3f} below retraining. {_edit_reason(row, results)}"
    )


def _edit_reason(row: dict[str, Any], results: dict[str, Any]) -> str:
    if row["method"].startswith("sam-gif"):
        unit = "checkpoint interval" if row["method"] == "sam-gif-ckpt" else "step"
        return (
            f"Likely reason: first-order trajectory edits add up every {unit}'s contribution "
            "and ignore how later steps contract earlier changes, so they overshoot, more so with "
            "a larger learning rate and a longer run (see the model-editing tutorial: "
            "trajectory edits overshoot)."
        )
    size, n = results["ground_truth"]["edit_set_size"], results["data"]["n_train"]
    text = (
        f"Likely reasons: the forgotten set is large relative to the training set ({size} of "
        f"{n} examples, {size / n:.0%}), beyond the range where the first-order (Newton) step "
        f"is accurate, or the damping ({row.get('damping', results['config']['damping'])}) "
        "is too small (the step blows up) or too large (the step barely moves the model)."
    )
    fixed_point = results["ground_truth"]["mode"].startswith("fixed_point")
    if row.get("curvature") == "hessian" and not fixed_point:
        text += (
            " Away from a minimum (a network's last SGD iterate) the Hessian is indefinite, "
            "and its inverse blows up along directions of small or negative curvature: the "
            "Gauss-Newton curvature (--curvature ggn) is positive semi-definite, and "
            "--damping bounds the inverse."
        )
    return text


def removal_ranked_by(results: dict[str, Any]) -> str:
    """Label of the estimator whose ranking the harmful-data removal curve used.

    ``results["removal_ranked_by"]`` when recorded, else the first estimator that
    succeeded (the one :func:`~captum_sam.evaluation.compare.run_compare` uses).
    """
    first = next(iter(succeeded(results["methods"])), {"label": "the first estimator"})
    return results.get("removal_ranked_by") or first["label"]


def _removal_findings(results: dict[str, Any]) -> list[str]:
    rc, n_test = results.get("removal_curve"), results["data"]["n_test"]
    if not rc:
        return []
    top, rand = rc["accuracy_top"], rc["accuracy_random"]
    # at least one test example fewer right: a smaller gap is the noise of the random draws
    below = [
        i for i, f in enumerate(rc["fractions"]) if f > 0 and rand[i] - top[i] >= 1 / n_test - _TOL
    ]
    if not below:
        return []
    where = "; ".join(
        f"{rc['fractions'][i]:.0%} removed: {top[i]:.3f} against {rand[i]:.3f} at random "
        f"({_fewer(rand[i] - top[i], n_test)})"
        for i in below
    )
    return [
        f"Removing the training examples `{removal_ranked_by(results)}` ranks most harmful gives "
        f"a lower test accuracy after retraining than removing random ones at {where}. "
        f"{_removal_reason(results, below)}"
    ]


def _removal_reason(results: dict[str, Any], below: list[int]) -> str:
    rc, n, planted = results["removal_curve"], results["data"]["n_train"], results["data"]["noisy"]
    found = rc["noisy_found"] or [float("nan")] * len(rc["fractions"])
    held = [
        f"at {rc['fractions'][i]:.0%} the {round(rc['fractions'][i] * n)} removed held "
        f"{round(found[i] * planted)} of the {planted} planted noisy labels and "
        f"{round(rc['fractions'][i] * n) - round(found[i] * planted)} correctly labelled examples"
        for i in below
        if not math.isnan(found[i])
    ]
    reasons = []
    if any(found[i] >= 1 - _TOL for i in below):
        reasons.append(
            "once the planted noisy labels are exhausted, the ranking goes on to correctly "
            "labelled but hard or atypical examples (e.g. those with the highest loss) that "
            "the model needs"
        )
    if not all(found[i] >= 1 - _TOL for i in below):
        reasons.append(
            "the ranking puts correctly labelled but hard or atypical examples (e.g. those "
            "with the highest loss), which the model needs, above some of the noisy labels"
        )
    text = f"By then {'; '.join(held)}. " if held else ""
    text += f"Likely reason: {'; and '.join(reasons)}."
    auc = _ranking_row(results).get("mislabel_auc")
    if isinstance(auc, float) and not math.isnan(auc):
        poor = ", close to chance: the ranking is poor" if abs(auc - 0.5) <= 0.1 else ""
        text += f" Its mislabel AUC is {auc:.2f} (0.5 is chance, 1 is perfect){poor}."
    return text


def _ranking_row(results: dict[str, Any]) -> dict[str, Any]:
    label = removal_ranked_by(results)
    return next((r for r in results["methods"] if r["label"] == label), {})
