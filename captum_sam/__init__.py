r"""captum_sam: data attribution for models trained with Sharpness-Aware Minimization.

Drop-in Captum estimators whose gradients and Hessians are taken where SAM
training really evaluates them, at the perturbed weights :math:`w + \epsilon(w)`.
"""

from captum_sam.core.checkpoints import checkpoints_load_func, load_checkpoint
from captum_sam.gif import (
    ExactNearestNeighbors,
    SAMTracInCP,
    SAMTracInCPFast,
    SAMTracInCPFastRandProj,
)
from captum_sam.hif import SAMArnoldiInfluenceFunction, SAMInfluenceFunction
from captum_sam.optim import SAM
from captum_sam.recorder import IndexedDataset, TrajectoryRecorder
from captum_sam.solvers import ConvergenceWarning, SolverOptions
from captum_sam.training import replay_trajectory, train_sam
from captum_sam.trajectory import Trajectory, load_trajectory

__version__ = "0.1.0"

__all__ = [
    "SAM",
    "SAMTracInCP",
    "SAMTracInCPFast",
    "SAMTracInCPFastRandProj",
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
    "train_sam",
]
