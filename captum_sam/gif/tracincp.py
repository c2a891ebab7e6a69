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

from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from captum_sam.core.checkpoints import checkpoints_load_func
from captum_sam.gif.base import SAMTracInBase
from captum_sam.gif.points import PERTURBATIONS, TRAJECTORY_PERTURBATIONS
from captum_sam.gif.setup import GIFOptions, build_engines
from captum_sam.gif.terms import trajectory_terms
from captum_sam.trajectory import Trajectory, load_trajectory

__all__ = ["SAMTracInCP"]


def recorded_trajectory(
    record_dir: str | os.PathLike | Trajectory, allow_incomplete: bool
) -> Trajectory:
    """``record_dir`` loaded (and verified) as a :class:`Trajectory`, refused without steps."""
    traj = (
        record_dir
        if isinstance(record_dir, Trajectory)
        else load_trajectory(record_dir, allow_incomplete=allow_incomplete)
    )
    if not traj.steps:
        raise ValueError(f"the trajectory in {traj.directory!r} has no recorded steps")
    return traj


class SAMTracInCP(SAMTracInBase):
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
        rho: SAM radius of training (0 gives Captum's ``TracInCP``). Default ``None``: the
            recorded run's or 0.05 (:func:`~captum_sam.trajectory.sam_settings`).
        adaptive: ASAM. Default ``None``: as for ``rho`` (else ``False``).
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
        projection_dim: If given, every gradient is projected to at most this many
            dimensions per checkpoint by a seeded random projection that preserves
            inner products in expectation (Captum's ``TracInCP`` has no such
            argument; the purpose is that of ``TracInCPFastRandProj``'s): scores
            become unbiased estimates with relative error about
            ``1/sqrt(projection_dim)``. Parameters of ``nn.Linear`` / ``nn.Conv2d``
            layers are projected per layer by a Kronecker product
            :math:`P_{out}^\top [W, b] P_{in}` (TRAK / LoGra style), computed from
            layer inputs and output gradients without forming per-example
            gradients; other parameters by a dense Gaussian (or Rademacher) matrix
            (:func:`~captum_sam.gif.setup.make_projector`).
        projection: ``"gaussian"`` or ``"rademacher"``.
        projection_seed: Seed of the projection.
        factorize: Allow the factored path when every attributed parameter sits
            in an ``nn.Linear`` or ``nn.Conv2d`` layer (per-example products from
            layer inputs and output gradients; checked against ``vmap`` first). The
            scores are the same either way.
        batchnorm: ``"eval"`` (every gradient with the BatchNorm running statistics,
            the default) or ``"batch"`` (training gradients with the statistics of the
            recorded batch the example was trained in, at the weights where the
            gradient is taken, held constant; test gradients keep the running
            statistics). ``"batch"`` needs the trajectory form
            (:meth:`from_trajectory`): the checkpoint form raises ``ValueError``.
        batchnorm_tolerance: For models with BatchNorm: warn (``UserWarning``) at every
            checkpoint where the mean loss in eval mode and in train mode (batch
            statistics) differ by more than this fraction, on up to four training
            batches; ``None`` skips the check.

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
        rho: float | None = None,
        adaptive: bool | None = None,
        perturbation: str = "dataset",
        perturbation_dataset: Dataset | DataLoader | None = None,
        perturbation_scope: str = "trainable",
        test_at_perturbed: bool = False,
        projection_dim: int | None = None,
        projection: str = "gaussian",
        projection_seed: int = 0,
        factorize: bool = True,
        batchnorm: str = "eval",
        batchnorm_tolerance: float | None = 0.1,
    ) -> None:
        self._captum_init(
            model, train_dataset, checkpoints,
            {"checkpoints_load_func": checkpoints_load_func, "loss_fn": loss_fn,
             "batch_size": batch_size, "test_loss_fn": test_loss_fn},
            rho, adaptive,
        )  # fmt: skip
        options = GIFOptions(
            perturbation, perturbation_dataset, perturbation_scope, test_at_perturbed,
            projection_dim, projection, projection_seed, factorize, batchnorm,
            batchnorm_tolerance,
        )  # fmt: skip
        self._engines = build_engines(
            self, train_dataset, layers, sample_wise_grads_per_batch, options, PERTURBATIONS,
            self._checkpoint_terms, final_checkpoint=self.checkpoints[-1],
        )  # fmt: skip

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
        batchnorm: str = "eval",
        batchnorm_tolerance: float | None = 0.1,
        allow_incomplete: bool = False,
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
            batchnorm: ``"eval"`` or ``"batch"`` (see the class): with ``"batch"``
                the gradient of step :math:`t` at :math:`w_t + \epsilon_t` normalises
                with the statistics of :math:`B_t` at :math:`w_t + \epsilon_t`, and
                :math:`\epsilon_t` comes from the recorded batch's train-mode gradient.
            batchnorm_tolerance: See the class.
            allow_incomplete: Score the recorded prefix of a run that did not finish
                (with a warning); by default an incomplete trajectory is refused.

        Returns:
            An estimator whose scores follow the recorded batch membership.
        """
        traj = recorded_trajectory(record_dir, allow_incomplete)
        self = cls.__new__(cls)
        self._captum_init_on(
            traj, model, train_dataset,
            {"checkpoints_load_func": checkpoints_load_func, "loss_fn": loss_fn,
             "batch_size": batch_size, "test_loss_fn": test_loss_fn},
        )  # fmt: skip
        self.trajectory = traj
        options = GIFOptions(
            perturbation, perturbation_dataset, perturbation_scope, test_at_perturbed,
            projection_dim, projection, projection_seed, factorize, batchnorm,
            batchnorm_tolerance,
        )  # fmt: skip
        self._engines = build_engines(
            self, train_dataset, layers, sample_wise_grads_per_batch, options,
            TRAJECTORY_PERTURBATIONS, lambda loader: trajectory_terms(traj),
            final_checkpoint=traj.final.path, trajectory=traj,
        )  # fmt: skip
        return self
