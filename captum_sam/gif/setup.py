"""Argument checking and wiring of the SAM-GIF engines, shared by every GIF twin.

:func:`build_engines` validates Captum's arguments and SAM's, sets the attributes
Captum's classes expose (``sample_wise_grads_per_batch``, ``reduction_type``,
``test_reduction_type``, ``layer_modules``), and wires the engines into a
:class:`GIFEngines`: the weight points (checkpoints and perturbations), the two
gradient sources (``vmap`` and factored), the checkpoint and trajectory forms, and
the intermediate quantities.
"""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from captum_sam import core as F
from captum_sam.core.batchnorm import (
    BatchStatistics,
    batchnorm_layers,
    check_batchnorm,
    warn_on_batchnorm_gap,
)
from captum_sam.core.checkpoints import CheckpointLoader, edited_copy, model_device
from captum_sam.core.data import as_loader, on_device, ordered_dataset, validate_batch
from captum_sam.core.distributed import require_same
from captum_sam.core.layers import sites as layer_sites
from captum_sam.core.params import check_layers, sample_wise_names, scope_names
from captum_sam.core.projection import LayerProjection, RandomProjection
from captum_sam.core.store import CachedQuantities
from captum_sam.gif.checkpoint_form import CheckpointForm
from captum_sam.gif.factored_grads import FactoredGradients
from captum_sam.gif.factored_steps import FactoredSteps
from captum_sam.gif.points import WeightPoints
from captum_sam.gif.quantities import GIFQuantities
from captum_sam.gif.terms import Term
from captum_sam.gif.trajectory_form import TrajectoryForm
from captum_sam.gif.vmap_grads import VmapGradients
from captum_sam.trajectory import MANIFEST, Trajectory, load_trajectory

__all__ = [
    "GIFEngines",
    "GIFOptions",
    "build_engines",
    "resolve_checkpoints",
    "natural_sort",
]


@dataclass(frozen=True)
class GIFOptions:
    """SAM-GIF's own settings (see :class:`~captum_sam.SAMTracInCP` for their meaning)."""

    perturbation: str = "dataset"
    perturbation_dataset: Any = None
    perturbation_scope: str = "trainable"
    test_at_perturbed: bool = False
    projection_dim: int | None = None
    projection: str = "gaussian"
    projection_seed: int = 0
    factorize: bool = True
    batchnorm: str = "eval"
    batchnorm_tolerance: float | None = 0.1

    def __post_init__(self) -> None:
        _check_flags(test_at_perturbed=self.test_at_perturbed, factorize=self.factorize)
        check_batchnorm(self.batchnorm, self.batchnorm_tolerance)


@dataclass
class GIFEngines:
    """The engines of one SAM-GIF estimator and what they share."""

    device: torch.device
    n_train: int
    names: list[str]
    terms: list[Term]
    loader: CheckpointLoader
    points: WeightPoints
    vmap: VmapGradients
    factored: FactoredGradients
    form: CheckpointForm
    trajectory: TrajectoryForm | None
    quantities: GIFQuantities
    final_checkpoint: str
    cache: CachedQuantities | None = None

    def prepare(self, train: Any = None) -> None:
        """Compute dataset perturbations on every rank before work is split.

        ``train``: the training batches influence scores next (see
        :meth:`~captum_sam.gif.checkpoint_form.CheckpointForm.prepare`).
        """
        if self.trajectory is not None:
            self.trajectory.prepare()
        else:
            self.form.prepare(train, self.n_train)

    def unflatten(self, flat: Tensor) -> dict[str, Tensor]:
        """A flat ``(P,)`` vector as a dict of the attributed parameters' shapes."""
        ref = self.points.reference(self.terms[0].checkpoint)
        like = {
            n: p.detach().to(ref)
            for n, p in zip(self.names, self.loader.scratch_params(self.names))
        }
        return F.unflatten(flat, like)

    def edited(self, model: nn.Module, delta: dict[str, Tensor]) -> nn.Module:
        """A copy of ``model`` at the final checkpoint plus ``delta``."""
        return edited_copy(model, self.loader.load_func, self.final_checkpoint, delta)


def natural_sort(paths: Sequence[str]) -> list[str]:
    """Paths sorted naturally (``ckpt-2`` before ``ckpt-10``), as Captum sorts checkpoints."""

    def key(s: str) -> list[Any]:
        return [int(x) if x.isdigit() else x for x in re.split("([0-9]+)", s)]

    return sorted(paths, key=key)


def resolve_checkpoints(checkpoints: Any) -> list[str]:
    """Checkpoint paths from Captum's forms (directory, list, iterator) or a record directory.

    Raises:
        ValueError: No checkpoint found (Captum's message).
        TypeError: Not a path, a list or an iterator of paths.
    """
    if isinstance(checkpoints, (str, os.PathLike)):
        path = os.fspath(checkpoints)
        if os.path.isdir(path) and os.path.isfile(os.path.join(path, MANIFEST)):
            paths = [c.path for c in load_trajectory(path).checkpoints]
        elif os.path.isdir(path):
            paths = natural_sort(p for p in glob.glob(os.path.join(path, "*")) if os.path.isfile(p))
        elif os.path.isfile(path):
            paths = [path]
        else:
            paths = []
    else:
        try:
            paths = [os.fspath(c) for c in checkpoints]
        except TypeError as err:
            raise TypeError(
                "`checkpoints` must be a directory, a list of paths or an iterator of paths"
            ) from err
        if isinstance(checkpoints, list):  # Captum sorts a list, keeps other orders
            paths = natural_sort(paths)
    if not paths:
        raise ValueError(
            f"Invalid checkpoints provided for TracIn class: {checkpoints!r}: no checkpoint "
            "found (the list or directory is empty, or the path does not exist)"
        )
    return paths


def _check_flags(**flags: Any) -> None:
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise TypeError(f"`{name}` must be a bool, got {value!r}")


def build_engines(
    est: Any,
    train_dataset: Dataset | DataLoader,
    layers: Sequence[str] | None,
    sample_wise_grads_per_batch: bool,
    options: GIFOptions,
    allowed: tuple[str, ...],
    make_terms: Callable[[CheckpointLoader], list[Term]],
    final_checkpoint: str,
    trajectory: Trajectory | None = None,
    names: list[str] | None = None,
) -> GIFEngines:
    """Validate the arguments of a GIF estimator ``est`` (Captum's base already set) and wire it.

    ``names`` overrides the attributed parameters (the TracInCPFast twins attribute
    one layer's weight).
    """
    o = options
    if o.perturbation not in allowed:
        raise ValueError(f"`perturbation` must be one of {allowed}, got {o.perturbation!r}")
    if o.batchnorm == "batch" and trajectory is None:
        raise ValueError(
            "batchnorm='batch' takes each training gradient with the BatchNorm statistics "
            "of the batch the example was trained in, which only a recorded trajectory "
            "knows: use SAMTracInCP.from_trajectory, or batchnorm='eval'"
        )
    if o.batchnorm == "batch" and o.perturbation == "example":
        raise ValueError(
            "batchnorm='batch' is not supported with perturbation='example' (every example "
            "would move the batch's statistics): use perturbation='batch' or 'dataset'"
        )
    model = est.model
    est.sample_wise_grads_per_batch = sample_wise_grads_per_batch
    est.reduction_type = F.loss_reduction(est.loss_fn, "loss_fn", sample_wise_grads_per_batch)
    est.test_reduction_type = F.loss_reduction(
        est.test_loss_fn, "test_loss_fn", sample_wise_grads_per_batch
    )
    est.layers = check_layers(layers)
    if names is None:
        names = F.attributed_names(model, est.layers)
        if sample_wise_grads_per_batch:
            names = sample_wise_names(model, names)
    modules = dict(model.named_modules())
    est.layer_modules = None if est.layers is None else [modules[n] for n in est.layers]
    loader = CheckpointLoader(model, names, est.checkpoints_load_func)
    scratch = loader.scratch  # every functional call and hook runs on this private copy
    bn_layers = batchnorm_layers(scratch)  # before eval(): frozen layers are read from flags
    scratch.eval()  # attribution runs the model in eval mode
    stats = BatchStatistics(bn_layers) if o.batchnorm == "batch" else None
    train_loss = F.FunctionalLoss(scratch, est.loss_fn, {}, est.reduction_type)
    test_loss = F.FunctionalLoss(scratch, est.test_loss_fn, {}, est.test_reduction_type)
    train_data = ordered_dataset(train_dataset)
    n_train = len(train_data)  # type: ignore[arg-type]
    require_same(n_train, "the size of `train_dataset`")
    if n_train == 0:
        raise ValueError("`train_dataset` is empty")
    device = model_device(model)
    pdata = (
        est.train_dataloader
        if o.perturbation_dataset is None
        else as_loader(
            o.perturbation_dataset, est.batch_size, "perturbation_dataset", ordered=False
        )
    )
    terms = make_terms(loader)
    points = WeightPoints(
        loader,
        names,
        scope_names(model, names, o.perturbation_scope, est.rho),
        train_loss if stats is None else stats.train_loss(train_loss),  # eps as trained
        o.perturbation,
        pdata,
        train_data,
        device,
        "train_dataset" if o.perturbation_dataset is None else "perturbation_dataset",
    )
    sizes = {n: p.numel() for n, p in zip(names, loader.scratch_params(names))}
    projector = make_projector(scratch, names, sizes, o)
    vmap = VmapGradients(points, projector, o.test_at_perturbed, device, stats)
    # the factored path has no batch statistics: batchnorm="batch" forms gradients
    sites = layer_sites.layer_sites(scratch, names) if o.factorize and stats is None else None
    on_sites = isinstance(projector, LayerProjection) and set(projector.rest) <= {
        n for s in sites or [] if s.diagonal for n in (s.weight, s.bias) if n is not None
    }  # the dense remainder, if any, is elementwise sites (BatchNorm): formed, then projected
    factored = FactoredGradients(
        points,
        sites,
        train_loss,
        test_loss,
        (projector is None or on_sites) and o.perturbation != "example",
        o.test_at_perturbed,
        device,
        projector if on_sites else None,  # type: ignore[arg-type]
    )
    form = CheckpointForm(terms, points, vmap, factored, train_loss, test_loss, device)
    traj_form = None
    if trajectory is not None:
        trajectory.check_data(train_data)  # its size and, when recorded, its content
        steps = FactoredSteps(factored, est.batch_size or 64)
        traj_form = TrajectoryForm(
            terms, points, vmap, factored, steps, train_loss, test_loss, n_train
        )
    quantities = GIFQuantities(
        terms,
        points,
        vmap,
        trajectory is not None,
        train_loss,
        test_loss,
        est.train_dataloader,
        train_data,
        est.batch_size,
        projector,
        n_train,
    )
    engines = GIFEngines(
        device, n_train, names, terms, loader, points, vmap, factored, form, traj_form,
        quantities, final_checkpoint,
    )  # fmt: skip
    _validate_first_batch(engines, est.train_dataloader, train_loss)
    if o.batchnorm_tolerance is not None and bn_layers:
        _check_batchnorm_gap(engines, BatchStatistics(bn_layers), train_loss, est, o)
    return engines


BATCHNORM_CHECK_BATCHES = 4
"""Training batches per checkpoint on which eval- and train-mode losses are compared."""


def _check_batchnorm_gap(
    e: GIFEngines, stats: BatchStatistics, loss: F.FunctionalLoss, est: Any, o: GIFOptions
) -> None:
    """Warn at every checkpoint whose eval-mode loss is far from its train-mode loss.

    Trajectory form: the first recorded batches of the steps at the checkpoint;
    checkpoint form: the first batches of ``train_dataset`` (as loaded). At most
    :data:`BATCHNORM_CHECK_BATCHES` forward passes per mode and checkpoint.
    """
    loaded = (
        []
        if e.trajectory is not None
        else list(zip(range(BATCHNORM_CHECK_BATCHES), on_device(est.train_dataloader, e.device)))
    )
    for ckpt in dict.fromkeys(t.checkpoint for t in e.terms):
        if e.trajectory is not None:
            steps = [t.indices for t in e.terms if t.checkpoint == ckpt]
            batches = [e.points.fetch(i) for i in steps[:BATCHNORM_CHECK_BATCHES]]
        else:
            batches = [b for _, b in loaded]
        state = e.loader(ckpt)
        warn_on_batchnorm_gap(
            stats, loss.bind(state.frozen), state.params, batches, o.batchnorm_tolerance,
            ckpt, o.batchnorm,
        )  # fmt: skip


def make_projector(
    model: Any, names: list[str], sizes: dict[str, int], o: GIFOptions
) -> LayerProjection | RandomProjection | None:
    """The estimator's random projection: per layer site where there are sites.

    Parameters of ``nn.Linear`` / ``nn.Conv2d`` layers get a Kronecker projection per
    layer (:class:`~captum_sam.core.projection.LayerProjection`, computable from the
    layer factors without forming gradients); the rest, or every parameter of a
    model without sites, a dense :class:`~captum_sam.core.projection.RandomProjection`.
    Both preserve inner products in expectation, with at most ``projection_dim``
    coordinates. The choice depends on the model only, never on ``factorize``: the
    scores are the same on both paths.
    """
    if o.projection_dim is None:
        return None
    # elementwise sites (BatchNorm) have no Kronecker structure: projected densely
    found = [
        s for s in layer_sites.layer_sites(model, names, complete=False) or [] if not s.diagonal
    ]
    if not found:
        return RandomProjection(sizes, o.projection_dim, o.projection, o.projection_seed)
    layers = [(s.weight, s.bias, s.d_out, s.d_in) for s in found]  # type: ignore[union-attr]
    return LayerProjection(sizes, layers, o.projection_dim, o.projection, o.projection_seed)


def _validate_first_batch(e: GIFEngines, train: Any, loss: F.FunctionalLoss) -> None:
    state = e.loader(e.terms[0].checkpoint)
    batch = next(iter(on_device(train, e.device)), None)
    if batch is None:
        raise ValueError("`train_dataset` is empty")
    validate_batch(loss.bind(state.frozen), state.params, batch, "train_dataset")
