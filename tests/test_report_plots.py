"""The plots and the report of `captum-sam compare` explain themselves.

Synthetic rows, scores and a small context stand in for a run; the figures are caught
at `savefig` and their contents checked: titles, axis labels, legends outside the axes,
the y = x line, distinct styles for many methods, fonts of 9 pt and more, and trace
titles that say which label is given and which is true.
"""

from __future__ import annotations

import copy
import math
import os
from types import SimpleNamespace

import matplotlib
import numpy as np
import pytest
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.text import Text
from torch import nn
from torch.utils.data import TensorDataset

from captum_sam.applications import RemovalCurve
from captum_sam.evaluation import figures
from captum_sam.evaluation.findings import findings
from captum_sam.evaluation.report import _plots, _report, format_table

DTYPE = torch.float64
N_TRAIN, N_TEST = 60, 12
NOISY = [3, 10, 17, 25, 33, 41]  # planted wrong labels: 10% of the training set
LOO_IDX = list(range(0, N_TRAIN, 5))
LABELS = [
    "sam-gif",
    "sam-gif-ckpt",
    *[f"{m} [{c}]" for m in ("sam-hif-fast", "sam-hif", "sam-hif-exact", "if")
      for c in ("hessian", "ggn")],
    "captum-tracincp",
    "captum-arnoldi",
]  # fmt: skip
SCALES = [812.0, 300.0, *[15.0] * 8, 1000.0, 1.0]  # predicted / actual, per method


class TopKEstimator:
    """Scores x_test . x_train, plus a bonus that makes the noisy examples top proponents."""

    def __init__(self, train: TensorDataset, bonus: torch.Tensor) -> None:
        self.x, self.bonus = train.tensors[0], bonus

    def influence(self, inputs, k=None, proponents=True, show_progress=False):
        scores = inputs[0] @ self.x.T + self.bonus
        top = torch.topk(scores if proponents else -scores, k, dim=1)
        values = top.values if proponents else -top.values
        return SimpleNamespace(indices=top.indices, influence_scores=values)


def make_ctx(noise: bool = True, mislabel_by: str = "influence") -> SimpleNamespace:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(N_TRAIN, 64, generator=g, dtype=DTYPE)
    clean = torch.randint(0, 10, (N_TRAIN,), generator=g)
    noisy = torch.zeros(N_TRAIN, dtype=torch.bool)
    if noise:
        noisy[NOISY] = True
    given = torch.where(noisy, (clean + 3) % 10, clean)
    test = (torch.rand(N_TEST, 64, generator=g, dtype=DTYPE), torch.arange(N_TEST) % 10)
    data = SimpleNamespace(train=TensorDataset(x, given), noisy=noisy, clean_labels=clean)
    config = SimpleNamespace(resolved_ground_truth="fixed_point", mislabel_by=mislabel_by,
                             trace_examples=3, trace_k=2)  # fmt: skip
    return SimpleNamespace(config=config, data=data, test=test)


def base_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).to(DTYPE)


def loo_actual() -> torch.Tensor:
    return torch.linspace(-1.0, 1.0, len(LOO_IDX), dtype=DTYPE)


def make_scores(ctx: SimpleNamespace) -> dict[str, dict]:
    bonus = 100.0 * ctx.data.noisy.to(DTYPE)
    suspicion = torch.linspace(0, 1, N_TRAIN, dtype=DTYPE) + bonus  # the same for all
    scores = {}
    for label, scale in zip(LABELS, SCALES):
        test = torch.zeros(N_TEST, N_TRAIN, dtype=DTYPE)
        test[0, LOO_IDX] = scale * loo_actual()  # predicted change = scale x actual
        scores[label] = {
            "test": test,
            "suspicion": suspicion,
            "self": suspicion.flip(0),
            "estimator": TopKEstimator(ctx.data.train, bonus),
        }
    return scores


def ok_row(label: str, **extra) -> dict:
    row = {
        "label": label,
        "method": label.split(" ")[0],
        "curvature": None,
        "description": f"the {label} estimator",
        "loo_pearson": 0.9,
        "loo_spearman": 0.85,
        "lds": 0.4,
        "mislabel_auc": 0.9,
        "mislabel_auc_self": 0.8,
        "recall_at_10": 0.5,
        "recall_at_40": 0.9,
        "runtime_s": 1.5,
        "speedup_vs_retraining": 100.0,
    }
    return {**row, **extra}


def failed_row(label: str = "sam-hif [broken]") -> dict:
    return {
        "label": label,
        "method": "sam-hif",
        "curvature": "hessian",
        "description": "SAM-HIF",
        "error": "RuntimeError: singular matrix",
        "runtime_s": 0.25,
    }


def removal_curve() -> RemovalCurve:
    return RemovalCurve(
        fractions=[0.0, 0.1, 0.2, 0.3],
        accuracy_top=[0.80, 0.86, 0.84, 0.80],
        accuracy_random=[0.80, 0.80, 0.81, 0.82],
        noisy_found=[0.0, 0.5, 1.0, 1.0],
    )


@pytest.fixture
def caught(monkeypatch):
    """The figures `_plots` saves, by file name; nothing is written."""
    saved: dict[str, Figure] = {}

    def save(fig, path):
        saved[os.path.basename(os.fspath(path))] = fig

    from captum_sam.evaluation import report

    monkeypatch.setattr(report, "_save", save)
    return saved


def run_plots(caught, rows, ctx=None, removal=None, scores=None):
    ctx = ctx or make_ctx()
    scores = make_scores(ctx) if scores is None else scores
    _plots("out", ctx, rows, scores, LOO_IDX, loo_actual(), removal, base_model())
    return caught


def drawn(fig: Figure):
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return canvas.get_renderer()


def shown_axes(fig: Figure):
    return [ax for ax in fig.axes if ax.axison]


def intersection_area(a, b) -> float:
    w = min(a.x1, b.x1) - max(a.x0, b.x0)
    h = min(a.y1, b.y1) - max(a.y0, b.y0)
    return max(w, 0.0) * max(h, 0.0)


def assert_explained(fig: Figure) -> None:
    """A title, labelled axes, legends clear of every axes and no text under 9 pt."""
    renderer = drawn(fig)
    axes = shown_axes(fig)
    assert fig.get_suptitle() or axes[0].get_title()  # a twin axes has no title of its own
    for ax in axes:
        assert ax.get_ylabel(), ax
        assert ax.get_xlabel() or not ax.xaxis.get_visible(), ax  # a twin shares the x axis
    legends = [*fig.legends, *[ax.get_legend() for ax in axes if ax.get_legend()]]
    assert legends
    for legend in legends:
        box = legend.get_window_extent(renderer)
        for ax in axes:
            assert intersection_area(box, ax.get_window_extent(renderer)) == 0
    texts = [t for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip()]
    small = [(t.get_text(), t.get_fontsize()) for t in texts if t.get_fontsize() < 9]
    assert not small, small


def all_rows():
    return [ok_row(label) for label in LABELS]


# ---------------------------------------------------------------- the plots


def test_every_plot_has_a_title_labelled_axes_an_outside_legend_and_large_fonts(caught):
    saved = run_plots(caught, all_rows(), removal=removal_curve())
    assert set(saved) == {"loo_scatter.png", "mislabel_recall.png", "harmful_removal.png",
                          "trace.png"}  # fmt: skip
    for name in ("loo_scatter.png", "mislabel_recall.png", "harmful_removal.png"):
        assert_explained(saved[name])


def test_loo_scatter_has_a_y_equals_x_line_and_states_each_methods_scale(caught):
    fig = run_plots(caught, all_rows())["loo_scatter.png"]
    panels = shown_axes(fig)
    assert len(panels) == len(LABELS)
    for ax, label, scale in zip(panels, LABELS, SCALES):
        diagonal = [
            line for line in ax.get_lines()
            if len(line.get_xdata()) >= 2 and np.allclose(line.get_xdata(), line.get_ydata())
        ]  # fmt: skip
        assert diagonal and diagonal[0].get_linestyle() == "--", label
        assert label in ax.get_title() and f"slope {scale:.3g}" in ax.get_title()
        assert ax.collections[0].get_offsets().shape[0] == len(LOO_IDX)  # the data
    title = fig.get_suptitle()
    assert "removed" in title and "fixed point" in title and "Dashed: y = x" in title
    assert "different scales" in title and "slope" in title
    assert any("y = x" in t.get_text() for t in fig.legends[0].get_texts())


def test_mislabel_recall_gives_twelve_methods_distinct_styles_and_labels_random(caught):
    fig = run_plots(caught, all_rows())["mislabel_recall.png"]
    ax = shown_axes(fig)[0]
    lines = {line.get_label(): line for line in ax.get_lines()}
    methods = [line for name, line in lines.items() if name.split(" (")[0] in LABELS]
    assert len(methods) == len(LABELS)  # the curves are identical, and all drawn
    pairs = {(matplotlib.colors.to_hex(m.get_color()), m.get_linestyle()) for m in methods}
    assert len(pairs) == len(methods)
    offsets = {m.get_markevery()[0] for m in methods}
    assert len(offsets) > len(methods) // 2  # markers staggered along identical curves
    assert "random ranking" in lines and any(t.get_text() == "random ranking" for t in ax.texts)
    assert ax.get_title().startswith(
        "Finding the planted noisy labels: ranking by most negative influence"
    )
    assert "(0.90)" in next(iter(lines))  # the AUC in the legend


@pytest.mark.parametrize("n", [16, 24, 40, 80])
def test_method_styles_are_distinct_pairs(n):
    styles = figures.method_styles(n)
    assert len({(s["color"], s["linestyle"]) for s in styles}) == n


def test_removal_plot_names_the_ranking_method_and_real_retraining(caught):
    rows = [failed_row(), *all_rows()]  # the first row failed: the next one ranks
    fig = run_plots(caught, rows, removal=removal_curve())["harmful_removal.png"]
    title = shown_axes(fig)[0].get_title().replace("\n", " ")
    assert "sam-gif " in title and "sam-hif [broken]" not in title
    assert "retraining" in title


def test_trace_titles_say_given_and_true_labels_and_what_colours_mean(caught):
    rows = [failed_row(), *all_rows()]
    fig = run_plots(caught, rows)["trace.png"]
    titles = [ax.get_title() for ax in fig.axes]
    first = [t for t in titles if t.startswith("test:")]
    assert len(first) == 3 and all("true" in t and "predicted" in t for t in first)
    given = [t for t in titles if t.startswith("given")]
    assert given and all("(true " in t for t in given)  # the noisy proponents
    assert any(t.startswith("label ") for t in titles)  # clean opponents
    ctx = make_ctx()
    for t in given:
        index = int(t.split("#")[1].split(",")[0])
        assert index in NOISY
        assert f"(true {int(ctx.data.clean_labels[index])})" in t
    suptitle = fig.get_suptitle()
    assert suptitle.startswith("sam-gif:") and "green" in suptitle and "red" in suptitle
    caption = fig.get_supxlabel()
    assert "Green" in caption and "red" in caption and "given 3 (true 5)" in caption
    drawn(fig)
    small = [t.get_text() for t in fig.findobj(Text) if t.get_text() and t.get_fontsize() < 9]
    assert not small


def test_plots_skip_failed_rows_and_write_nothing_when_every_estimator_failed(caught):
    saved = run_plots(caught, [failed_row("a"), failed_row("b")], scores={})
    assert saved == {}
    saved = run_plots(caught, [failed_row(), *all_rows()[:3]])
    assert len(shown_axes(saved["loo_scatter.png"])) == 3


def test_plots_without_planted_noise_or_mislabel_metrics(caught):
    rows = [{k: v for k, v in ok_row(label).items() if "mislabel" not in k and "recall" not in k}
            for label in LABELS[:2]]  # fmt: skip
    saved = run_plots(caught, rows, ctx=make_ctx(noise=False))
    assert set(saved) == {"loo_scatter.png", "trace.png"}
    given = [ax.get_title() for ax in saved["trace.png"].axes if "given" in ax.get_title()]
    assert not given  # no noisy label: every example reads "label c"


# ---------------------------------------------------------------- findings


def results(rows=None, removal=None, noisy=6, noise=0.1) -> dict:
    rows = fine_rows() if rows is None else rows
    ranked_by = next((r["label"] for r in rows if "error" not in r), None)
    return {
        "config": {
            "noise": noise,
            "damping": 0.0,
            "mislabel_by": "influence",
            "model": "logreg",
            "rho": 0.05,
            "weight_decay": 1e-3,
            "epochs": 30,
            "curvature": "hessian",
            "lds_fraction": 0.5,
        },  # fmt: skip
        "ground_truth": {
            "mode": "fixed_point",
            "fixed_point_residual": 1e-10,
            "retrain_seconds_mean": 0.5,
            "n_loo": 12,
            "lds_subsets": 5,
            "edit_set_size": noisy or 3,
            "retrained_accuracy": 0.86,
        },  # fmt: skip
        "data": {
            "name": "digits",
            "n_train": N_TRAIN,
            "n_val": 20,
            "n_test": 200,
            "noisy": noisy,
        },  # fmt: skip
        "accuracy": {"trained": 0.85, "attribution_point": 0.85},
        "methods": rows,
        "removal_curve": removal,
        "removal_ranked_by": ranked_by if removal else None,  # as run_compare records it
    }


def fine_rows() -> list[dict]:
    edits = {"edit_accuracy": 0.86, "retrained_accuracy": 0.86, "original_accuracy": 0.85}
    return [ok_row("sam-gif", **edits), ok_row("if", **edits), ok_row("captum-tracincp")]


def fine_removal() -> dict:
    return {
        "fractions": [0.0, 0.1, 0.2, 0.3],
        "accuracy_top": [0.80, 0.86, 0.85, 0.81],  # a tie with random at 30% is no finding
        "accuracy_random": [0.80, 0.80, 0.79, 0.81],
        "noisy_found": [0.0, 0.8, 1.0, 1.0],
    }


def test_findings_are_silent_when_all_is_fine():
    assert findings(results(removal=fine_removal())) == []


def test_findings_flag_an_edit_below_the_unedited_model_with_its_reason():
    rows = fine_rows()
    rows[0].update(edit_accuracy=0.80)  # sam-gif: 0.05 below unedited, 0.06 below retrained
    rows[1].update(edit_accuracy=0.83, retrained_accuracy=0.87)  # the Newton step
    found = findings(results(rows))
    assert len(found) == 2
    gif, hif = found
    assert gif.startswith("`sam-gif`") and "0.050 below" in gif and "0.850" in gif
    assert "0.860" in gif and "10 of 200 test examples" in gif and "overshoot" in gif
    assert hif.startswith("`if`") and "Newton" in hif and "damping (0.0)" in hif
    rows[1].update(damping="0.0123 (auto)")  # the row's own damping wins over the config's
    (_, hif) = findings(results(rows))
    assert "damping (0.0123 (auto))" in hif and "too large" in hif
    assert "6 of 60 examples" in hif and "0.870" in hif


def test_an_edit_as_good_as_retraining_is_flagged_without_blaming_the_edit():
    rows = fine_rows()
    rows[1].update(edit_accuracy=0.82, retrained_accuracy=0.82)
    (text,) = findings(results(rows))
    assert "does as well as retraining" in text and "Likely" not in text


def test_findings_flag_removal_below_random_at_the_right_fractions():
    rc = {
        "fractions": [0.0, 0.1, 0.2, 0.3],
        "accuracy_top": [0.70, 0.86, 0.79, 0.75],  # below random at 0%, 20% and 30%
        "accuracy_random": [0.80, 0.80, 0.81, 0.82],
        "noisy_found": [0.0, 0.8, 1.0, 1.0],
    }
    (text,) = findings(results(removal=rc))
    # the first flagged fraction is 20%: 0% removes nothing, at 10% the ranking wins
    assert "random ones at 20% removed: 0.790 against 0.810 at random" in text
    assert "; 30% removed: 0.750 against 0.820" in text and "10% removed" not in text
    assert "`sam-gif`" in text  # the ranking method
    assert "the 12 removed held 6 of the 6 planted noisy labels and 6 correctly" in text
    assert "noisy labels are exhausted" in text and "hard or atypical" in text
    assert "AUC is 0.90" in text and "poor" not in text


def test_findings_call_a_chance_level_ranking_poor():
    rows = fine_rows()
    rows[0]["mislabel_auc"] = 0.52
    rc = {"fractions": [0.0, 0.05], "accuracy_top": [0.8, 0.78], "accuracy_random": [0.8, 0.8],
          "noisy_found": [0.0, 0.1]}  # fmt: skip
    (text,) = findings(results(rows, removal=rc))
    assert "5% removed: 0.780 against 0.800" in text and "AUC is 0.52" in text
    assert "the ranking is poor" in text and "above some of the noisy labels" in text
    assert "exhausted" not in text  # 3 removed, 1 of the 6 noisy labels among them


def test_findings_list_failed_estimators_and_missing_noise():
    rows = [*fine_rows(), failed_row()]
    (text,) = findings(results(rows))
    assert "`sam-hif [broken]` failed" in text and "RuntimeError: singular matrix" in text
    no_noise = [{k: v for k, v in r.items() if "edit" not in k} for r in fine_rows()]
    (text,) = findings(results(no_noise, noisy=0, noise=0.0))
    assert text.startswith("--noise 0: no mislabel metrics")


# ---------------------------------------------------------------- table and report


def test_format_table_prints_failed_and_missing_metrics():
    nan_row = ok_row("if", mislabel_auc=float("nan"))
    del nan_row["recall_at_10"]
    table = format_table([ok_row("sam-gif"), failed_row(), nan_row])
    lines = table.splitlines()
    assert len(lines) == 5
    failed = [c.strip() for c in lines[3].strip("|").split("|")]
    assert failed[0] == "sam-hif [broken]" and failed[-2] == "0.25" and failed[-1] == "n/a"
    # the damping column (after LDS) is n/a, not "failed": a failed row chose none
    assert failed[1:-2] == ["failed"] * 3 + ["n/a"] + ["failed"] * 5
    missing = [c.strip() for c in lines[4].strip("|").split("|")]
    assert missing[5] == "n/a" and missing[7] == "n/a" and missing[1] == "+0.900"
    assert missing[4] == "n/a"  # no damping recorded for the row


def test_report_lists_failed_estimators_and_what_to_look_out_for():
    rows = [failed_row(), *fine_rows()]
    rows[1].update(edit_accuracy=0.80)
    text = _report(results(rows, removal=fine_removal()))
    failed = text.split("## Estimators that failed")[1].split("##")[0]
    assert "`sam-hif [broken]`" in failed and "RuntimeError: singular matrix" in failed
    look = text.split("## What to look out for")[1].split("##")[0]
    assert "overshoot" in look and "`sam-hif [broken]` failed" in look
    assert "Ranked by `sam-gif`" in text
    every_failed = _report(results([failed_row()]))
    assert "No plots: every estimator failed." in every_failed
    assert "Nothing flagged." in _report(results(removal=fine_removal()))


def test_findings_leave_results_unchanged():
    res = results(removal=fine_removal())
    before = copy.deepcopy(res)
    findings(res)
    assert res == before and not any(
        isinstance(v, float) and math.isnan(v) for r in res["methods"] for v in r.values()
    )


def test_findings_ignore_a_gap_below_one_test_example():
    # 200 test examples: 0.004 is less than one example, the noise of averaged random draws
    rc = {"fractions": [0.0, 0.1, 0.2], "accuracy_top": [0.8, 0.796, 0.79],
          "accuracy_random": [0.8, 0.8, 0.793], "noisy_found": [0.0, 0.5, 0.9]}  # fmt: skip
    assert findings(results(removal=rc)) == []
    rc["accuracy_top"][2] = 0.783  # now 2 test examples below random at 20%
    (text,) = findings(results(removal=rc))
    assert "20% removed: 0.783 against 0.793" in text and "10% removed" not in text


def test_a_hessian_edit_off_a_minimum_names_the_indefinite_hessian():
    edits = {"edit_accuracy": 0.2, "retrained_accuracy": 0.9, "original_accuracy": 0.85}
    rows = [
        ok_row("if [hessian]", curvature="hessian", **edits),
        ok_row("if [ggn]", curvature="ggn", **edits),
    ]
    res = results(rows)
    res["ground_truth"]["mode"] = "schedule"  # a network on its SGD trajectory
    hessian, ggn = findings(res)
    assert "indefinite" in hessian and "--curvature ggn" in hessian
    assert "indefinite" not in ggn
    res["ground_truth"]["mode"] = "fixed_point"  # at a minimum the reason does not apply
    assert all("indefinite" not in text for text in findings(res))


def test_a_figure_write_that_fails_midway_leaves_no_file(tmp_path):
    from matplotlib.figure import Figure

    from captum_sam.evaluation import report

    path = tmp_path / "plot.png"
    fig = Figure()

    def killed(f, **kwargs):
        f.write(b"\x89PNG half a file")
        raise KeyboardInterrupt  # the run is stopped while the file is written

    fig.savefig = killed
    with pytest.raises(KeyboardInterrupt):
        report._save(fig, str(path))
    assert os.listdir(tmp_path) == []  # neither the figure nor a temporary
    fig = Figure()
    fig.add_subplot().plot([0, 1])
    report._save(fig, str(path))
    assert path.read_bytes().startswith(b"\x89PNG")
