"""Argument checking and wiring shared by the SAM-HIF twins (Naive and Arnoldi).

:func:`prepare` validates Captum's ``InfluenceFunctionBase`` arguments and SAM's, sets
the attributes Captum's classes expose (without loading the checkpoint into the
user's model or touching ``requires_grad``, which Captum does), loads the checkpoint
into a private copy, computes the mean training gradient and returns the
:class:`~captum_sam.hif.operator.SAMOperator`.
"""

from __future__ import annotations

import os
from dataclasses import fields
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from captum_sam import core as F
from captum_sam.core.batchnorm import (
    BatchStatistics,
    batchnorm_layers,
    check_batchnorm,
    warn_on_batchnorm_gap,
)
from captum_sam.core.checkpoints import CheckpointLoader, model_device
from captum_sam.core.data import (
    check_batch_size,
    dataset_size,
    local_batches,
    on_device,
    ordered_dataset,
    validate_batch,
)
from captum_sam.core.distributed import all_reduce_sum, all_reduce_tree, require_same
from captum_sam.core.errors import check_number
from captum_sam.core.layers import linear
from captum_sam.core.layers.sites import layer_sites
from captum_sam.core.params import check_layers, sample_wise_names, scope_names
from captum_sam.core.projection import RandomProjection
from captum_sam.hif.operator import CURVATURES, VARIANTS, SAMOperator
from captum_sam.solvers import METHODS, SolverOptions
from captum_sam.trajectory import MANIFEST, load_trajectory

__all__ = ["prepare", "resolve_checkpoint", "solver_options"]


def solver_options(options: SolverOptions | dict[str, Any] | None) -> SolverOptions:
    """``SolverOptions`` from an instance, a dict of its fields, or ``None``."""
    if isinstance(options, dict):
        valid = {f.name for f in fields(SolverOptions)}
        unknown = set(options) - valid
        if unknown:
            raise ValueError(f"unknown `solver_options` {sorted(unknown)}; valid: {sorted(valid)}")
        return SolverOptions(**options)
    return options or SolverOptions()


def resolve_checkpoint(checkpoint: Any) -> str:
    """A checkpoint file, or the final checkpoint of a record directory."""
    if not isinstance(checkpoint, (str, os.PathLike)):
        raise TypeError(f"`checkpoint` must be a path, got {type(checkpoint).__name__}")
    path = os.fspath(checkpoint)
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, MANIFEST)):
        return load_trajectory(path).final.path
    if not os.path.exists(path):
        raise FileNotFoundError(f"`checkpoint` {path!r} does not exist")
    return path


def _loader(data: Any, batch_size: Any, name: str) -> Any:
    if isinstance(data, DataLoader):
        return data
    if isinstance(data, (tuple, list)) or not isinstance(data, Dataset):
        raise TypeError(f"`{name}` must be a Dataset or a DataLoader, got {type(data).__name__}")
    check_batch_size(batch_size, name)
    return DataLoader(data, batch_size, shuffle=False)


def prepare(
    est: Any,
    train_dataset: Any,
    layers: Any,
    hessian_dataset: Any,
    sample_wise_grads_per_batch: bool,
    variant: str,
    curvature: str,
    solver: str,
    rho: Any,
    adaptive: Any,
    regularisers: dict[str, Any],
    rescale_hessian: Any,
    sketch: tuple[int | None, str, int],
    factorize: Any,
    options: SolverOptions,
    perturbation_scope: str = "trainable",
    batchnorm: tuple[Any, Any] = ("eval", 0.1),
) -> SAMOperator:
    """Validate, set Captum's attributes on ``est``, and build its operator.

    ``regularisers``: ``weight_decay``, ``damping`` and ``hessian_reg``;
    ``batchnorm``: ``(batchnorm, batchnorm_tolerance)``.
    """
    check_batchnorm(*batchnorm)
    if batchnorm[0] == "batch":
        raise ValueError(
            "batchnorm='batch' is defined for the trajectory form of SAM-GIF only "
            "(SAMTracInCP.from_trajectory), where each example has the recorded batch it "
            "was trained in; the Hessian family works at the final weights with no batch "
            "record: use batchnorm='eval'"
        )
    if variant not in VARIANTS:
        raise ValueError(f"`variant` must be one of {VARIANTS}, got {variant!r}")
    if curvature not in CURVATURES:
        raise ValueError(f"`curvature` must be one of {CURVATURES}, got {curvature!r}")
    if solver not in METHODS:
        raise ValueError(f"`solver` must be one of {METHODS}, got {solver!r}")
    for name, flag in (
        ("adaptive", adaptive),
        ("factorize", factorize),
        ("rescale_hessian", rescale_hessian),
    ):
        if not isinstance(flag, bool):
            raise TypeError(f"`{name}` must be a bool, got {flag!r}")
    rho = check_number("rho", rho)
    reg = {k: check_number(k, v) for k, v in regularisers.items()}
    model = est.model
    est.sample_wise_grads_per_batch = sample_wise_grads_per_batch
    est.reduction_type = F.loss_reduction(est.loss_fn, "loss_fn", sample_wise_grads_per_batch)
    est.test_reduction_type = F.loss_reduction(
        est.test_loss_fn, "test_loss_fn", sample_wise_grads_per_batch
    )
    est.train_dataloader = _loader(train_dataset, est.batch_size, "train_dataset")
    est.hessian_dataloader = (
        est.train_dataloader
        if hessian_dataset is None
        else _loader(hessian_dataset, est.batch_size, "hessian_dataset")
    )
    est.train_data = ordered_dataset(train_dataset)
    est.n_train = len(est.train_data)
    require_same(est.n_train, "the size of `train_dataset`")
    if est.n_train == 0:
        raise ValueError("`train_dataset` is empty")
    n_hessian = dataset_size(est.hessian_dataloader)
    if n_hessian == 0:
        raise ValueError("`hessian_dataset` is empty")
    est.layers = check_layers(layers)
    names = F.attributed_names(model, est.layers)
    if sample_wise_grads_per_batch:
        names = sample_wise_names(model, names)
    modules = dict(model.named_modules())
    est.layer_modules = None if est.layers is None else [modules[n] for n in est.layers]
    est.names = names
    est.device = model_device(model)
    loader = CheckpointLoader(model, names, est.checkpoints_load_func)
    state = loader(est.checkpoint)
    scratch = loader.scratch  # every functional call and hook runs on this private copy
    bn_layers = batchnorm_layers(scratch)  # before eval(): frozen layers are read from flags
    scratch.eval()  # attribution runs the model in eval mode
    # per-example gradients from layer factors where they apply (sides.gradients), each
    # loss function checked against vmap on its first batch
    est._grad_sites = layer_sites(scratch, names) if factorize else None
    est._grad_checked = {}
    est.loader = loader
    loss = F.FunctionalLoss(scratch, est.loss_fn, state.frozen, est.reduction_type)
    est._loss = loss
    est._test_loss = F.FunctionalLoss(
        scratch, est.test_loss_fn, state.frozen, est.test_reduction_type
    )
    first = next(iter(on_device(est.train_dataloader, est.device)))
    validate_batch(loss, state.params, first, "train_dataset")
    if batchnorm[1] is not None and bn_layers:  # eval- against train-mode loss at w*
        batches = [b for _, b in zip(range(4), on_device(est.train_dataloader, est.device))]
        warn_on_batchnorm_gap(
            BatchStatistics(bn_layers), loss, state.params, batches, batchnorm[1],
            est.checkpoint, "eval",
        )  # fmt: skip
    # the perturbation's gradient runs over its whole scope (the training's)
    est.perturbation_scope = perturbation_scope
    extra_names = [n for n in scope_names(model, names, perturbation_scope, rho) if n not in names]
    extra = {n: state.frozen[n] for n in extra_names}
    scope_loss = loss.bind({n: v for n, v in state.frozen.items() if n not in extra})
    local = (b for _, b in local_batches(est.train_dataloader, est.device))
    total, count = F.grad_sum(scope_loss, {**state.params, **extra}, local, "train_dataset")
    all_reduce_tree(total)
    count = int(all_reduce_sum(torch.tensor([count], dtype=torch.float64))[0])
    mean_full = F.tree_scale(total, 1.0 / count)
    F.check_finite(mean_full, "training gradients at the checkpoint")
    mean_grad = {n: mean_full[n] for n in names}
    dim, kind, seed = sketch
    sizes = {n: state.params[n].numel() for n in names}
    est.sketch = (
        None
        if dim is None
        else RandomProjection(sizes, dim, kind, seed, names=("sketch_dim", "sketch"))
    )
    est.hessian_scale = est.n_train / n_hessian if rescale_hessian else 1.0
    sites = linear.linear_sites(scratch, names) if factorize and curvature == "ggn" else None
    return SAMOperator(
        loss=loss,
        names=names,
        params=state.params,
        mean_grad=mean_grad,
        rho=rho,
        adaptive=adaptive,
        variant=variant,
        curvature=curvature,
        n_train=est.n_train,
        regulariser=est.n_train * (reg["weight_decay"] + reg["damping"]) + reg["hessian_reg"],
        hessian_data=est.hessian_dataloader,
        hessian_scale=est.hessian_scale,
        sample_size=est.batch_size or 64,
        seed=options.seed,
        device=est.device,
        ggn_sites=sites,
        extra=extra,
        extra_grad={n: mean_full[n] for n in extra_names},
    )
