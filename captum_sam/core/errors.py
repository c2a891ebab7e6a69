"""Exceptions that keep Captum's contract while naming the argument at fault."""

from __future__ import annotations

__all__ = ["ArgumentError", "require_inputs"]


class ArgumentError(ValueError, AssertionError):
    """A bad argument: a ``ValueError`` that names it.

    Captum checks many of the same conditions with ``assert``, so code written for
    Captum may catch ``AssertionError``; this exception is an instance of both.
    """


def require_inputs(inputs: object) -> None:
    """Refuse ``influence(None)`` as Captum does (its message, an ``AssertionError``)."""
    if inputs is None:
        raise ArgumentError(
            "`inputs` argument is required. To compute self influence scores, use the "
            "`self_influence` method instead."
        )
