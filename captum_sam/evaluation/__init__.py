"""Ground truth and metrics: retraining without examples, LOO correlation, LDS.

:class:`~captum_sam.evaluation.ground_truth.GroundTruth` retrains (to the SAM fixed
point, by replaying the recorded schedule or by fresh seeded retraining, under the
protocols of :data:`PROTOCOLS`) with an on-disk cache;
:func:`loo_scores` and :func:`lds_scores` score an estimator against it;
:mod:`captum_sam.evaluation.metrics` holds the metrics and
:mod:`captum_sam.evaluation.compare` the side-by-side comparison. The names below are
imported on first use, so that :mod:`captum_sam.evaluation.config` (the command's
settings) loads without torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from captum_sam._lazy import lazy_names

_WHERE = {
    "RETRAIN_MODES": "captum_sam.evaluation.retrain",
    "FixedPointResult": "captum_sam.evaluation.retrain",
    "GroundTruth": "captum_sam.evaluation.ground_truth",
    "RetrainResults": "captum_sam.evaluation.ground_truth",
    "lds_scores": "captum_sam.evaluation.ground_truth",
    "loo_scores": "captum_sam.evaluation.ground_truth",
    "random_subsets": "captum_sam.evaluation.subsets",
    "check_masks": "captum_sam.evaluation.subsets",
    "PROTOCOLS": "captum_sam.evaluation.config",
    "retrain_loo": "captum_sam.evaluation.retrain",
    "sam_fixed_point": "captum_sam.evaluation.retrain",
}

__all__ = [
    "RETRAIN_MODES",
    "FixedPointResult",
    "GroundTruth",
    "RetrainResults",
    "lds_scores",
    "loo_scores",
    "random_subsets",
    "check_masks",
    "PROTOCOLS",
    "retrain_loo",
    "sam_fixed_point",
]


__getattr__, __dir__ = lazy_names(__name__, globals(), _WHERE)

if TYPE_CHECKING:
    from captum_sam.evaluation.config import PROTOCOLS
    from captum_sam.evaluation.ground_truth import (
        GroundTruth,
        RetrainResults,
        lds_scores,
        loo_scores,
    )
    from captum_sam.evaluation.retrain import (
        RETRAIN_MODES,
        FixedPointResult,
        retrain_loo,
        sam_fixed_point,
    )
    from captum_sam.evaluation.subsets import check_masks, random_subsets
