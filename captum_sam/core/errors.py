"""Exceptions that keep Captum's contract while naming the argument at fault."""

from __future__ import annotations

__all__ = [
    "ArgumentError",
    "LayerNameError",
    "RangeArgumentError",
    "TypeArgumentError",
    "check_number",
    "check_k",
    "require_inputs",
    "user_stacklevel",
]


class ArgumentError(ValueError, AssertionError):
    """A bad argument: a ``ValueError`` that names it.

    Captum checks many of the same conditions with ``assert``, so code written for
    Captum may catch ``AssertionError``; this exception is an instance of both.
    """


class LayerNameError(ValueError, AttributeError):
    """A ``layers`` name that is not a module of the model.

    A ``ValueError`` naming it; also an ``AttributeError``, what Captum raises when
    it looks the name up on the model.
    """


class RangeArgumentError(ValueError, RuntimeError):
    """An argument out of range where Captum's own call fails inside torch.

    A ``ValueError`` naming it; also a ``RuntimeError``, what Captum raises (for example
    ``torch.topk`` with a negative ``k``).
    """


class TypeArgumentError(ArgumentError, TypeError):
    """An argument of the wrong type where Captum's own call fails with a ``TypeError``.

    An :class:`ArgumentError` naming it; also a ``TypeError``, what Captum raises (for
    example ``torch.topk`` with ``k=2.0``).
    """


def check_k(k: object) -> int:
    """``k`` of ``influence(..., k=k)`` as an int: any integer type, 0 allowed (as in Captum).

    Numpy integers and one-element integer tensors are accepted, as Captum accepts them.
    """
    import operator

    if isinstance(k, bool):
        raise TypeArgumentError(f"`k` must be an int, got {k!r}")
    try:
        k = operator.index(k)  # type: ignore[arg-type]
    except TypeError:
        raise TypeArgumentError(f"`k` must be an int, got {k!r}") from None
    if k < 0:
        raise RangeArgumentError(f"`k` must be >= 0, got {k}")
    return k


def check_number(name: str, value: object, positive: bool = False) -> float:
    """A finite number ``>= 0`` (``> 0`` if ``positive``), or ``ValueError`` naming it.

    Python, numpy and one-element tensor numbers are accepted (``.item()``).
    """
    from captum_sam.core.files import finite_number

    if not isinstance(value, bool) and getattr(value, "ndim", None) == 0:
        value = value.item()  # type: ignore[attr-defined]  # numpy scalar, 0-d tensor
    if not finite_number(value, 0.0, allow_equal=not positive):
        raise ValueError(
            f"`{name}` must be a finite number {'>' if positive else '>='} 0, got {value!r}"
        )
    return float(value)  # type: ignore[arg-type]


def require_inputs(inputs: object) -> None:
    """Refuse ``influence(None)`` as Captum does (its message, an ``AssertionError``)."""
    if inputs is None:
        raise ArgumentError(
            "`inputs` argument is required. To compute self influence scores, use the "
            "`self_influence` method instead."
        )


def user_stacklevel() -> int:
    """``stacklevel`` for a ``warnings.warn`` in the calling function that points at user code.

    Counts the frames from that function up to the first one outside ``captum_sam``,
    so the warning names the user's line however deep inside the library it is raised.
    """
    import sys

    frame = sys._getframe(1)  # the function that warns: stacklevel 1
    level = 1
    while frame.f_back is not None and frame.f_globals.get("__name__", "").startswith("captum_sam"):
        frame, level = frame.f_back, level + 1
    return level
