r"""SAM-GIF unrolled: influence and edits from the linearised replay of a recorded SAM run.

:class:`SAMUnrolledGIF` differentiates the recorded training run itself. With
:math:`s_{t+1} = \Phi_t(s_t; a)` the recorded SAM-SGD step (weights and momentum, the SAM
perturbation :math:`\epsilon(w)` included) and :math:`a_k` the weight of training example
:math:`z_k`, the score of :math:`z_k` on a test example :math:`z` is

.. math:: \mathrm{score}(z, z_k) = -\frac{\partial\, l(z; w_T)}{\partial a_k}
          = -\sum_{t: k \in B_t} \lambda_{t+1}^\top \frac{\partial \Phi_t}{\partial a_k},
          \qquad \lambda_T = (\nabla l(z; w_T), 0),\ \lambda_t = J_t^\top \lambda_{t+1},

the exact first-order change of the test loss when :math:`z_k` is down-weighted
(positive: removing it raises the loss, a proponent). Where first-order SAM-GIF adds up
every step's gradient as if later steps did not react, the adjoint :math:`\lambda_t`
carries the test gradient back through the Jacobians :math:`J_t` of all later steps.
All training examples' scores for a chunk of test examples come from one backward sweep
over the trajectory. :meth:`~SAMUnrolledGIF.edited_model` applies the linearised replay
of the removed set (:mod:`~captum_sam.gif.unrolled_replay`).

The base optimizer must be SGD (momentum, dampening, Nesterov and weight decay allowed)
and the model free of BatchNorm and Dropout (the step must be a pure function of the
weights). Cost: about ``T`` SAM steps forward plus ``T`` vector-Jacobian products per
chunk of test examples, and ``T x P`` numbers of memory for the recreated states.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from captum_sam.core.checkpoints import checkpoints_load_func
from captum_sam.core.data import as_loader
from captum_sam.gif.points import TRAJECTORY_PERTURBATIONS
from captum_sam.gif.setup import GIFOptions, build_engines
from captum_sam.gif.terms import trajectory_terms
from captum_sam.gif.tracincp import SAMTracInCP, recorded_trajectory
from captum_sam.gif.unrolled_replay import check_removal
from captum_sam.trajectory import Trajectory

__all__ = ["SAMUnrolledGIF"]


class SAMUnrolledGIF(SAMTracInCP):
    r"""Influence as the exact derivative of the recorded SAM run (Captum ``TracInCPBase`` API).

    Args:
        model: The model (never modified).
        train_dataset: The training set the trajectory indexes into (a Dataset, or a
            DataLoader iterating it in order).
        record_dir: Record directory of :func:`~captum_sam.train_sam` /
            :class:`~captum_sam.TrajectoryRecorder`, or a loaded
            :class:`~captum_sam.Trajectory`.
        loss_fn: Per-example training loss (``reduction="none"``), the one training used.
        batch_size: Batch size for test Datasets.
        test_loss_fn: Loss for test examples (default ``loss_fn``).
        removal: What removing an example means, for scores and edits:
            ``"renormalise"`` (default: each step averages over its kept examples, as
            training without them does) or ``"zero_weight"`` (weight 0, the step still
            divided by :math:`|B_t|`).
        test_chunk: Test examples per adjoint sweep (memory grows with it).
        checkpoints_load_func: Checkpoint loader.
        allow_incomplete: Use the recorded prefix of an unfinished run.
    """

    def __init__(
        self,
        model: nn.Module,
        train_dataset: Dataset | DataLoader,
        record_dir: str | os.PathLike[str] | Trajectory,
        loss_fn: Callable[..., Tensor] | None = None,
        batch_size: int | None = 64,
        test_loss_fn: Callable[..., Tensor] | None = None,
        *,
        removal: str = "renormalise",
        test_chunk: int = 64,
        checkpoints_load_func: Callable[[nn.Module, str], float] = checkpoints_load_func,
        allow_incomplete: bool = False,
    ) -> None:
        self.removal = check_removal(removal)
        if isinstance(test_chunk, bool) or not isinstance(test_chunk, int) or test_chunk < 1:
            raise ValueError(f"`test_chunk` must be a positive int, got {test_chunk!r}")
        self.test_chunk = test_chunk
        traj = recorded_trajectory(record_dir, allow_incomplete)
        self._captum_init_on(
            traj, model, train_dataset,
            {"checkpoints_load_func": checkpoints_load_func, "loss_fn": loss_fn,
             "batch_size": batch_size, "test_loss_fn": test_loss_fn},
        )  # fmt: skip
        self.trajectory = traj
        self._engines = build_engines(
            self, train_dataset, None, False, GIFOptions(perturbation="batch"),
            TRAJECTORY_PERTURBATIONS, lambda loader: trajectory_terms(traj),
            final_checkpoint=traj.final.path, trajectory=traj,
        )  # fmt: skip
        self.unrolled_replay()  # validates the model and the optimizer now

    @classmethod
    def from_trajectory(cls, *args: Any, **kwargs: Any) -> SAMUnrolledGIF:  # type: ignore[override]
        """The constructor itself (the estimator always reads a trajectory)."""
        return cls(*args, **kwargs)

    def _blocks(self, inputs: Any, aggregate: bool, desc: str | None, stream: bool) -> list[Tensor]:
        test = as_loader(inputs, self.batch_size, "inputs")
        replay = self.unrolled_replay()
        return [replay.scores(test, self.removal, aggregate, self.test_chunk, desc is not None)]

    def self_influence(  # type: ignore[override]
        self,
        inputs: Any = None,
        show_progress: bool = False,
        outer_loop_by_checkpoints: bool = False,
    ) -> Tensor:
        r"""Self influence :math:`-\partial l_k(w_T) / \partial a_k` of every training example.

        One adjoint sweep per ``test_chunk`` training examples (the diagonal of the
        train-vs-train scores): ``n_train / test_chunk`` sweeps.

        Args:
            inputs: Must be ``None`` (the training set: scores need batch membership).
            show_progress: Progress bar.
            outer_loop_by_checkpoints: Accepted for Captum's signature; no effect.

        Returns:
            ``(n_train,)`` scores.
        """
        if inputs is not None:
            raise ValueError("SAMUnrolledGIF.self_influence takes inputs=None (the training set)")
        replay, n = self.unrolled_replay(), self._engines.n_train
        out = []
        for start in range(0, n, self.test_chunk):
            idx = list(range(start, min(n, start + self.test_chunk)))
            batch = replay.batch_of(idx)
            cot = replay.gradients(batch, replay.loss)
            rows = -replay.adjoint(cot, self.removal, show_progress)
            out.append(rows[torch.arange(len(idx)), torch.tensor(idx)])
        return torch.cat(out)

    def parameter_change(  # type: ignore[override]
        self,
        indices: Sequence[int] | Tensor,
        flat: bool = False,
        show_progress: bool = False,
        method: str = "linearised",
        removal: str | None = None,
    ) -> dict[str, Tensor] | Tensor:
        """:meth:`SAMTracInCP.parameter_change`, linearised by default, with this ``removal``."""
        return super().parameter_change(
            indices, flat, show_progress, method, removal or self.removal
        )

    def edited_model(  # type: ignore[override]
        self,
        indices: Sequence[int] | Tensor,
        show_progress: bool = False,
        method: str = "linearised",
        removal: str | None = None,
    ) -> nn.Module:
        """:meth:`SAMTracInCP.edited_model`, linearised by default, with this ``removal``."""
        return super().edited_model(indices, show_progress, method, removal or self.removal)

    def compute_intermediate_quantities(self, *args: Any, **kwargs: Any) -> Tensor:
        """Not defined: unrolled scores are not inner products of per-example vectors."""
        raise NotImplementedError(
            "SAMUnrolledGIF has no intermediate quantities: its scores are adjoint "
            "derivatives, not inner products of per-example vectors"
        )

    save_intermediate_quantities = compute_intermediate_quantities  # type: ignore[assignment]
    load_intermediate_quantities = compute_intermediate_quantities  # type: ignore[assignment]
    use_intermediate_quantities = compute_intermediate_quantities  # type: ignore[assignment]
