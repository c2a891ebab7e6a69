r"""captum_sam: data attribution for models trained with Sharpness-Aware Minimization.

Drop-in Captum estimators whose gradients and Hessians are taken where SAM
training really evaluates them, at the perturbed weights :math:`w + \epsilon(w)`.

The public names below are imported on first use (PEP 562), so that
``import captum_sam`` and the ``captum-sam`` command's ``--help`` do not wait for
torch; ``from captum_sam import SAMTracInCP`` works as usual.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from captum_sam._lazy import lazy_names

__version__ = "0.1.0"

_WHERE = {
    "SAM": "captum_sam.optim",
    "SAMTracInCP": "captum_sam.gif",
    "SAMTracInCPFast": "captum_sam.gif",
    "SAMTracInCPFastRandProj": "captum_sam.gif",
    "SAMUnrolledGIF": "captum_sam.gif",
    "SAMInfluenceFunction": "captum_sam.hif",
    "SAMArnoldiInfluenceFunction": "captum_sam.hif",
    "ExactNearestNeighbors": "captum_sam.gif",
    "SolverOptions": "captum_sam.solvers",
    "ConvergenceWarning": "captum_sam.solvers",
    "IndexedDataset": "captum_sam.recorder",
    "Trajectory": "captum_sam.trajectory",
    "TrajectoryRecorder": "captum_sam.recorder",
    "checkpoints_load_func": "captum_sam.core.checkpoints",
    "load_checkpoint": "captum_sam.core.checkpoints",
    "load_trajectory": "captum_sam.trajectory",
    "replay_trajectory": "captum_sam.replay",
    "retrain_fresh": "captum_sam.replay",
    "train_sam": "captum_sam.training",
}

__all__ = [
    "SAM",
    "SAMTracInCP",
    "SAMTracInCPFast",
    "SAMTracInCPFastRandProj",
    "SAMUnrolledGIF",
    "SAMInfluenceFunction",
    "SAMArnoldiInfluenceFunction",
    "ExactNearestNeighbors",
    "SolverOptions",
    "ConvergenceWarning",
    "IndexedDataset",
    "Trajectory",
    "TrajectoryRecorder",
    "checkpoints_load_func",
    "load_checkpoint",
    "load_trajectory",
    "replay_trajectory",
    "retrain_fresh",
    "train_sam",
]


__getattr__, __dir__ = lazy_names(__name__, globals(), _WHERE)

if TYPE_CHECKING:  # static type checkers and IDEs see the names eagerly
    from captum_sam.core.checkpoints import checkpoints_load_func, load_checkpoint
    from captum_sam.gif import (
        ExactNearestNeighbors,
        SAMTracInCP,
        SAMTracInCPFast,
        SAMTracInCPFastRandProj,
        SAMUnrolledGIF,
    )
    from captum_sam.hif import SAMArnoldiInfluenceFunction, SAMInfluenceFunction
    from captum_sam.optim import SAM
    from captum_sam.recorder import IndexedDataset, TrajectoryRecorder
    from captum_sam.replay import replay_trajectory, retrain_fresh
    from captum_sam.solvers import ConvergenceWarning, SolverOptions
    from captum_sam.training import train_sam
    from captum_sam.trajectory import Trajectory, load_trajectory
