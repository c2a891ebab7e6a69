r"""SAM-GIF: TracIn-style influence with training gradients at SAM-perturbed weights.

:class:`SAMTracInCP` is a drop-in for Captum's ``TracInCP``. For checkpoints
:math:`w_c` with learning rates :math:`\eta_c` the score of training example
:math:`z_k` on a test example :math:`z` is

.. math:: \mathrm{score}(z, z_k) = \sum_c \eta_c\, \nabla l(z; w_c) \cdot
          \nabla l_k(w_c + \epsilon_c),

the training gradient taken where SAM training evaluates it. With ``rho = 0`` this is
exactly Captum's ``TracInCP``. :meth:`SAMTracInCP.from_trajectory` builds the
trajectory form of a recorded run, which weights every example by its real batch
membership: :math:`\sum_t \eta_t [k \in B_t] / |B_t|\, \nabla l(z; w_t) \cdot
\nabla l_k(w_t + \epsilon_t)`, with :math:`w_t` the latest saved checkpoint (the
TracIn-CP approximation) and :math:`\epsilon_t` recomputed there from the mean
gradient of the recorded batch :math:`B_t`.

Learning-rate convention (one for all three paths): the coefficient
(:math:`\eta_c`, or :math:`\eta_t/|B_t|`) sits on the *training* side only.
``influence`` and ``self_influence`` use it once, and
``compute_intermediate_quantities(side="train")`` returns coefficient-weighted
gradients while ``side="test"`` returns raw gradients, so
``test_q @ train_q.T == influence``. (Captum multiplies both sides of its
intermediate quantities by the learning rate, which squares it.)
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from captum_sam import factored
from captum_sam import functional as F
from captum_sam._captum import KMostInfluentialResults, TracInCPBase
from captum_sam._gif_factored import FactoredGIFMixin
from captum_sam._gif_gradients import GIFGradientsMixin, _finite, _Term
from captum_sam._gif_quantities import GIFQuantitiesMixin
from captum_sam._gif_trajectory import TrajectoryGIFMixin
from captum_sam._utils import (
    CheckpointLoader,
    as_loader,
    local_batches,
    make_loss,
    model_device,
    on_device,
    ordered_dataset,
    progress,
    stream_topk,
    validate_batch,
)
from captum_sam.cache import CachedQuantities, QuantityCacheMixin
from captum_sam.distributed import gather_ordered, is_distributed
from captum_sam.projection import RandomProjection
from captum_sam.trajectory import MANIFEST, Trajectory, checkpoints_load_func, load_trajectory

__all__ = ["SAMTracInCP"]

PERTURBATIONS = ("dataset", "example")
TRAJECTORY_PERTURBATIONS = ("batch", "dataset", "example")


class SAMTracInCP(
    TrajectoryGIFMixin,
    GIFQuantitiesMixin,
    GIFGradientsMixin,
    FactoredGIFMixin,
    QuantityCacheMixin,
    TracInCPBase,
):
    r"""SAM-GIF as a Captum ``TracInCPBase``: gradients at the SAM-perturbed weights.

    Args:
        model: The model (never modified: checkpoints load into a private copy).
        train_dataset: Training Dataset, or a DataLoader iterating it in order.
        checkpoints: Checkpoint paths, a directory of them, or a record directory
            from :class:`~captum_sam.TrajectoryRecorder` (its saved checkpoints).
        checkpoints_load_func: ``load(model, path) -> learning_rate``
            (Captum's convention); default :func:`captum_sam.checkpoints_load_func`.
        layers: Module names whose parameters are attributed (default: all
            trainable parameters). The perturbation is then computed over these
            parameters only (the others are held fixed).
        loss_fn: Per-example training loss, ``reduction="none"``, returning shape
            ``(batch,)``. A reducing loss is refused with a ``ValueError``.
        batch_size: Batch size when ``train_dataset`` is a Dataset.
        test_loss_fn: Per-example loss for test examples (default ``loss_fn``).
        rho: SAM radius used in training.
        adaptive: ASAM perturbation.
        perturbation: ``"dataset"`` (one :math:`\epsilon_c` per checkpoint from the
            mean gradient over ``perturbation_dataset``) or ``"example"`` (each
            example's own gradient, the m = 1 case of m-sharpness).
        perturbation_dataset: Data for the ``"dataset"`` perturbation (default: the
            training set).
        test_at_perturbed: Take the test gradient at the perturbed weights too.
        projection_dim: If given, every gradient is projected to this many
            dimensions by a seeded random projection that preserves inner products in
            expectation (:class:`~captum_sam.projection.RandomProjection`): scores
            become unbiased estimates with relative error about
            ``1/sqrt(projection_dim)``, and intermediate quantities take
            ``projection_dim`` columns per checkpoint instead of ``P``.
            ``parameter_change`` is never projected.
        projection: ``"gaussian"`` or ``"rademacher"``.
        projection_seed: Seed of the projection.
        factorize: When every attributed parameter is an ``nn.Linear`` weight or
            bias, compute per-example inner products from layer inputs and output
            gradients (:mod:`captum_sam.factored`) instead of forming per-example
            gradients of the training set; used for ``self_influence`` and
            ``influence`` (not with a projection or ``perturbation="example"``)
            after a check against ``vmap`` on a few examples of the first batch
            (models whose examples interact in the forward fall back). ``False``
            always forms them with ``vmap``. The scores are the same either way.

    Distributed: with an initialised ``torch.distributed`` process group the
    training batches (or recorded steps) are split across ranks and every rank
    receives the full result (see :mod:`captum_sam.distributed`).

    Shapes: ``influence`` returns ``(n_test, n_train)``; positive means the training
    example reduced the test loss (a proponent).
    """

    def __init__(
        self,
        model: nn.Module,
        train_dataset: Dataset | DataLoader,
        checkpoints: str | os.PathLike[str] | Sequence[str],
        checkpoints_load_func: Callable[[nn.Module, str], float] = checkpoints_load_func,
        layers: Sequence[str] | None = None,
        loss_fn: Callable[[Any, Any], Tensor] | None = None,
        batch_size: int | None = 64,
        test_loss_fn: Callable[[Any, Any], Tensor] | None = None,
        rho: float = 0.05,
        adaptive: bool = False,
        perturbation: str = "dataset",
        perturbation_dataset: Dataset | DataLoader | None = None,
        test_at_perturbed: bool = False,
        projection_dim: int | None = None,
        projection: str = "gaussian",
        projection_seed: int = 0,
        factorize: bool = True,
    ) -> None:
        self._setup(
            model,
            train_dataset,
            _resolve_checkpoints(checkpoints),
            checkpoints_load_func,
            layers,
            loss_fn,
            batch_size,
            test_loss_fn,
            perturbation,
            PERTURBATIONS,
            perturbation_dataset,
            test_at_perturbed,
            (projection_dim, projection, projection_seed),
            factorize,
        )
        _check_rho(rho, adaptive)
        self.rho, self.adaptive = float(rho), bool(adaptive)
        self.trajectory: Trajectory | None = None
        self._terms = [
            _Term(c, self._loader(c).learning_rate, None, self.rho, self.adaptive)
            for c in self.checkpoints
        ]
        self._final_checkpoint = self.checkpoints[-1]
        self._validate_first_batch()

    @classmethod
    def from_trajectory(
        cls,
        model: nn.Module,
        train_dataset: Dataset | DataLoader,
        record_dir: str | os.PathLike[str] | Trajectory,
        loss_fn: Callable[[Any, Any], Tensor] | None = None,
        layers: Sequence[str] | None = None,
        batch_size: int | None = 64,
        test_loss_fn: Callable[[Any, Any], Tensor] | None = None,
        perturbation: str = "batch",
        perturbation_dataset: Dataset | DataLoader | None = None,
        test_at_perturbed: bool = False,
        checkpoints_load_func: Callable[[nn.Module, str], float] = checkpoints_load_func,
        projection_dim: int | None = None,
        projection: str = "gaussian",
        projection_seed: int = 0,
        factorize: bool = True,
    ) -> SAMTracInCP:
        r"""SAM-GIF in trajectory form, from a recorded run.

        Every recorded step :math:`t` contributes
        :math:`\eta_t [k \in B_t]/|B_t|\, \nabla l(z; w_t)\cdot\nabla l_k(w_t+\epsilon_t)`
        with the step's own ``lr``, ``rho`` and ``adaptive``; :math:`w_t` is the latest
        checkpoint saved at or before step :math:`t`.

        Args:
            model: The model (never modified).
            train_dataset: The training set the trajectory indexes into.
            record_dir: Record directory (or a loaded :class:`~captum_sam.Trajectory`).
            loss_fn: Per-example training loss.
            layers: Attributed module names.
            batch_size: Batch size for test inputs given as a Dataset.
            test_loss_fn: Per-example test loss.
            perturbation: ``"batch"`` (default: from the recorded batch, the
                perturbation training used), ``"dataset"`` or ``"example"``.
            perturbation_dataset: Data for ``"dataset"`` (default: training set).
            test_at_perturbed: Test gradient at the perturbed weights.
            checkpoints_load_func: Checkpoint loader.
            projection_dim: See the class.
            projection: See the class.
            projection_seed: See the class.
            factorize: See the class.

        Returns:
            An estimator whose scores follow the recorded batch membership.
        """
        traj = record_dir if isinstance(record_dir, Trajectory) else load_trajectory(record_dir)
        if not traj.steps:
            raise ValueError(f"the trajectory in {traj.directory!r} has no recorded steps")
        self = cls.__new__(cls)
        groups = traj.segments()
        self._setup(
            model,
            train_dataset,
            [c.path for c, _ in groups],
            checkpoints_load_func,
            layers,
            loss_fn,
            batch_size,
            test_loss_fn,
            perturbation,
            TRAJECTORY_PERTURBATIONS,
            perturbation_dataset,
            test_at_perturbed,
            (projection_dim, projection, projection_seed),
            factorize,
        )
        if self.n_train != traj.n_train:
            raise ValueError(
                f"`train_dataset` has {self.n_train} examples but the trajectory was "
                f"recorded on {traj.n_train}"
            )
        self.trajectory = traj
        self.rho, self.adaptive = traj.steps[0].rho, traj.steps[0].adaptive
        self._terms = []
        for ckpt, steps in groups:
            for t in steps:
                s = traj.steps[t]
                self._terms.append(
                    _Term(ckpt.path, s.lr / len(s.indices), s.indices, s.rho, s.adaptive)
                )
        self._final_checkpoint = traj.final.path
        self._validate_first_batch()
        return self

    # ------------------------------------------------------------------ set-up

    def _setup(
        self,
        model: nn.Module,
        train_dataset: Dataset | DataLoader,
        checkpoints: list[str],
        load_func: Callable[[nn.Module, str], float],
        layers: Sequence[str] | None,
        loss_fn: Any,
        batch_size: int | None,
        test_loss_fn: Any,
        perturbation: str,
        allowed: tuple[str, ...],
        perturbation_dataset: Dataset | DataLoader | None,
        test_at_perturbed: bool,
        projection: tuple[int | None, str, int],
        factorize: bool,
    ) -> None:
        if perturbation not in allowed:
            raise ValueError(f"`perturbation` must be one of {allowed}, got {perturbation!r}")
        if not isinstance(test_at_perturbed, bool):
            raise TypeError("`test_at_perturbed` must be a bool")
        if not isinstance(factorize, bool):
            raise TypeError(f"`factorize` must be a bool, got {factorize!r}")
        if isinstance(train_dataset, Dataset) and not isinstance(batch_size, int):
            raise ValueError("`batch_size` must be an int when `train_dataset` is a Dataset")
        TracInCPBase.__init__(
            self, model, train_dataset, checkpoints, load_func, loss_fn, batch_size, test_loss_fn
        )
        self.layers = None if layers is None else list(layers)
        self.names = F.attributed_names(model, self.layers)
        self._loader = CheckpointLoader(model, self.names, load_func)
        self._loss = make_loss(model, loss_fn, {}, "loss_fn")
        self._test_loss = make_loss(model, self.test_loss_fn, {}, "test_loss_fn")
        self.train_data = ordered_dataset(train_dataset)
        self.n_train = len(self.train_data)  # type: ignore[arg-type]
        if self.n_train == 0:
            raise ValueError("`train_dataset` is empty")
        self.perturbation = perturbation
        self.perturbation_dataloader = (
            self.train_dataloader
            if perturbation_dataset is None
            else as_loader(perturbation_dataset, batch_size, "perturbation_dataset")
        )
        self.test_at_perturbed = test_at_perturbed
        self.device = model_device(model)
        self._dataset_eps: dict[tuple[Any, ...], F.Params] = {}
        self._stacks: dict[tuple[str, ...], tuple[F.Params, F.Params]] = {}
        self._cache: CachedQuantities | None = None
        self._last_batch: tuple[tuple[int, ...], tuple[Any, ...]] | None = None
        dim, kind, seed = projection
        sizes = {n: p.numel() for n, p in model.named_parameters() if n in set(self.names)}
        self.projector = None if dim is None else RandomProjection(sizes, dim, kind, seed)
        scratch = self._loader.scratch  # hooks of the factored path go on this private copy
        scratch.eval()  # attribution always runs the model in eval mode
        self._sites = factored.linear_sites(scratch, self.names) if factorize else None
        self._sites_checked: dict[Any, bool] = {}  # loss function -> factored path valid
        self._term_loss_cache: dict[tuple[Any, ...], Any] = {}  # (checkpoints, loss) -> losses

    def _validate_first_batch(self) -> None:
        state = self._loader(self._terms[0].checkpoint)
        batch = next(iter(on_device(self.train_dataloader, self.device)))
        with F.eval_mode(self.model):
            floss = F.FunctionalLoss(self.model, self._loss.loss_fn, state.frozen)
            validate_batch(floss, state.params, batch, "train_dataset")

    # ------------------------------------------------------------------ Captum API

    def influence(  # type: ignore[override]
        self,
        inputs: tuple[Any, ...] | DataLoader,
        k: int | None = None,
        proponents: bool = True,
        show_progress: bool = False,
        aggregate: bool = False,
    ) -> Tensor | KMostInfluentialResults:
        """Influence of every training example on every test example.

        Args:
            inputs: A test batch ``(features..., labels)`` or a DataLoader of them.
            k: If given, return the ``k`` proponents (or opponents) per test example.
            proponents: Highest (``True``) or lowest (``False``) scores with ``k``.
            show_progress: Progress bar over training batches or recorded steps.
            aggregate: Sum over the test examples (influence on a validation set).

        Returns:
            ``(n_test, n_train)`` scores (``(1, n_train)`` with ``aggregate``), or
            Captum's ``KMostInfluentialResults(indices, influence_scores)`` of shape
            ``(n_test, k)`` each.
        """
        if inputs is None:
            raise ValueError("`inputs` is required; use self_influence() for self influence")
        if k is None:
            return self._influence(inputs, show_progress=show_progress, aggregate=aggregate)
        return self._get_k_most_influential(
            inputs, k, proponents, show_progress=show_progress, aggregate=aggregate
        )

    def _influence(  # type: ignore[override]
        self,
        inputs: tuple[Any, ...] | DataLoader,
        show_progress: bool = False,
        aggregate: bool = False,
    ) -> Tensor:
        test = as_loader(inputs, self.batch_size, "inputs")
        with F.eval_mode(self.model):
            self._prepare()
            if self._cache is not None:
                return torch.cat(self._cached_blocks(inputs, aggregate), dim=1)
            if self.trajectory is None:
                blocks = gather_ordered(list(self._stream_columns(test, aggregate, show_progress)))
                return torch.cat(blocks, dim=1)
            return self._trajectory_influence(test, aggregate, show_progress)

    def _cached_blocks(self, inputs: Any, aggregate: bool) -> list[Tensor]:
        q = self.compute_intermediate_quantities(inputs, aggregate=aggregate, side="test")
        return self._cache.scores(q)  # type: ignore[union-attr]

    def _prepare(self) -> None:
        """Compute the dataset perturbations on every rank before work is split."""
        if self.perturbation != "dataset":
            return
        if self.trajectory is None:
            self._eps(self._terms)
            return
        for term in {t.checkpoint: t for t in self._terms}.values():
            self._eps([term])

    def _stream_columns(
        self, test: Iterable[tuple[Any, ...]], aggregate: bool, show_progress: bool
    ) -> Iterable[tuple[int, Tensor]]:
        """Checkpoint form: ``(batch index, (n_test, batch) scores)`` of this rank's batches."""
        terms = self._terms
        coef = self._coefficients(terms).view(-1, 1, 1)
        factors = self._test_factors(terms, test, aggregate)
        if factors is None:
            tests = {n: coef * v for n, v in self._test_matrix(terms, test, aggregate).items()}
        batches = progress(
            local_batches(self.train_dataloader, self.device),
            show_progress,
            f"{self.get_name()}: training batches",
            total=_length(self.train_dataloader),
        )
        for i, batch in batches:
            if factors is not None:
                yield i, self._factored_gram(factors, terms, batch, coef.view(-1))
                continue
            if aggregate and self._factored(terms, batch):  # one summed test row
                yield i, self._factored_apply(tests, terms, batch)
                continue
            train = self._grads(terms, batch, self._loss, False, True)[1]
            block = sum(
                torch.bmm(tests[n], train[n].transpose(1, 2)).sum(0)  # type: ignore[index]
                for n in tests
            )
            yield i, _finite(block, "training gradients", terms)

    def _get_k_most_influential(  # type: ignore[override]
        self,
        inputs: tuple[Any, ...] | DataLoader,
        k: int = 5,
        proponents: bool = True,
        show_progress: bool = False,
        aggregate: bool = False,
    ) -> KMostInfluentialResults:
        test = as_loader(inputs, self.batch_size, "inputs")
        with F.eval_mode(self.model):
            self._prepare()
            if self._cache is not None:
                blocks: Iterable[Tensor] = self._cached_blocks(inputs, aggregate)
            elif self.trajectory is not None:
                blocks = [self._trajectory_influence(test, aggregate, show_progress)]
            elif is_distributed():
                blocks = gather_ordered(list(self._stream_columns(test, aggregate, show_progress)))
            else:  # stream: only k candidates per test example are ever kept
                blocks = (b for _, b in self._stream_columns(test, aggregate, show_progress))
            return KMostInfluentialResults(*stream_topk(blocks, k, proponents))

    def self_influence(  # type: ignore[override]
        self,
        inputs: tuple[Any, ...] | DataLoader | None = None,
        show_progress: bool = False,
    ) -> Tensor:
        r"""Self influence :math:`\sum_c \eta_c \nabla l_k(w_c)\cdot\nabla l_k(w_c+\epsilon_c)`.

        Args:
            inputs: Examples (batch tuple or DataLoader); default the training set.
                The trajectory form needs batch membership, so it accepts only the
                training set (``None``).
            show_progress: Progress bar.

        Returns:
            ``(n_examples,)`` scores, the diagonal of train-vs-train influence.
        """
        with F.eval_mode(self.model):
            if self.trajectory is None and inputs is None:
                merged = self._merged_self_influence(show_progress)
                if merged is not None:
                    return merged
            self._prepare()
            if self.trajectory is not None:
                if inputs is not None:
                    raise ValueError(
                        "the trajectory form defines self influence for the training set "
                        "only (it needs batch membership): call self_influence() with "
                        "inputs=None"
                    )
                return self._trajectory_self_influence(show_progress)
            data = (
                self.train_dataloader
                if inputs is None
                else as_loader(inputs, self.batch_size, "inputs")
            )
            bar = progress(
                local_batches(data, self.device),
                show_progress,
                f"{self.get_name()}: self influence",
                total=_length(data),
            )
            out = gather_ordered([(i, self._pair_dots(self._terms, b)) for i, b in bar])
            if not out:
                raise ValueError("`inputs` is empty")
            return torch.cat(out)

    def _pair_dots(self, terms: Sequence[_Term], batch: tuple[Any, ...]) -> Tensor:
        """``sum_k c_k  test_side_k(x) . train_side_k(x)`` for every example ``x``."""
        if self._factored(terms, batch):
            return self._factored_pair_dots(terms, batch)
        if self.test_at_perturbed:
            train = self._grads(terms, batch, self._loss, False, True)[1]
            test = train
        else:
            test, train = self._grads(terms, batch, self._loss, True, True)
        coef = self._coefficients(terms)
        dots = coef @ sum(_rowdot(test[n], train[n]) for n in train)  # type: ignore[index]
        return _finite(dots, "gradients", terms)


def _length(data: Any) -> int | None:
    try:
        return len(data)
    except TypeError:
        return None


def _rowdot(a: Tensor, b: Tensor) -> Tensor:
    """Inner products along the last dimension, ``(K, B, n) -> (K, B)``, with no temporary."""
    if a is b:
        return torch.linalg.vector_norm(a, dim=-1).square()
    return torch.einsum("kbi,kbi->kb", a, b)


def _check_rho(rho: Any, adaptive: Any) -> None:
    if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not rho >= 0:
        raise ValueError(f"`rho` must be a number >= 0, got {rho!r}")
    if not isinstance(adaptive, bool):
        raise TypeError(f"`adaptive` must be a bool, got {adaptive!r}")


def _resolve_checkpoints(checkpoints: Any) -> list[str]:
    if isinstance(checkpoints, (str, os.PathLike)):
        path = os.fspath(checkpoints)
        if os.path.isdir(path) and os.path.isfile(os.path.join(path, MANIFEST)):
            traj = load_trajectory(path)
            paths = [c.path for c in traj.checkpoints]
        elif os.path.isdir(path):
            paths = sorted(
                os.path.join(path, f)
                for f in os.listdir(path)
                if os.path.isfile(os.path.join(path, f)) and not f.startswith(".")
            )
        else:
            paths = [path]
    else:
        try:
            paths = [os.fspath(c) for c in checkpoints]
        except TypeError as err:
            raise TypeError("`checkpoints` must be a path, a directory or a list of paths") from err
    if not paths:
        raise ValueError(f"`checkpoints` is empty: no checkpoint found in {checkpoints!r}")
    return paths
