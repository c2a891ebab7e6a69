r"""
A convolutional network: SAM-GIF on CIFAR-shaped images
=======================================================

The other tutorials use small fully connected models on 8x8 digits. This one
trains a convolutional network (``"convnet"``: 3x3 convolution, ReLU, 2x2
max-pooling, linear head) with SAM on 3x32x32 colour images, and asks which
training images each test prediction leans on, with SAM-GIF
(:class:`captum_sam.SAMTracInCP`) over the recorded trajectory. It runs in well
under a minute on two CPU cores.

On a network of this size (83k parameters) a dense :math:`P \times P` curvature
does not fit, so the Hessian family (:class:`captum_sam.SAMInfluenceFunction`)
needs an iterative solver and is much slower; the gradient family shown here is
the one that scales, and it is what ``captum-sam compare --model convnet`` runs
by default.
"""

# %%
# Data and model
# --------------
# :func:`captum_sam.data.load_synthetic_cifar` generates a CIFAR-shaped data set
# from a seed: each of the 10 classes is a smooth colour pattern, shifted by up to
# 3 pixels, with a random contrast, a class-independent smooth distractor and
# pixel noise. Nothing is downloaded and torchvision is not needed. We flip 10% of
# the training labels on purpose, to look for them afterwards.

import tempfile

import matplotlib.pyplot as plt
import torch

from captum_sam import SAMTracInCP, train_sam
from captum_sam.data import load_synthetic_cifar
from captum_sam.models import build_model

data = load_synthetic_cifar(n_train=200, n_val=20, n_test=100, noise=0.1, seed=0)
model = build_model("convnet", data.image_shape, data.num_classes, seed=0)
loss_fn = torch.nn.CrossEntropyLoss(reduction="none")  # per-example losses
print(
    f"{len(data.train)} training images ({int(data.noisy.sum())} mislabelled), "
    f"{sum(p.numel() for p in model.parameters())} parameters"
)

# %%
# Train with SAM and record the trajectory
# ----------------------------------------
# The ReLU network needs a smaller learning rate than the digits models (0.1;
# ``captum-sam`` uses the same default for it).

workdir = tempfile.TemporaryDirectory()
record_dir = f"{workdir.name}/run"
train_sam(
    model,
    data.train,
    loss_fn,
    epochs=4,
    lr=0.1,
    rho=0.05,
    batch_size=20,
    weight_decay=1e-3,
    record_dir=record_dir,
    seed=0,
)
x_test, y_test = data.test.tensors
with torch.no_grad():
    accuracy = (model(x_test).argmax(dim=1) == y_test).double().mean().item()
print(f"test accuracy after 4 SAM epochs: {accuracy:.2f} (chance: 0.10)")

# %%
# Which training images does a prediction lean on?
# -------------------------------------------------
# :meth:`SAMTracInCP.from_trajectory <captum_sam.SAMTracInCP.from_trajectory>`
# replays every recorded step with its own batch, learning rate and SAM
# perturbation. ``influence(..., k=3)`` returns Captum's
# ``KMostInfluentialResults``: the three proponents (positive scores: they helped
# the test example) of the first test images.

gif = SAMTracInCP.from_trajectory(model, data.train, record_dir, loss_fn=loss_fn)
tests = (x_test[:3], y_test[:3])
top = gif.influence(tests, k=3)
x_train, y_train = data.train.tensors


def show(ax, image, title):
    ax.imshow(image.permute(1, 2, 0).clamp(0, 1).numpy())
    ax.set_title(title, fontsize=8)
    ax.axis("off")


fig, axes = plt.subplots(3, 4, figsize=(6, 4.8))
for row in range(3):
    show(axes[row, 0], tests[0][row], f"test, class {int(tests[1][row])}")
    pairs = zip(top.indices[row], top.influence_scores[row])
    for col, (idx, score) in enumerate(pairs):
        i = int(idx)
        note = " (flipped)" if bool(data.noisy[i]) else ""
        title = f"label {int(y_train[i])}{note}\n{score:.2g}"
        show(axes[row, col + 1], x_train[i], title)
fig.suptitle("test images and their top-3 SAM-GIF proponents")
fig.tight_layout()
plt.show()

# %%
# The proponents carry the test image's class as their label: the network has
# learnt the class patterns, whatever their shift. A flipped example whose
# *given* label is the test image's class pushes the same way (it was trained
# towards that label), so it can appear among the proponents too.
#
# Finding the flipped labels
# --------------------------
# A mislabelled example is hard to fit, so its self influence (its influence on
# its own loss) is large. Ranking the training set by self influence puts the
# flipped labels first far more often than chance.

self_influence = gif.self_influence()
order = torch.argsort(self_influence, descending=True)
found = int(data.noisy[order[:20]].sum())
print(
    f"{found} of the 20 images with the largest self influence have a flipped label "
    f"(a random choice of 20 finds {20 * data.noisy.double().mean().item():.0f} "
    "on average)"
)
