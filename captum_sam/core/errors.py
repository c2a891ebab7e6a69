"""Exceptions that keep Captum's contract while naming the argument at fault."""

from __future__ import annotations

__all__ = ["ArgumentError"]


class ArgumentError(ValueError, AssertionError):
    """A bad argument: a ``ValueError`` that names it.

    Captum checks many of the same conditions with ``assert``, so code written for
    Captum may catch ``AssertionError``; this exception is an instance of both.
    """
