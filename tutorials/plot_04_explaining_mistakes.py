r"""
Explaining mistakes: proponents and opponents
=============================================

When a model gets a test example wrong, influence scores point at the training
examples responsible. For a test example :math:`z` with its *true* label,

* **proponents** (helpful, highest scores) are the training examples whose removal
  would raise :math:`z`'s loss: they push towards the right answer;
* **opponents** (harmful, most negative scores) are those whose removal would
  lower it: they push towards the mistake.

:func:`captum_sam.applications.trace` returns both for a batch of test examples
(it calls the estimator's ``influence(inputs, k=...)`` twice), and
:func:`captum_sam.applications.plot_trace` draws them. The script runs in well
under a minute on two CPU cores.
"""

# %%
# A model that makes mistakes
# ---------------------------
# Logistic regression trained with SAM on digits with 10% wrong labels.

import os
import tempfile

import matplotlib.pyplot as plt
import torch

from captum_sam import SAMInfluenceFunction, SAMTracInCP, train_sam
from captum_sam.applications import plot_trace, trace
from captum_sam.data import load_digits_data
from captum_sam.models import build_model

data = load_digits_data(n_train=400, n_val=100, n_test=300, noise=0.1, seed=0)
x_train, y_train = data.train.tensors
x_test, y_test = data.test.tensors
loss_fn = torch.nn.CrossEntropyLoss(reduction="none")
workdir = tempfile.TemporaryDirectory()
record_dir = os.path.join(workdir.name, "run")

model = build_model("logreg", data.image_shape, data.num_classes, seed=0)
train_sam(
    model,
    data.train,
    loss_fn,
    epochs=30,
    lr=0.5,
    rho=0.05,
    batch_size=32,
    weight_decay=1e-3,
    record_dir=record_dir,
    seed=0,
)
with torch.no_grad():
    predicted = model(x_test).argmax(dim=1)
wrong = torch.nonzero(predicted != y_test).flatten()
print(f"{len(wrong)} of {len(y_test)} test digits misclassified")

# %%
# Trace four mistakes with SAM-HIF
# --------------------------------
# SAM-HIF at the final weights; ``k=4`` examples on each side.

hif = SAMInfluenceFunction(
    model,
    data.train,
    record_dir,
    loss_fn=loss_fn,
    rho=0.05,
    weight_decay=1e-3,
    variant="exact",
    projection_dim=None,  # the exact inverse: no rank cap,
    hessian_reg=0.0,  # no added regulariser,
    hessian_inverse_tol=None,  # no eigenvalue dropped
)
k = 4
mistakes = wrong[:4]
batch = (x_test[mistakes], y_test[mistakes])
result = trace(hif, batch, k=k)
print("opponents of the first mistake:", result.harmful[0].tolist())
print("their scores:", [f"{s:+.3f}" for s in result.harmful_scores[0].tolist()])

# %%
# The grid: each row is one misclassified test digit, then its four proponents
# (green) and its four opponents (red), each with the label it was *trained* with
# and its score; a star marks a planted wrong label.


def draw(result, batch, title):
    n, k = result.helpful.shape
    fig, axes = plt.subplots(n, 2 * k + 1, figsize=(2 * k + 1, 1.35 * n + 0.5))
    for i in range(n):
        axes[i, 0].imshow(batch[0][i, 0], cmap="gray_r")
        axes[i, 0].set_title(
            f"true {int(batch[1][i])}\npredicted {int(predicted[mistakes[i]])}",
            fontsize=9,
            fontweight="bold",
        )
        for side, (indices, scores, colour) in enumerate(
            [
                (result.helpful, result.helpful_scores, "tab:green"),
                (result.harmful, result.harmful_scores, "tab:red"),
            ]
        ):
            for j in range(k):
                t = int(indices[i, j])
                ax = axes[i, 1 + side * k + j]
                ax.imshow(x_train[t, 0], cmap="gray_r")
                star = " *" if bool(data.noisy[t]) else ""
                ax.set_title(
                    f"label {int(y_train[t])}{star}\n{float(scores[i, j]):+.2f}",
                    fontsize=9,
                    color=colour,
                )
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"{title}   (* = planted wrong label)", fontsize=10)
    fig.tight_layout()
    return fig


fig = draw(result, batch, "SAM-HIF: test digit | 4 proponents | 4 opponents")

# %%
# Reading the grid: most proponents carry the true label, the evidence the model
# had for the right answer. The opponents are dominated by planted wrong labels,
# often a digit that looks like the test digit but was labelled with another
# class (in the first row, fours labelled 0, the very mistake the model makes).
# Not every example fits that story: influence is not similarity, and an example
# acts through the whole weight vector. Counting over the four rows:

opponents, proponents = result.harmful, result.helpful
true_label = batch[1].unsqueeze(1)
predicted_label = predicted[mistakes].unsqueeze(1)
print(
    f"proponents labelled with the true class:      "
    f"{(y_train[proponents] == true_label).double().mean():.0%}"
)
print(
    f"opponents labelled with the predicted class:  "
    f"{(y_train[opponents] == predicted_label).double().mean():.0%}"
)
print(
    f"wrong labels among opponents: {data.noisy[opponents].double().mean():.0%}, "
    f"among proponents: {data.noisy[proponents].double().mean():.0%}, "
    f"in the training set: {data.noisy.double().mean():.0%}"
)

# %%
# Wrong labels are over-represented at *both* ends: a wrongly labelled example
# has a large loss and a large gradient, so its influence is large in magnitude,
# whichever its sign for a given test digit. The opponents of a mistake are
# where to look for data to fix.
#
# The same mistakes with SAM-GIF, drawn by ``plot_trace``
# --------------------------------------------------------
# :func:`~captum_sam.applications.plot_trace` writes a PNG (it is meant for
# reports); here we read it back to show it. SAM-GIF scores training examples by
# their alignment with the test gradient along the recorded run.

gif = SAMTracInCP.from_trajectory(model, data.train, record_dir, loss_fn=loss_fn)
gif_result = trace(gif, batch, k=k)
path = plot_trace(
    gif_result,
    batch,
    data.train,
    os.path.join(workdir.name, "trace.png"),
    predictions=predicted[mistakes],
    noisy=data.noisy,
    title="SAM-GIF: misclassified test digit | 4 helpful | 4 harmful",
)

image = plt.imread(path)
fig = plt.figure(figsize=(image.shape[1] / 130, image.shape[0] / 130), dpi=130)
ax = fig.add_axes((0, 0, 1, 1))
ax.imshow(image)
ax.set_axis_off()

# %%
# The two estimators agree on the broad picture (same-class proponents,
# look-alike or wrongly labelled opponents) but not on the exact examples:

for i in range(len(batch[1])):
    shared = set(result.harmful[i].tolist()) & set(gif_result.harmful[i].tolist())
    print(f"mistake {i}: {len(shared)} of {k} opponents shared by SAM-HIF and SAM-GIF")

# %%
# Which one to believe? The :doc:`choosing-an-estimator tutorial
# <plot_05_choosing_an_estimator>` measures both against retraining. On a
# converged convex model like this one, the Hessian-based estimator tracks
# retraining much more closely.

workdir.cleanup()
