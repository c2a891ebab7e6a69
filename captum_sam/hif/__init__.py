"""SAM-HIF: SAM twins of Captum's influence-function classes and their operators."""

from captum_sam.hif.arnoldi import SAMArnoldiInfluenceFunction
from captum_sam.hif.influence import SAMInfluenceFunction
from captum_sam.hif.operator import CURVATURES, VARIANTS

__all__ = ["SAMInfluenceFunction", "SAMArnoldiInfluenceFunction", "VARIANTS", "CURVATURES"]
