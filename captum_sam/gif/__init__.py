"""SAM-GIF: SAM twins of Captum's TracIn classes and the engines they are built from."""

from captum_sam.gif.tracincp import SAMTracInCP

__all__ = ["SAMTracInCP"]
