"""Load torch's forward-AD decompositions once, without their deprecation notice.

Our first ``torch.func.jvp`` makes torch import ``torch._decomp.decompositions_for_jvp``,
which calls the deprecated ``torch.jit.script`` and prints a ``FutureWarning`` (a
``DeprecationWarning`` before torch 2.14) in every run: a notice about torch's internals,
not about anything a user does. Importing that module here, with exactly that message
silenced, keeps every other warning (and that one, raised anywhere else) as it was.
Imported first by :mod:`captum_sam.core`.
"""

import warnings


def load_forward_ad_decompositions() -> None:
    """Import ``torch._decomp.decompositions_for_jvp`` with its jit notice silenced."""
    with warnings.catch_warnings():
        # a FutureWarning in torch 2.14, a DeprecationWarning in 2.13: match the message
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated")
        try:
            from torch._decomp import decompositions_for_jvp  # noqa: F401
        except ImportError:  # a torch without it has nothing to load
            pass


load_forward_ad_decompositions()
