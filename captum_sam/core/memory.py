"""Handing freed memory back to the operating system after a large transient stage.

PyTorch allocates CPU tensors with the C library's ``malloc``. glibc serves requests
below a threshold that grows with the largest freed block (up to 32 MB) from its
heap, and a long-lived small tensor allocated late keeps the heap below it resident.
After a stage that makes many medium-sized transient tensors (a K-FAC fit over a
ResNet: unfolded patches of every layer, batch after batch), hundreds of megabytes
of freed memory can stay in the process: on a ResNet-18 fit 730 MB of resident
memory was neither a live tensor nor needed again. :func:`release_freed_memory`
asks glibc to return it (``malloc_trim(0)``, which also releases free pages inside
the heap). Elsewhere (macOS, Windows, musl, CUDA tensors) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from typing import Any

__all__ = ["release_freed_memory"]


@functools.lru_cache(maxsize=1)
def _trim() -> Any:
    """Glibc's ``malloc_trim``, or ``None`` where there is none."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        trim = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def release_freed_memory() -> bool:
    """Return freed heap memory to the operating system; ``True`` if glibc did."""
    trim = _trim()
    return bool(trim(0)) if trim is not None else False
