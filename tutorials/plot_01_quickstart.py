r"""
Quickstart: from Captum's TracInCP to SAM-GIF
=============================================

Captum's ``TracInCP`` scores a training example by how much its gradient lined up
with a test example's gradient along the saved checkpoints. A model trained with
Sharpness-Aware Minimization (SAM) never stepped along that gradient: every update
used the gradient at the *perturbed* weights :math:`w + \epsilon(w)`.
:class:`captum_sam.SAMTracInCP` (SAM-GIF) takes the training gradient there, and is
otherwise used exactly like ``TracInCP``.

This tutorial trains a small network with SAM while recording its trajectory,
scores it with Captum's ``TracInCP``, swaps in ``SAMTracInCP`` and compares the
scores. It runs in well under a minute on two CPU cores.
"""

# %%
# Data and model
# --------------
# scikit-learn ships 1797 handwritten 8x8 digits, so nothing is downloaded.
# :func:`captum_sam.data.load_digits_data` splits them; we keep 300 training and
# 100 test examples. The model is a one-hidden-layer tanh network (2410
# parameters). Everything is in float64, which makes exact comparisons possible.

import tempfile
import warnings

import matplotlib.pyplot as plt
import numpy as np
import torch
from captum.influence import TracInCP

from captum_sam import SAMTracInCP, checkpoints_load_func, load_trajectory, train_sam
from captum_sam.data import load_digits_data
from captum_sam.models import build_model

# Captum notes that it switched on gradients for the inputs; that is expected here.
warnings.filterwarnings(
    "ignore", message="Input Tensor 0 did not already require gradients"
)

data = load_digits_data(n_train=300, n_val=100, n_test=100, seed=0)
model = build_model("mlp", data.image_shape, data.num_classes, hidden=32, seed=0)
loss_fn = torch.nn.CrossEntropyLoss(reduction="none")  # per-example losses
print(
    f"{len(data.train)} training and {len(data.test)} test digits, "
    f"{sum(p.numel() for p in model.parameters())} parameters"
)

# %%
# Train with SAM and record the trajectory
# -----------------------------------------
# :func:`captum_sam.train_sam` runs SAM on top of SGD and, given ``record_dir``,
# writes the initial weights, a checkpoint at every epoch end and a JSON manifest
# with every step's learning rate, ``rho`` and batch indices. (To use the optimizer
# in your own loop, see :class:`captum_sam.SAM` and
# :class:`captum_sam.TrajectoryRecorder`.)

workdir = tempfile.TemporaryDirectory()
record_dir = f"{workdir.name}/run"
result = train_sam(
    model,
    data.train,
    loss_fn,
    epochs=20,
    lr=0.5,
    rho=0.05,
    batch_size=32,
    weight_decay=1e-3,
    record_dir=record_dir,
    seed=0,
)
trajectory = load_trajectory(record_dir)
checkpoints = [c.path for c in trajectory.checkpoints]

x_test, y_test = data.test.tensors
with torch.no_grad():
    accuracy = (model(x_test).argmax(dim=1) == y_test).double().mean().item()
print(
    f"{len(trajectory.steps)} SAM steps recorded, {len(checkpoints)} checkpoints, "
    f"test accuracy {accuracy:.3f}"
)

fig, ax = plt.subplots(figsize=(5, 3))
ax.plot(range(1, len(result.epoch_losses) + 1), result.epoch_losses, "o-")
ax.set_xlabel("epoch")
ax.set_ylabel("mean training loss")
ax.set_title("SAM training (rho = 0.05)")
fig.tight_layout()

# %%
# Captum's TracInCP on the saved checkpoints
# -------------------------------------------
# :func:`captum_sam.checkpoints_load_func` follows Captum's convention: it loads a
# checkpoint into the model and returns its learning rate.

test_batch = (x_test[:40], y_test[:40])

tracin = TracInCP(
    model,
    data.train,
    checkpoints,
    checkpoints_load_func=checkpoints_load_func,
    loss_fn=torch.nn.CrossEntropyLoss(reduction="sum"),
    batch_size=100,
    sample_wise_grads_per_batch=True,
)
scores_captum = tracin.influence(test_batch)
print("Captum TracInCP scores:", tuple(scores_captum.shape), "(n_test, n_train)")

# %%
# Swap in SAMTracInCP
# -------------------
# The constructor takes Captum's arguments plus the SAM settings of training
# (``rho``, ``adaptive``). Its ``loss_fn`` must return one loss per example
# (``reduction="none"``). With ``rho=0`` there is no perturbation, and the scores
# are Captum's, to rounding error.

sam_rho0 = SAMTracInCP(
    model, data.train, checkpoints, loss_fn=loss_fn, batch_size=100, rho=0.0
)
scores_rho0 = sam_rho0.influence(test_batch)
print(
    "largest |SAMTracInCP(rho=0) - TracInCP|:",
    f"{(scores_rho0 - scores_captum).abs().max().item():.1e}",
    f"(scores reach {scores_captum.abs().max().item():.0f})",
)

# %%
# At the radius the model was trained with, the training gradients move to
# :math:`w_c + \epsilon_c`, where :math:`\epsilon_c` is the SAM perturbation
# computed from the mean training gradient at checkpoint :math:`c`.

sam = SAMTracInCP(
    model, data.train, checkpoints, loss_fn=loss_fn, batch_size=100, rho=0.05
)
scores_sam = sam.influence(test_batch)

a, b, c = (s.flatten().numpy() for s in (scores_captum, scores_rho0, scores_sam))
relative = np.linalg.norm(c - a) / np.linalg.norm(a)
fig, axes = plt.subplots(1, 2, figsize=(9, 4))
for ax, y, title in [
    (axes[0], b, "SAMTracInCP, rho = 0: identical"),
    (axes[1], c, f"SAMTracInCP, rho = 0.05: {relative:.1%} relative change"),
]:
    ax.scatter(a, y, s=3, alpha=0.4)
    lim = [min(a.min(), y.min()), max(a.max(), y.max())]
    ax.plot(lim, lim, "k--", lw=0.8)
    ax.set_xlabel("Captum TracInCP score")
    ax.set_ylabel("SAMTracInCP score")
    ax.set_title(title, fontsize=10)
fig.suptitle(f"{a.size} (test, train) pairs")
fig.tight_layout()

# %%
# With ``rho = 0.05`` on this small, well-trained network the two agree closely
# (the perturbation is small compared with the weights), so the ranking of
# training examples barely changes. The difference grows with ``rho``, with ASAM
# (``adaptive=True``) and with the sharpness of the loss, and only the SAM-aware
# version is tied to what training actually did.
#
# The trajectory form
# -------------------
# The checkpoint form credits every training example at every checkpoint with the
# checkpoint's learning rate. A recorded run knows more: which examples were in
# each batch and the rate of each step.
# :meth:`SAMTracInCP.from_trajectory <captum_sam.SAMTracInCP.from_trajectory>` sums
# :math:`\eta_t / |B_t|` over the steps whose batch :math:`B_t` contained the
# example, with the perturbation of that batch. This is SAM-GIF as the paper
# defines it; its scores are on the scale of a loss change.

gif = SAMTracInCP.from_trajectory(
    model, data.train, record_dir, loss_fn=loss_fn, batch_size=100
)
scores_gif = gif.influence(test_batch)

fig, ax = plt.subplots(figsize=(4.5, 4))
c, g = scores_sam.flatten().numpy(), scores_gif.flatten().numpy()
ax.scatter(c, g, s=3, alpha=0.4)
ax.set_xlabel("checkpoint form (eta_c per checkpoint)")
ax.set_ylabel("trajectory form (eta_t / |B_t| per step)")
r = np.corrcoef(c, g)[0, 1]
ax.set_title(f"SAM-GIF, two forms: Pearson {r:.3f}", fontsize=10)
fig.tight_layout()

# %%
# The same Captum API
# -------------------
# Everything Captum's estimators offer works unchanged: ``k`` most influential
# examples, self influence, and the intermediate quantities whose inner products
# are the scores.

top = sam.influence(test_batch, k=3, proponents=True)
print("test example 0 (label", int(y_test[0]), ")")
print(
    "  3 proponents:",
    top.indices[0].tolist(),
    "labels",
    data.train.tensors[1][top.indices[0]].tolist(),
)
bottom = sam.influence(test_batch, k=3, proponents=False)
print(
    "  3 opponents: ",
    bottom.indices[0].tolist(),
    "labels",
    data.train.tensors[1][bottom.indices[0]].tolist(),
)
print(
    "self influence of the first 5 training examples:",
    [round(v, 1) for v in sam.self_influence()[:5].tolist()],
)

# %%
# The Hessian-based estimators are used the same way:
# ``SAMInfluenceFunction(model, data.train, record_dir, loss_fn=loss_fn, rho=0.05,
# weight_decay=1e-3)`` is built like Captum's ``NaiveInfluenceFunction``; the next
# tutorials use both families.

workdir.cleanup()
# sphinx_gallery_thumbnail_number = 2
