r"""SAM-GIF: Captum's ``TracInCP`` with training gradients at the SAM-perturbed weights.

:class:`SAMTracInCP` is a drop-in for Captum's ``TracInCP``: the same arguments with
the same meanings, then SAM's own. For checkpoints :math:`w_c` with learning rates
:math:`\eta_c` the score of training example :math:`z_k` on a test example :math:`z` is

.. math:: \mathrm{score}(z, z_k) = \sum_c \eta_c\, \nabla l(z; w_c) \cdot
          \nabla l_k(w_c + \epsilon_c),

the training gradient taken where SAM training evaluates it. With ``rho = 0`` this is
exactly Captum's ``TracInCP``. :meth:`SAMTracInCP.from_trajectory` builds the
trajectory form of a recorded run, which weights every example by its real batch
membership.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from captum_sam._captum import KMostInfluentialResults, TracInCPBase
from captum_sam.core.checkpoints import checkpoints_load_func
from captum_sam.core.data import as_loader, local_batches, progress, stream_topk
from captum_sam.core.distributed import gather_ordered, is_distributed
from captum_sam.core.errors import ArgumentError
from captum_sam.core.store import open_quantities
from captum_sam.gif.points import PERTURBATIONS, TRAJECTORY_PERTURBATIONS
from captum_sam.gif.setup import GIFEngines, build_engines, resolve_checkpoints
from captum_sam.gif.terms import checkpoint_terms, trajectory_terms
from captum_sam.trajectory import Trajectory, load_trajectory

__all__ = ["SAMTracInCP"]


class SAMTracInCP(TracInCPBase):
    r"""SAM-GIF as a Captum ``TracInCPBase``: training gradients at :math:`w_c + \epsilon_c`.

    The first nine arguments are Captum ``TracInCP``'s, with its meanings; the rest
    are keyword-only and SAM's own.

    Args:
        model: The model (never modified: checkpoints load into a private copy, which
            runs in eval mode).
        train_dataset: Training Dataset, or a DataLoader iterating it in order.
        checkpoints: A directory (every file in it, naturally sorted, as Captum), a
            list of paths (naturally sorted, as Captum), an iterator of paths, or a
            record directory of :func:`~captum_sam.train_sam` (its checkpoints).
        checkpoints_load_func: ``load(model, path) -> learning_rate``; the default
            reads plain ``state_dict`` files (learning rate 1 unless stored) and
            :class:`~captum_sam.TrajectoryRecorder` checkpoints, safely.
        layers: Module names whose parameters are attributed (default: every
            trainable parameter). The SAM perturbation is still the training's,
            over every trainable parameter (see ``perturbation_scope``).
        loss_fn: The training loss: per-example (``reduction="none"``, trailing
            dimensions summed) when ``sample_wise_grads_per_batch`` is False, or
            reducing (``"sum"``/``"mean"``) when it is True; ``None``: the model output.
        batch_size: Batch size when ``train_dataset`` is a Dataset (Captum's default
            is 1; a larger batch changes no score, only speed).
        test_loss_fn: Loss for test examples (default ``loss_fn``), same constraints.
        sample_wise_grads_per_batch: Captum's switch for reducing losses. As in
            Captum, with ``True`` only parameters of ``nn.Linear`` and ``nn.Conv2d``
            layers are attributed (a warning names any other trainable ones).
        rho: SAM radius of training (0 gives Captum's ``TracInCP``).
        adaptive: ASAM perturbation.
        perturbation: ``"dataset"`` (one :math:`\epsilon_c` per checkpoint from the
            mean gradient over ``perturbation_dataset``) or ``"example"`` (each
            example's own gradient, the m = 1 case of m-sharpness).
        perturbation_dataset: Data for the ``"dataset"`` perturbation (default: the
            training set).
        perturbation_scope: ``"trainable"`` (default: the perturbation's gradient,
            norm and move run over every trainable parameter, as in training, also
            when ``layers`` attributes fewer) or ``"attributed"`` (only the attributed
            parameters: an approximation that avoids the full gradient of a large
            frozen backbone).
        test_at_perturbed: Take the test gradient at the perturbed weights too.
        projection_dim: If given, every gradient is projected to this many
            dimensions per checkpoint by a seeded random projection that preserves
            inner products in expectation (as Captum's ``TracInCPFastRandProj``'s
            ``projection_dim``): scores become unbiased estimates with relative
            error about ``1/sqrt(projection_dim)``.
        projection: ``"gaussian"`` or ``"rademacher"``.
        projection_seed: Seed of the projection.
        factorize: Allow the factored path for ``nn.Linear`` models (per-example
            inner products from layer inputs and output gradients; checked against
            ``vmap`` first). The scores are the same either way.

    Where the gradients are taken: test gradients at :math:`w_c`, training gradients
    at :math:`w_c + \epsilon_c` with :math:`\epsilon_c` over ``perturbation_scope``;
    with ``layers`` the derivatives are with respect to the attributed parameters,
    the others held at their perturbed values.

    Distributed: with an initialised ``torch.distributed`` process group the training
    batches (or recorded steps) are split across ranks and every rank receives the
    full result.
    """

    def __init__(
        self,
        model: nn.Module,
        train_dataset: Dataset | DataLoader,
        checkpoints: str | os.PathLike[str] | Sequence[str] | Iterable[str],
        checkpoints_load_func: Callable[[nn.Module, str], float] = checkpoints_load_func,
        layers: list[str] | None = None,
        loss_fn: Callable[..., Tensor] | None = None,
        batch_size: int | None = 64,
        test_loss_fn: Callable[..., Tensor] | None = None,
        sample_wise_grads_per_batch: bool = False,
        *,
        rho: float = 0.05,
        adaptive: bool = False,
        perturbation: str = "dataset",
        perturbation_dataset: Dataset | DataLoader | None = None,
        perturbation_scope: str = "trainable",
        test_at_perturbed: bool = False,
        projection_dim: int | None = None,
        projection: str = "gaussian",
        projection_seed: int = 0,
        factorize: bool = True,
    ) -> None:
        check_rho(rho, adaptive)
        paths = resolve_checkpoints(checkpoints)
        TracInCPBase.__init__(
            self, model, train_dataset, paths, checkpoints_load_func, loss_fn, batch_size,
            test_loss_fn,
        )  # fmt: skip
        self.rho, self.adaptive = float(rho), adaptive
        self.trajectory: Trajectory | None = None
        self._engines = build_engines(
            self,
            train_dataset,
            layers,
            sample_wise_grads_per_batch,
            perturbation,
            PERTURBATIONS,
            perturbation_dataset,
            perturbation_scope,
            test_at_perturbed,
            (projection_dim, projection, projection_seed),
            factorize,
            lambda loader: checkpoint_terms(
                self.checkpoints,
                [loader(c).learning_rate for c in self.checkpoints],
                self.rho,
                self.adaptive,
            ),
            final_checkpoint=self.checkpoints[-1],
        )

    @classmethod
    def from_trajectory(
        cls,
        model: nn.Module,
        train_dataset: Dataset | DataLoader,
        record_dir: str | os.PathLike[str] | Trajectory,
        loss_fn: Callable[..., Tensor] | None = None,
        layers: list[str] | None = None,
        batch_size: int | None = 64,
        test_loss_fn: Callable[..., Tensor] | None = None,
        *,
        sample_wise_grads_per_batch: bool = False,
        perturbation: str = "batch",
        perturbation_dataset: Dataset | DataLoader | None = None,
        perturbation_scope: str = "trainable",
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
        checkpoint saved at or before step :math:`t` (the TracIn-CP approximation),
        and :math:`\epsilon_t` is recomputed there from the recorded batch's mean
        gradient (``perturbation="batch"``, default), over ``perturbation_scope``.

        Args:
            model: The model (never modified).
            train_dataset: The training set the trajectory indexes into.
            record_dir: Record directory (or a loaded :class:`~captum_sam.Trajectory`).
            loss_fn: Training loss (see the class).
            layers: Attributed module names.
            batch_size: Batch size for Datasets.
            test_loss_fn: Test loss.
            sample_wise_grads_per_batch: See the class.
            perturbation: ``"batch"``, ``"dataset"`` or ``"example"``.
            perturbation_dataset: Data for ``"dataset"`` (default: training set).
            perturbation_scope: See the class.
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
        paths = [c.path for c, _ in traj.segments()]
        TracInCPBase.__init__(
            self, model, train_dataset, paths, checkpoints_load_func, loss_fn, batch_size,
            test_loss_fn,
        )  # fmt: skip
        self.trajectory = traj
        self.rho, self.adaptive = traj.steps[0].rho, traj.steps[0].adaptive
        self._engines = build_engines(
            self,
            train_dataset,
            layers,
            sample_wise_grads_per_batch,
            perturbation,
            TRAJECTORY_PERTURBATIONS,
            perturbation_dataset,
            perturbation_scope,
            test_at_perturbed,
            (projection_dim, projection, projection_seed),
            factorize,
            lambda loader: trajectory_terms(traj),
            final_checkpoint=traj.final.path,
            trajectory=traj,
        )
        return self

    # ------------------------------------------------------------------ Captum API

    @property
    def engines(self) -> GIFEngines:
        """The engines this estimator delegates to (gradient sources, forms, quantities)."""
        return self._engines

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
            ``(n_test, n_train)`` scores (``(1, n_train)`` with ``aggregate``); positive
            means the training example reduced the test loss (a proponent). With ``k``,
            Captum's ``KMostInfluentialResults(indices, influence_scores)``, each
            ``(n_test, k)``.
        """
        if inputs is None:
            raise ArgumentError(
                "`inputs` argument is required. To compute self influence scores, use "
                "the `self_influence` method instead."
            )
        if k is None:
            return self._influence(inputs, show_progress=show_progress, aggregate=aggregate)
        return self._get_k_most_influential(
            inputs, k, proponents, show_progress=show_progress, aggregate=aggregate
        )

    def _blocks(
        self, inputs: Any, aggregate: bool, desc: str | None, stream: bool
    ) -> Iterable[Tensor]:
        """Score blocks ``(n_test, batch)`` in training order (streamed if ``stream``)."""
        e = self._engines
        test = as_loader(inputs, self.batch_size, "inputs")
        e.prepare()
        if e.cache is not None:
            q = self.compute_intermediate_quantities(inputs, aggregate=aggregate, side="test")
            return e.cache.scores(q)
        if e.trajectory is not None:
            return [e.trajectory.influence(test, aggregate, desc is not None, self.get_name())]
        train = progress(
            local_batches(self.train_dataloader, e.device),
            desc is not None,
            desc or "",
            total=self.train_dataloader_len,
        )
        blocks = e.form.columns(test, train, aggregate)
        if stream and not is_distributed():
            return (b for _, b in blocks)
        return gather_ordered(list(blocks))

    def _influence(  # type: ignore[override]
        self,
        inputs: tuple[Any, ...] | DataLoader,
        show_progress: bool = False,
        aggregate: bool = False,
    ) -> Tensor:
        desc = f"Using {self.get_name()} to compute influence for training batches"
        return torch.cat(
            list(self._blocks(inputs, aggregate, desc if show_progress else None, False)), 1
        )

    def _get_k_most_influential(  # type: ignore[override]
        self,
        inputs: tuple[Any, ...] | DataLoader,
        k: int = 5,
        proponents: bool = True,
        show_progress: bool = False,
        aggregate: bool = False,
    ) -> KMostInfluentialResults:
        desc = (
            f"Using {self.get_name()} to perform computation for getting "
            f"{'proponents' if proponents else 'opponents'}. Processing training batches"
        )
        blocks = self._blocks(inputs, aggregate, desc if show_progress else None, True)
        return KMostInfluentialResults(*stream_topk(blocks, k, proponents))

    def self_influence(  # type: ignore[override]
        self,
        inputs: tuple[Any, ...] | DataLoader | None = None,
        show_progress: bool = False,
        outer_loop_by_checkpoints: bool = False,
    ) -> Tensor:
        r"""Self influence :math:`\sum_c \eta_c \nabla l_k(w_c)\cdot\nabla l_k(w_c+\epsilon_c)`.

        Args:
            inputs: Examples (batch tuple or DataLoader); default the training set.
                The trajectory form needs batch membership, so it accepts only the
                training set (``None``).
            show_progress: Progress bar(s).
            outer_loop_by_checkpoints: As in Captum: loop over checkpoints outside and
                batches inside (one checkpoint's weights in memory at a time) instead
                of batches outside. The scores are the same.

        Returns:
            ``(n_examples,)`` scores, the diagonal of train-vs-train influence.
        """
        e, name = self._engines, self.get_name()
        if e.trajectory is not None:
            if inputs is not None:
                raise ValueError(
                    "the trajectory form defines self influence for the training set "
                    "only (it needs batch membership): call self_influence() with "
                    "inputs=None"
                )
            e.prepare()
            return e.trajectory.self_influence(show_progress, name, e.form.pair_dots)
        if inputs is None and not outer_loop_by_checkpoints:
            merged = e.form.merged_self_influence(
                self.train_dataloader, e.n_train, show_progress, name
            )
            if merged is not None:
                return merged
        e.prepare()
        data = (
            self.train_dataloader
            if inputs is None
            else as_loader(inputs, self.batch_size, "inputs")
        )
        groups = [[t] for t in e.terms] if outer_loop_by_checkpoints else [e.terms]
        outer = progress(
            groups,
            show_progress and outer_loop_by_checkpoints,
            f"Using {name} to compute self influence. Processing checkpoint",
        )
        total = None
        for terms in outer:
            bar = progress(
                local_batches(data, e.device),
                show_progress,
                f"Using {name} to compute self influence. Processing batch",
                total=_length(data),
            )
            parts = gather_ordered([(i, e.form.pair_dots(terms, b)) for i, b in bar])
            if not parts:
                raise ValueError("`inputs` is empty")
            scores = torch.cat(parts)
            total = scores if total is None else total + scores
        return total  # type: ignore[return-value]

    # ------------------------------------------------------------------ quantities

    def compute_intermediate_quantities(
        self,
        inputs: tuple[Any, ...] | DataLoader | None = None,
        aggregate: bool = False,
        *,
        side: str = "train",
    ) -> Tensor:
        r"""Per-example vectors whose inner products give the influence scores.

        ``side="train"`` (default, Captum's quantity at ``rho = 0``): per checkpoint
        :math:`\eta_c \nabla l(w_c + \epsilon_c)` of ``loss_fn``. ``side="test"``: raw
        test-side gradients :math:`\nabla l(z; w_c)` of ``test_loss_fn``, so
        ``compute_intermediate_quantities(test, side="test") @
        compute_intermediate_quantities(train).T == influence(test)``. (Captum's
        ``TracInCP`` multiplies both of its sides by :math:`\eta_c`, so its product
        equals its influence only when every learning rate is 1.)

        Args:
            inputs: Examples; default the training set. The trajectory form needs
                batch membership for ``side="train"``, so only ``None`` is accepted.
            aggregate: Sum over the examples (``(1, D)``).
            side: ``"train"`` or ``"test"``.

        Returns:
            ``(n_examples, n_checkpoints * D)``: one block of ``D`` per distinct
            checkpoint, in order of first use; ``D = P``, or ``projection_dim``.
        """
        self._engines.prepare()
        return self._engines.quantities.compute(inputs, aggregate, side)

    def save_intermediate_quantities(self, directory: str | os.PathLike[str]) -> str:
        """Compute the training side (``side="train"``) and store it in ``directory``.

        One torch file per training batch plus a manifest with a fingerprint of the
        checkpoints (SHA-256), the settings, the loss and the training data.

        Returns:
            The directory.
        """
        self._engines.prepare()
        return self._engines.quantities.save(directory, type(self).__name__)

    def load_intermediate_quantities(self, directory: str | os.PathLike[str]) -> Tensor:
        """The cached training side ``(n_train, D)``; refused if stale (``ValueError``)."""
        fingerprint = self._engines.quantities.fingerprint(type(self).__name__)
        return open_quantities(directory, fingerprint).load(self._engines.device)

    def use_intermediate_quantities(self, directory: str | os.PathLike[str] | None) -> None:
        """Make ``influence`` read the training side from a cache (``None``: stop).

        The cache is validated now (a stale one raises ``ValueError``) and then
        streamed part by part at every ``influence`` call.
        """
        fingerprint = self._engines.quantities.fingerprint(type(self).__name__)
        self._engines.cache = None if directory is None else open_quantities(directory, fingerprint)

    # ------------------------------------------------------------------ editing

    def parameter_change(
        self, indices: Sequence[int] | Tensor, flat: bool = False, show_progress: bool = False
    ) -> dict[str, Tensor] | Tensor:
        r"""GIF estimate of :math:`w_{-S} - w_T` for removing the examples ``indices``.

        :math:`\sum_{\text{terms}} c \sum_{k \in S \cap B} \nabla l_k(w + \epsilon)`:
        the descent steps the removed examples contributed, added back. In trajectory
        form :math:`c = \eta_t/|B_t|` and :math:`B = B_t`; in checkpoint form
        :math:`c = \eta_c` and every example counts at every checkpoint.

        Args:
            indices: Training indices of the set :math:`S`.
            flat: Return one flat vector ``(P,)`` instead of a dict.
            show_progress: Progress bar.

        Returns:
            A dict (attributed parameter name -> tensor of the parameter's shape), or a
            flat ``(P,)`` tensor in ``named_parameters`` order.
        """
        e = self._engines
        e.prepare()
        total = e.quantities.parameter_change(indices, show_progress)
        return total if flat else e.unflatten(total)

    def edited_model(
        self, indices: Sequence[int] | Tensor, show_progress: bool = False
    ) -> nn.Module:
        """A new model: the final weights plus :meth:`parameter_change` (user's model untouched).

        The final weights are the trajectory's final checkpoint, or in checkpoint form
        the last checkpoint.
        """
        delta = self.parameter_change(indices, show_progress=show_progress)
        return self._engines.edited(self.model, delta)  # type: ignore[arg-type]


def check_rho(rho: Any, adaptive: Any) -> None:
    """Validate the SAM radius and the ASAM flag."""
    if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not rho >= 0:
        raise ValueError(f"`rho` must be a number >= 0, got {rho!r}")
    if rho == float("inf"):
        raise ValueError("`rho` must be finite")
    if not isinstance(adaptive, bool):
        raise TypeError(f"`adaptive` must be a bool, got {adaptive!r}")


def _length(data: Any) -> int | None:
    try:
        return len(data)
    except TypeError:
        return None
