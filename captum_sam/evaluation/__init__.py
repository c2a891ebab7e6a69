"""Ground truth and metrics: retraining without examples, LOO correlation, LDS."""

from captum_sam.evaluation.retrain import (
    RETRAIN_MODES,
    FixedPointResult,
    retrain_loo,
    sam_fixed_point,
)

__all__ = ["RETRAIN_MODES", "FixedPointResult", "retrain_loo", "sam_fixed_point"]
