"""The one module that imports Captum's private paths.

Captum does not export ``InfluenceFunctionBase`` or its helpers publicly; keeping
every such import here means a Captum upgrade breaks one file, not many.
"""

from __future__ import annotations

from captum.influence import TracInCP, TracInCPBase, TracInCPFast, TracInCPFastRandProj
from captum.influence._core.arnoldi_influence_function import ArnoldiInfluenceFunction
from captum.influence._core.influence_function import (
    InfluenceFunctionBase,
    IntermediateQuantitiesInfluenceFunction,
    NaiveInfluenceFunction,
)
from captum.influence._utils.common import KMostInfluentialResults
from captum.influence._utils.nearest_neighbors import AnnoyNearestNeighbors, NearestNeighbors

__all__ = [
    "AnnoyNearestNeighbors",
    "ArnoldiInfluenceFunction",
    "InfluenceFunctionBase",
    "IntermediateQuantitiesInfluenceFunction",
    "KMostInfluentialResults",
    "NaiveInfluenceFunction",
    "NearestNeighbors",
    "TracInCP",
    "TracInCPBase",
    "TracInCPFast",
    "TracInCPFastRandProj",
]
