"""Ground truth and metrics: retraining without examples, LOO correlation, LDS.

:class:`~captum_sam.evaluation.ground_truth.GroundTruth` retrains (to the SAM fixed
point, or by replaying the recorded schedule) with an on-disk cache;
:func:`loo_scores` and :func:`lds_scores` score an estimator against it;
:mod:`captum_sam.evaluation.metrics` holds the metrics and
:mod:`captum_sam.evaluation.compare` the side-by-side comparison.
"""

from captum_sam.evaluation.ground_truth import (
    GroundTruth,
    RetrainResults,
    lds_scores,
    loo_scores,
    random_subsets,
)
from captum_sam.evaluation.retrain import (
    RETRAIN_MODES,
    FixedPointResult,
    retrain_loo,
    sam_fixed_point,
)

__all__ = [
    "RETRAIN_MODES",
    "FixedPointResult",
    "GroundTruth",
    "RetrainResults",
    "lds_scores",
    "loo_scores",
    "random_subsets",
    "retrain_loo",
    "sam_fixed_point",
]
