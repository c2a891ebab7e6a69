"""Fast per-layer products: one module per layer type behind one interface.

:mod:`~captum_sam.core.layers.sites` holds the interface (sites, factors, per-example
gradients from factors), :mod:`~captum_sam.core.layers.products` the per-example
products written once against it, and one module per layer type registers itself:
:mod:`~captum_sam.core.layers.linear`, :mod:`~captum_sam.core.layers.conv2d`,
:mod:`~captum_sam.core.layers.batchnorm`.
"""

from captum_sam.core.layers import batchnorm, conv2d, linear  # noqa: F401  (register the layer types)
