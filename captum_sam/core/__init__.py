r"""The ``torch.func`` core every estimator is built from.

Pure functions of a parameter dict ``params`` (name -> tensor): the model is only a
structure for :func:`torch.func.functional_call`, never modified. Dataset-level
quantities are sums over an iterable of batches (tuples whose last element is the
label, as in Captum), so no ``P x P`` and no ``n x P`` matrix is formed here.

This package re-exports the functional API of its modules
(:mod:`~captum_sam.core.params`, :mod:`~captum_sam.core.losses`,
:mod:`~captum_sam.core.grads`, :mod:`~captum_sam.core.sam`,
:mod:`~captum_sam.core.curvature`); the plumbing modules (data, checkpoints, store,
projection, distributed, layers) are imported by path.
"""

from captum_sam.core import _quiet  # noqa: F401  (first: see its docstring)
from captum_sam.core.curvature import ggn_vp, hvp
from captum_sam.core.grads import (
    grad_sum,
    mean_grad,
    per_example_directional,
    per_example_grads,
    stacked_grad_sum,
    stacked_mean_grad,
    stacked_per_example_grads,
    summed_grad,
)
from captum_sam.core.losses import (
    FunctionalLoss,
    check_per_example_loss,
    loss_reduction,
    to_device,
)
from captum_sam.core.params import (
    Batch,
    Params,
    attributed_names,
    check_finite,
    detached_params,
    eval_mode,
    flatten,
    tree_add,
    tree_dot,
    tree_scale,
    unflatten,
)
from captum_sam.core.sam import (
    per_example_perturbations,
    perturbation_jvp,
    perturbation_vjp,
    sam_perturbation,
    sam_perturbation_list,
)

__all__ = [
    "Batch",
    "Params",
    "FunctionalLoss",
    "attributed_names",
    "check_finite",
    "check_per_example_loss",
    "detached_params",
    "eval_mode",
    "flatten",
    "ggn_vp",
    "grad_sum",
    "hvp",
    "loss_reduction",
    "mean_grad",
    "per_example_directional",
    "per_example_grads",
    "per_example_perturbations",
    "perturbation_jvp",
    "perturbation_vjp",
    "sam_perturbation",
    "sam_perturbation_list",
    "stacked_grad_sum",
    "stacked_mean_grad",
    "stacked_per_example_grads",
    "summed_grad",
    "to_device",
    "tree_add",
    "tree_dot",
    "tree_scale",
    "unflatten",
]
