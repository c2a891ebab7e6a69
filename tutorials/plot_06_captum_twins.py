r"""
The Captum drop-in: five classes, five one-line swaps
=====================================================

Every influence class of Captum has a SAM twin in ``captum_sam`` that takes the same
arguments. This tutorial runs each Captum class and its twin on one SAM-trained
network, with Captum's arguments passed unchanged:

1. at ``rho=0`` the twin must give Captum's numbers (it is the same estimator without
   the SAM perturbation);
2. at the ``rho`` the model was trained with, the twin takes its training gradients
   (and, for influence functions, its curvature) where SAM training took them, at the
   perturbed weights :math:`w + \epsilon(w)`, and the scores move.

It runs in about a minute on two CPU cores.
"""

# %%
# A small SAM-trained network
# ---------------------------
# A one-hidden-layer network (16 tanh units, 1210 parameters) on 300 of
# scikit-learn's bundled digits, trained for 15 epochs with SAM (``rho=0.05``) while
# :func:`captum_sam.train_sam` records a checkpoint at every epoch end. Captum's
# classes read those checkpoints with :func:`captum_sam.checkpoints_load_func`,
# which follows Captum's loader contract (it also reads plain ``state_dict`` files).

import copy
import tempfile
import warnings

import torch
from captum.influence import TracInCP, TracInCPFast, TracInCPFastRandProj
from captum.influence._core.arnoldi_influence_function import ArnoldiInfluenceFunction
from captum.influence._core.influence_function import NaiveInfluenceFunction

from captum_sam import (
    ExactNearestNeighbors,
    SAMArnoldiInfluenceFunction,
    SAMInfluenceFunction,
    SAMTracInCP,
    SAMTracInCPFast,
    SAMTracInCPFastRandProj,
    checkpoints_load_func,
    load_trajectory,
    train_sam,
)
from captum_sam.data import load_digits_data
from captum_sam.models import build_model

warnings.filterwarnings(
    "ignore", message="Input Tensor 0 did not already require gradients"
)
warnings.filterwarnings("ignore", message="WARNING: Using this implementation stores")
warnings.filterwarnings("ignore", message="To copy construct from a tensor")

RHO = 0.05
data = load_digits_data(n_train=300, n_val=50, n_test=20, seed=0)
model = build_model("mlp", data.image_shape, data.num_classes, hidden=16, seed=0)
workdir = tempfile.TemporaryDirectory()
train_sam(
    model,
    data.train,
    torch.nn.CrossEntropyLoss(reduction="none"),
    epochs=15,
    lr=0.5,
    rho=RHO,
    batch_size=32,
    weight_decay=1e-3,
    record_dir=f"{workdir.name}/run",
    seed=0,
)
trajectory = load_trajectory(f"{workdir.name}/run")
checkpoints = [c.path for c in trajectory.checkpoints][-3:]  # the last three epochs
final = trajectory.final.path
test = data.test.tensors
n_params = sum(p.numel() for p in model.parameters())
print(f"{n_params} parameters, checkpoints: {len(checkpoints)}")


def compare(name, captum_scores, twin_at_zero, twin_at_rho):
    """How far the twin is from Captum at rho = 0, and how far rho moves it."""
    same = (twin_at_zero - captum_scores).abs().max() / captum_scores.abs().max()
    moved = (twin_at_rho - twin_at_zero).abs().max() / twin_at_zero.abs().max()
    top_c = captum_scores.topk(5, dim=1).indices
    top_r = twin_at_rho.topk(5, dim=1).indices
    overlap = (
        sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(top_c, top_r))
        / top_c.numel()
    )
    print(
        f"{name:<26} rho=0 vs Captum: {same:.1e}   "
        f"rho={RHO} moves scores by {moved:.1%}, "
        f"top-5 proponents shared with Captum: {overlap:.0%}"
    )


# %%
# Captum classes get a copy of the model: they load checkpoints into the model they
# are given. The twins never modify theirs.
#
# ``TracInCP`` -> ``SAMTracInCP``
# -------------------------------
loss = torch.nn.CrossEntropyLoss(reduction="none")
common = dict(checkpoints_load_func=checkpoints_load_func, loss_fn=loss, batch_size=100)
captum = TracInCP(copy.deepcopy(model), data.train, checkpoints, **common)
compare(
    "TracInCP",
    captum.influence(test),
    SAMTracInCP(model, data.train, checkpoints, **common, rho=0.0).influence(test),
    SAMTracInCP(model, data.train, checkpoints, **common, rho=RHO).influence(test),
)

# %%
# ``TracInCPFast`` -> ``SAMTracInCPFast``
# ---------------------------------------
# The final layer's weight only, from its inputs and output gradients; Captum's Fast
# classes take a reducing loss. The SAM perturbation is still the training's, over
# every parameter: only the attributed gradient is restricted to the last layer.
sum_loss = torch.nn.CrossEntropyLoss(reduction="sum")
fast = dict(
    checkpoints_load_func=checkpoints_load_func, loss_fn=sum_loss, batch_size=100
)
captum = TracInCPFast(copy.deepcopy(model), "fc2", data.train, checkpoints, **fast)
compare(
    "TracInCPFast",
    captum.influence(test),
    SAMTracInCPFast(model, "fc2", data.train, checkpoints, **fast, rho=0.0).influence(
        test
    ),
    SAMTracInCPFast(model, "fc2", data.train, checkpoints, **fast, rho=RHO).influence(
        test
    ),
)

# %%
# ``TracInCPFastRandProj`` -> ``SAMTracInCPFastRandProj``
# -------------------------------------------------------
# Projected final-layer embeddings in a nearest-neighbour index. The projection is
# drawn exactly as Captum draws it from ``seed``. Captum's default index needs the
# ``annoy`` package; :class:`captum_sam.ExactNearestNeighbors` is an exact one for
# either class.
proj = dict(**fast, projection_dim=64, seed=3)
captum_nn = TracInCPFastRandProj(
    copy.deepcopy(model), "fc2", data.train, checkpoints, **proj,
    nearest_neighbors=ExactNearestNeighbors(),
)  # fmt: skip


def twin_proj(rho):
    return SAMTracInCPFastRandProj(
        model, "fc2", data.train, checkpoints, **proj,
        nearest_neighbors=ExactNearestNeighbors(), rho=rho,
    )  # fmt: skip


zero, moved = twin_proj(0.0), twin_proj(RHO)
compare(
    "TracInCPFastRandProj",
    captum_nn.influence(test, k=None),
    zero.influence(test, k=None),
    moved.influence(test, k=None),
)
print(
    "  proponents from the index equal:",
    torch.equal(
        captum_nn.influence(test, k=3).indices, zero.influence(test, k=3).indices
    ),
)

# %%
# ``NaiveInfluenceFunction`` -> ``SAMInfluenceFunction``
# ------------------------------------------------------
# Captum forms the Hessian of the summed loss and keeps its top ``projection_dim=50``
# eigen-directions; so does the twin, with ``variant="plain"`` at ``rho=0``. At
# ``rho > 0`` the default ``variant="fast"`` (SAM-HIF(Fast)) takes the curvature and
# the training gradients at :math:`w^* + \epsilon^*`.
hif = dict(checkpoints_load_func=checkpoints_load_func, loss_fn=loss, batch_size=300)
captum = NaiveInfluenceFunction(copy.deepcopy(model), data.train, final, **hif)
compare(
    "NaiveInfluenceFunction",
    captum.influence(test),
    SAMInfluenceFunction(
        model, data.train, final, **hif, rho=0.0, variant="plain"
    ).influence(test),
    SAMInfluenceFunction(model, data.train, final, **hif, rho=RHO).influence(test),
)

# %%
# ``ArnoldiInfluenceFunction`` -> ``SAMArnoldiInfluenceFunction``
# ---------------------------------------------------------------
# Arnoldi iterations from the same seeded start vector; the twin runs them on
# SAM-HIF(Fast)'s matrix when ``rho > 0``.
arnoldi = dict(**hif, arnoldi_dim=60, projection_dim=20)
captum = ArnoldiInfluenceFunction(copy.deepcopy(model), data.train, final, **arnoldi)
compare(
    "ArnoldiInfluenceFunction",
    captum.influence(test),
    SAMArnoldiInfluenceFunction(
        model, data.train, final, **arnoldi, rho=0.0, variant="plain"
    ).influence(test),
    SAMArnoldiInfluenceFunction(model, data.train, final, **arnoldi, rho=RHO).influence(
        test
    ),
)

# %%
# Reading the output
# ------------------
# The first number of every line is the largest difference from Captum at
# ``rho=0``, relative to the largest score: rounding only (about :math:`10^{-16}` in
# float64; the Arnoldi iteration accumulates more). The second is how much the SAM
# perturbation moves the scores at the training's ``rho``, and the last how many of
# each test digit's five strongest proponents stay the same. Whether the moved scores
# are *better* is a question for real retraining: see
# :doc:`plot_05_choosing_an_estimator` and ``captum-sam compare``, which report it
# honestly, including where SAM-aware estimators do not beat the standard ones.
