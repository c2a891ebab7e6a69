r"""
Finding mislabeled data with SAM-GIF and SAM-HIF
================================================

A wrong label hurts a model in a recognisable way: the example pulls the weights
towards the wrong class, which raises the loss of correctly labelled validation
examples. Influence estimators rank training examples by that harm. This tutorial
plants label noise in the digits, trains with SAM, and ranks the training set two
ways with :func:`captum_sam.applications.detect_mislabeled`:

* ``by="influence"``: the most negative influence on a clean validation set first
  (:math:`IS_k = \sum_{z \in D_{val}} \mathrm{score}(z, z_k)`, the paper's
  Theorem 4.8);
* ``by="self"``: the highest self influence first (no validation data needed).

We then look at how many planted errors each ranking finds after examining a
fraction of the data, with :func:`captum_sam.evaluation.metrics.recall_curve`.
The whole script runs in well under a minute on two CPU cores.
"""

# %%
# Plant label noise
# -----------------
# :func:`~captum_sam.data.load_digits_data` flips 10% of the training labels to
# another class and records which ones in ``data.noisy``. The validation and test
# labels stay clean.

import tempfile

import matplotlib.pyplot as plt
import numpy as np
import torch

from captum_sam import SAMInfluenceFunction, SAMTracInCP, train_sam
from captum_sam.applications import detect_mislabeled
from captum_sam.data import load_digits_data
from captum_sam.evaluation.metrics import detection_auc, recall_curve
from captum_sam.models import build_model

data = load_digits_data(n_train=400, n_val=200, n_test=200, noise=0.1, seed=0)
x_train, y_given = data.train.tensors
noisy = data.noisy
print(f"{int(noisy.sum())} of {len(noisy)} training labels are wrong")

fig, axes = plt.subplots(1, 8, figsize=(9, 1.8))
for ax, i in zip(axes, torch.nonzero(noisy).flatten()[:8].tolist()):
    ax.imshow(x_train[i, 0], cmap="gray_r")
    ax.set_title(
        f"labelled {int(y_given[i])}\n(really {int(data.clean_labels[i])})", fontsize=8
    )
    ax.axis("off")
fig.suptitle("some planted errors", fontsize=10)
fig.tight_layout()

# %%
# Train with SAM and build the estimators
# ----------------------------------------
# A multinomial logistic regression (convex) trained for 30 epochs with SAM,
# recorded. SAM-GIF reads the recorded trajectory; SAM-HIF works at the final
# weights. ``fast`` and ``exact`` are two members of the SAM-HIF family
# (see :doc:`/math`); the model has 650 parameters, so the ``"auto"`` solver forms
# the matrix and solves it exactly.

loss_fn = torch.nn.CrossEntropyLoss(reduction="none")
rho, weight_decay = 0.05, 1e-3
workdir = tempfile.TemporaryDirectory()


def train(model_name, record_dir):
    model = build_model(model_name, data.image_shape, data.num_classes, seed=0)
    train_sam(
        model,
        data.train,
        loss_fn,
        epochs=30,
        lr=0.5,
        rho=rho,
        batch_size=32,
        weight_decay=weight_decay,
        record_dir=record_dir,
        seed=0,
    )
    return model


def estimators(model, record_dir, curvature="hessian", damping=0.0):
    hif = dict(
        loss_fn=loss_fn,
        rho=rho,
        weight_decay=weight_decay,
        curvature=curvature,
        damping=damping,
        batch_size=200,
        projection_dim=None,  # the exact inverse (Captum's default keeps 50 directions)
        hessian_reg=0.0,
        hessian_inverse_tol=None,
    )
    return {
        "SAM-GIF": SAMTracInCP.from_trajectory(
            model, data.train, record_dir, loss_fn=loss_fn, batch_size=200
        ),
        "SAM-HIF (fast)": SAMInfluenceFunction(
            model, data.train, record_dir, variant="fast", **hif
        ),
        "SAM-HIF (exact)": SAMInfluenceFunction(
            model, data.train, record_dir, variant="exact", **hif
        ),
    }


logreg = train("logreg", f"{workdir.name}/logreg")
with torch.no_grad():
    x_test, y_test = data.test.tensors
    print(f"test accuracy: {(logreg(x_test).argmax(1) == y_test).double().mean():.3f}")
logreg_estimators = estimators(logreg, f"{workdir.name}/logreg")

# %%
# Rank the training set, both ways
# --------------------------------
# :class:`~captum_sam.applications.Ranking` holds the order (most suspicious
# first) and the suspicion of every example: minus the validation influence
# score, or the self influence.


def rankings(ests):
    out = {}
    for name, est in ests.items():
        out[name] = {
            "influence": detect_mislabeled(est, data.val.tensors, by="influence"),
            "self": detect_mislabeled(est, by="self"),
        }
    return out


logreg_rankings = rankings(logreg_estimators)


def plot_recall(ranks, title):
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, by, label in [
        (axes[0], "influence", "most harmful to the validation set first"),
        (axes[1], "self", "highest self influence first"),
    ]:
        for name, r in ranks.items():
            x, y = recall_curve(r[by].suspicion, noisy)
            auc = detection_auc(r[by].suspicion, noisy)
            ax.plot(x, y, lw=1.5, label=f"{name} (AUC {auc:.2f})")
        ax.plot([0, 1], [0, 1], "k--", lw=0.8, label="random order")
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("fraction of training data examined")
        ax.legend(fontsize=8, loc="lower right")
    axes[0].set_ylabel("fraction of wrong labels found")
    fig.suptitle(title)
    fig.tight_layout()


plot_recall(logreg_rankings, "Logistic regression trained with SAM")

# %%
# What the curves say. Ranked by harm to the validation set, both SAM-HIF
# variants find most of the planted errors in the first tenth of the data (their
# curves coincide: at ``rho = 0.05`` the SAM corrections of the ``exact`` variant
# are tiny on this model). SAM-GIF does only somewhat better than random: it adds
# up gradient alignments over the whole run, including the early steps taken far
# from the final weights, while the validation loss we explain is that of the
# final model. Ranked by self influence, all three find nearly every error early:
# a wrongly labelled example has a large loss and a large gradient, and the model
# would fit it much worse without it, which is what self influence measures. Self
# influence needs no validation set, but it also flags examples that are merely
# unusual; the validation ranking asks the more pointed question "does this
# example hurt the predictions I care about?".
#
# The most suspicious examples
# ----------------------------
# The top of the SAM-HIF (exact) validation ranking, with the label each
# example was given. Red titles mark planted errors.

top = logreg_rankings["SAM-HIF (exact)"]["influence"].indices[:16].tolist()
fig, axes = plt.subplots(2, 8, figsize=(9, 3.2))
for ax, i in zip(axes.ravel(), top):
    ax.imshow(x_train[i, 0], cmap="gray_r")
    wrong = bool(noisy[i])
    ax.set_title(
        f"#{i} label {int(y_given[i])}", fontsize=8, color="red" if wrong else "black"
    )
    ax.axis("off")
found = int(noisy[top].sum())
fig.suptitle(
    f"16 most harmful training examples: {found} are planted errors", fontsize=10
)
fig.tight_layout()

# %%
# A non-convex network
# --------------------
# The same experiment on a small tanh network. Its Hessian is indefinite, so the
# SAM-HIF estimators use the generalised Gauss-Newton curvature
# (``curvature="ggn"``, positive semi-definite) with a little damping.

mlp = train("mlp", f"{workdir.name}/mlp")
mlp_rankings = rankings(
    estimators(mlp, f"{workdir.name}/mlp", curvature="ggn", damping=1e-3)
)
plot_recall(mlp_rankings, "Tanh network trained with SAM (GGN curvature)")

# %%
# A summary of both models, as areas under the ROC curve (0.5 is random, 1 is a
# perfect ranking):

names = list(logreg_rankings)
fig, ax = plt.subplots(figsize=(8, 3.5))
width = 0.2
for j, (model_name, ranks) in enumerate(
    [("logreg", logreg_rankings), ("mlp", mlp_rankings)]
):
    for k, by in enumerate(["influence", "self"]):
        aucs = [detection_auc(ranks[n][by].suspicion, noisy) for n in names]
        offset = (2 * j + k - 1.5) * width
        ax.bar(
            np.arange(len(names)) + offset, aucs, width, label=f"{model_name}, by {by}"
        )
ax.axhline(0.5, color="k", ls="--", lw=0.8)
ax.set_xticks(np.arange(len(names)), names)
ax.set_ylim(0.4, 1.15)
ax.set_ylabel("mislabel AUC")
ax.legend(fontsize=8, ncol=4, loc="upper center")
fig.tight_layout()

# %%
# On the network the picture shifts: the validation ranking of SAM-GIF improves
# and that of SAM-HIF drops. A likely reason is that an influence function
# linearises the model around the final weights, a rougher description of a
# non-convex network than of a convex one. Self influence stays the most
# reliable detector for every estimator. Which ranking to trust therefore
# depends on the model: check it on planted noise first, as done here
# (``captum-sam compare --mislabel-by self`` does the same at a larger scale).

workdir.cleanup()
# sphinx_gallery_thumbnail_number = 2
