"""What attribution is for: validation scores, mislabel detection, editing, tracing."""

from captum_sam.applications.removal import RemovalCurve, harmful_removal_curve
from captum_sam.applications.scores import (
    DETECT_BY,
    Ranking,
    detect_mislabeled,
    edit_model,
    influence_scores,
)
from captum_sam.applications.tracing import TraceResult, plot_trace, trace, trace_figure

__all__ = [
    "DETECT_BY",
    "Ranking",
    "RemovalCurve",
    "TraceResult",
    "detect_mislabeled",
    "edit_model",
    "harmful_removal_curve",
    "influence_scores",
    "plot_trace",
    "trace",
    "trace_figure",
]
