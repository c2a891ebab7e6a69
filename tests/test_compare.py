import importlib.util
import json

import pytest

from captum_sam.cli import main
from captum_sam.evaluation.compare import METHODS, CompareConfig


@pytest.mark.slow
def test_compare_quick_end_to_end(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert (
        main(["compare", "--quick", "--no-progress", "--out", str(out), "--curvature", "both"]) == 0
    )
    results = json.loads((out / "results.json").read_text())
    labels = [r["label"] for r in results["methods"]]
    for m in METHODS:
        if m in ("sam-hif-fast", "sam-hif", "sam-hif-exact", "if"):
            assert f"{m} [hessian]" in labels and f"{m} [ggn]" in labels
        else:
            assert m in labels
    for row in results["methods"]:
        for key in (
            "loo_pearson",
            "loo_spearman",
            "lds",
            "mislabel_auc",
            "recall_at_10",
            "recall_at_40",
            "runtime_s",
            "speedup_vs_retraining",
        ):
            assert isinstance(row[key], float), (row["label"], key)
        assert -1 <= row["loo_pearson"] <= 1 and 0 <= row["mislabel_auc"] <= 1
    hif = next(r for r in results["methods"] if r["label"] == "sam-hif-exact [hessian]")
    assert hif["loo_pearson"] > 0.5  # a convex model at its fixed point: first order works
    assert abs(hif["edit_accuracy"] - hif["retrained_accuracy"]) < 0.05
    for name in (
        "report.md",
        "loo_scatter.png",
        "mislabel_recall.png",
        "harmful_removal.png",
        "trace.png",
    ):
        assert (out / name).stat().st_size > 1000, name
    printed = capsys.readouterr().out
    assert "LOO Pearson" in printed and "sam-hif-exact [ggn]" in printed
    assert "| method" in (out / "report.md").read_text()


def test_compare_refuses_unknown_methods_and_missing_data(tmp_path, capsys):
    assert (
        main(
            [
                "compare",
                "--quick",
                "--methods",
                "sam-gif,tracin-magic",
                "--out",
                str(tmp_path / "a"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "tracin-magic" in err and all(m in err for m in METHODS)
    assert (
        main(["compare", "--quick", "--data-dir", str(tmp_path), "--out", str(tmp_path / "b")]) == 2
    )
    err = capsys.readouterr().err
    assert "MNIST" in err and "cifar-10-batches-py" in err and str(tmp_path) in err
    assert (
        main(
            [
                "compare",
                "--quick",
                "--dataset",
                "mnist",
                "--data-dir",
                str(tmp_path),
                "--out",
                str(tmp_path / "c"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    if importlib.util.find_spec("torchvision") is None:  # a CPU-only install without it
        assert "torchvision is not installed: pip install 'captum-sam[vision]'" in err
    else:
        assert "train-images-idx3-ubyte" in err
    with pytest.raises(ValueError, match="needs --data-dir"):
        CompareConfig(dataset="cifar10")


def test_results_json_is_standard_json_without_nan():
    import math

    import numpy as np
    import torch

    from captum_sam.evaluation.compare import _strict_json

    raw = {"auc": float("nan"), "rows": [{"r": np.float64(0.5), "t": torch.tensor(2.0)}],
           "inf": float("-inf"), "n": 3, "ok": True, "name": "x", "none": None}  # fmt: skip
    text = json.dumps(_strict_json(raw), allow_nan=False)
    back = json.loads(text)
    assert back == {"auc": None, "rows": [{"r": 0.5, "t": 2.0}], "inf": None, "n": 3,
                    "ok": True, "name": "x", "none": None}  # fmt: skip
    assert not math.isnan(back["rows"][0]["r"])
