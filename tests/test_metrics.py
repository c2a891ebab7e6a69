import numpy as np
import pytest
import torch
from scipy.stats import pearsonr, rankdata, spearmanr
from sklearn.metrics import roc_auc_score

from captum_sam.evaluation import metrics as M

RNG = np.random.default_rng(0)
X = RNG.normal(size=50)
Y = 0.5 * X + RNG.normal(size=50)
TIES = np.array([1, 2, 2, 3, 3, 3, 5, 0, 0, 7], dtype=float)


def test_correlations_match_scipy():
    assert M.pearson(X, Y) == pytest.approx(pearsonr(X, Y)[0], abs=1e-12)
    assert M.spearman(X, Y) == pytest.approx(spearmanr(X, Y)[0], abs=1e-12)
    other = TIES[::-1].copy()
    assert M.spearman(TIES, other) == pytest.approx(spearmanr(TIES, other)[0], abs=1e-12)
    np.testing.assert_allclose(M.rankdata(TIES), rankdata(TIES))
    assert M.loo_correlation(torch.tensor(X), torch.tensor(Y)) == pytest.approx(
        (pearsonr(X, Y)[0], spearmanr(X, Y)[0]), abs=1e-12
    )
    assert np.isnan(M.pearson(np.ones(5), X[:5]))


def test_auc_and_recall_match_sklearn_and_hand_counts():
    labels = RNG.random(60) < 0.2
    scores = labels * 1.0 + RNG.normal(size=60)
    scores[:6] = 0.25  # ties
    assert M.detection_auc(scores, labels) == pytest.approx(
        roc_auc_score(labels, scores), abs=1e-12
    )
    order = np.argsort(-scores, kind="mergesort")
    for frac in [0.1, 0.4, 1.0, 0.05, 0.125]:  # ceil(frac * n): 6, 24, 60, 3, 8
        k = int(np.ceil(frac * 60 - 1e-9))
        assert M.recall_at(scores, labels, frac) == pytest.approx(
            labels[order[:k]].sum() / labels.sum()
        )
    x, found = M.recall_curve(scores, labels)
    assert found[0] == 0 and found[-1] == 1 and np.all(np.diff(found) >= 0) and x[-1] == 1
    with pytest.raises(ValueError, match="both"):
        M.detection_auc(scores, np.zeros(60, dtype=bool))


def test_lds_matches_hand_computation():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(4, 30, generator=g, dtype=torch.float64)
    masks = torch.rand(8, 30, generator=g) < 0.5
    losses = torch.randn(8, 4, generator=g, dtype=torch.float64)
    losses[:, 3] = 1.0  # a test example whose loss never changes is skipped
    got, per = M.lds(scores, masks, losses)
    ref = []
    for j in range(3):
        pred = [(scores[j] * (~masks[m]).double()).sum().item() for m in range(8)]
        ref.append(spearmanr(pred, losses[:, j])[0])
        # the same as minus the correlation with the subset's own attribution
        kept = [(scores[j] * masks[m].double()).sum().item() for m in range(8)]
        assert per[j] == pytest.approx(-spearmanr(kept, losses[:, j])[0], abs=1e-12)
    np.testing.assert_allclose(per[:3], ref, atol=1e-12)
    assert np.isnan(per[3]) and got == pytest.approx(np.mean(ref))
    perfect = M.lds(scores[:3], masks, ((~masks).double() @ scores[:3].T))[0]
    assert perfect == pytest.approx(1.0)


def test_editing_metrics():
    o, r = [torch.zeros(3)], [torch.tensor([3.0, 4.0, 0.0])]
    m = M.editing_metrics([torch.tensor([3.0, 4.0, 1.0])], r, o, (0.9, 0.91, 0.8))
    assert m.relative_distance == pytest.approx(1 / 5)
    assert (m.edited_accuracy, m.retrained_accuracy, m.original_accuracy) == (0.9, 0.91, 0.8)


def test_nan_constant_and_mismatched_inputs():
    """NaN makes a correlation NaN (scipy's answer) and is refused where it would be
    ranked; a constant gives NaN, not 0; shapes are checked, never broadcast."""
    x, y = RNG.normal(size=8), RNG.normal(size=8)
    x_nan = x.copy()
    x_nan[2] = np.nan
    assert np.isnan(M.spearman(x_nan, y)) and np.isnan(M.pearson(x_nan, y))
    assert all(np.isnan(v) for v in M.loo_correlation(x_nan, y))
    for c in (0.1, 0.7, 1e12):
        assert np.isnan(M.pearson(np.full(7, c), np.arange(7.0)))
        assert np.isnan(M.spearman(np.full(7, c), np.arange(7.0)))
    labels = np.arange(8) % 3 == 0
    with pytest.raises(ValueError, match="`scores` holds NaN"):
        M.detection_auc(x_nan, labels)
    with pytest.raises(ValueError, match="`scores` holds NaN"):
        M.recall_at(x_nan, labels, 0.5)
    with pytest.raises(ValueError, match="shape"):
        M.recall_at(x, labels[:5], 0.5)
    with pytest.raises(ValueError, match="not indices"):
        M.recall_at(x, np.array([0, 5, 1, 2, 3, 4, 6, 7]), 0.5)
    assert M.recall_at(np.arange(10.0), np.arange(10) == 9, 0.05) == 1.0  # 1 examined, not 0
    scores, keep = RNG.normal(size=(2, 6)), RNG.random((4, 6)) < 0.5
    losses = RNG.normal(size=(4, 2))
    bad = losses.copy()
    bad[1, 0] = np.nan
    with pytest.raises(ValueError, match="`losses` holds NaN"):
        M.lds(scores, keep, bad)
    with pytest.raises(ValueError, match="boolean masks"):
        M.lds(scores, np.argsort(RNG.random((4, 6)), axis=1), losses)
    with pytest.raises(ValueError, match="same model"):
        M.editing_metrics([torch.zeros(1)], [torch.zeros(3)], [torch.zeros(3)], (0, 0, 0))
    model = torch.nn.Linear(3, 2)
    feats = torch.randn(6, 3)
    labels_t = model(feats).argmax(1)
    assert M.accuracy(model, (feats, labels_t)) == 1.0
    with pytest.raises(ValueError, match="one class index per example"):
        M.accuracy(model, (feats, labels_t.unsqueeze(1)))
