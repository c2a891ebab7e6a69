"""SAM-GIF: SAM twins of Captum's TracIn classes and the engines they are built from."""

from captum_sam.gif.fast import SAMTracInCPFast
from captum_sam.gif.neighbors import ExactNearestNeighbors
from captum_sam.gif.rand_proj import SAMTracInCPFastRandProj
from captum_sam.gif.tracincp import SAMTracInCP
from captum_sam.gif.unrolled import SAMUnrolledGIF

__all__ = [
    "SAMTracInCP",
    "SAMTracInCPFast",
    "SAMTracInCPFastRandProj",
    "SAMUnrolledGIF",
    "ExactNearestNeighbors",
]
