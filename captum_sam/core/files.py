"""Files on disk are untrusted: atomic writes, content hashes, locks and guarded reads.

Every on-disk format of the package (checkpoints, trajectories, quantity caches,
ground-truth caches) goes through these helpers:

* :func:`atomic_write` writes through a temporary file in the same directory and
  renames it, so a reader never sees a partial file and a killed writer leaves the old
  one in place;
* :func:`sha256_file` hashes a file's bytes (recorded in manifests, checked on load);
* :class:`DirectoryLock` refuses a second writer of the same directory (an ``flock``
  on a lock file, released by the kernel when its holder dies; ``O_EXCL`` creation
  where ``fcntl`` is missing);
* :func:`read_json` and :func:`torch_load` read a file or raise ``ValueError`` naming
  it; :func:`torch_load` checks the sizes the archive declares before inflating
  anything (a small compressed file cannot expand to gigabytes) and never runs pickled
  code (``weights_only=True``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import socket
import tempfile
import zipfile
from collections.abc import Callable
from types import TracebackType
from typing import Any

import torch

try:
    import fcntl
except ImportError:  # pragma: no cover (Windows)
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "atomic_write",
    "sha256_file",
    "sha256_bytes",
    "DirectoryLock",
    "read_json",
    "torch_load",
    "check_archive",
    "remove_stale_temporaries",
]

LOCK = ".lock"


def atomic_write(path: str, write: Callable[[Any], Any]) -> None:
    """Write ``path`` through a temporary file in the same directory, then rename it.

    A reader never sees a partly written file, and a failed write leaves the old file
    (if any) in place.
    """
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def remove_stale_temporaries(directory: str) -> list[str]:
    """Remove ``.tmp-*.part`` files that a killed writer left in ``directory``.

    Call it only while holding the directory's :class:`DirectoryLock` (no writer runs).
    """
    removed = []
    for name in os.listdir(directory):
        if name.startswith(".tmp-") and name.endswith(".part"):
            os.remove(os.path.join(directory, name))
            removed.append(name)
    return removed


def sha256_bytes(data: bytes) -> str:
    """SHA-256 of bytes, as hex."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str) -> str:
    """SHA-256 of a file's bytes, as hex."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class DirectoryLock:
    """Exclusive write access to a directory, through a lock file in it.

    Where the platform has ``fcntl`` (Linux, macOS) the lock is an exclusive
    ``flock`` on the file: the kernel releases it when the holder exits or is killed,
    so a dead writer never blocks the next one, and a holder's process id reused by an
    unrelated process does not either. The file names its holder (host, pid) for
    messages; on release it is removed while still locked, and a taker checks that the
    file it locked is still the one in the directory, so two writers never hold two
    different files. Elsewhere the file is created with ``O_EXCL`` and a lock whose
    process is gone (on this host) is replaced.

    Args:
        directory: The directory (created if needed).
        what: What is being written, for messages (e.g. ``"quantity cache"``).
        name: The lock file's name in ``directory`` (default :data:`LOCK`); distinct
            names are independent locks.

    Raises:
        ValueError: Another live process holds the lock (the message names the lock
            file and the holder).
    """

    def __init__(self, directory: str, what: str, name: str = LOCK) -> None:
        self.directory, self.what = directory, what
        self.path = os.path.join(directory, name)
        self._fd: int | None = None
        self._held = False

    def _holder(self) -> tuple[str, int] | None:
        try:
            with open(self.path, encoding="utf-8") as f:
                info = json.load(f)
            return str(info["host"]), int(info["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _refuse(self) -> ValueError:
        return ValueError(
            f"{self.what} in {self.directory!r} is being written by another process "
            f"(lock file {self.path!r}, holder {self._holder()}); wait for it to finish, or "
            "remove the lock file if that process no longer exists"
        )

    def __enter__(self) -> DirectoryLock:
        os.makedirs(self.directory, exist_ok=True)
        me = json.dumps({"host": socket.gethostname(), "pid": os.getpid()}).encode()
        if fcntl is None:
            return self._enter_exclusive_create(me)
        while True:
            fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                raise self._refuse() from None
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:  # released (removed) between our open and lock
                same = False
            if same:
                break
            os.close(fd)  # we locked a file its holder had just removed: take the new one
        os.ftruncate(fd, 0)
        os.write(fd, me)
        self._fd, self._held = fd, True
        return self

    def _enter_exclusive_create(self, me: bytes) -> DirectoryLock:
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                same_host = holder is not None and holder[0] == socket.gethostname()
                if same_host and not _alive(holder[1]):  # left by a killed writer
                    os.remove(self.path)
                    continue
                raise self._refuse() from None
            os.write(fd, me)
            os.close(fd)
            self._held = True
            return self
        raise self._refuse()  # pragma: no cover

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        if self._held and os.path.exists(self.path):
            os.remove(self.path)  # still locked: a waiter that opened it retries
        if self._fd is not None:
            os.close(self._fd)
        self._fd, self._held = None, False


def read_json(path: str, what: str) -> Any:
    """The JSON content of ``path``, or ``ValueError`` naming the file.

    Raises:
        FileNotFoundError: The file does not exist.
        ValueError: Not UTF-8 text, or not valid JSON.
    """
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{what} {path!r} is not UTF-8 text: {err}") from err
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{what} {path!r} is not valid JSON: {err}") from err


def check_archive(path: str, max_bytes: int | None, what: str) -> None:
    """Check the sizes a torch ``zip`` archive declares, before anything is inflated.

    Args:
        path: The file.
        max_bytes: Largest total of the declared (uncompressed) record sizes allowed;
            ``None``: no limit.
        what: What the file is, for messages.

    Raises:
        ValueError: Not a readable archive, or it declares more than ``max_bytes``.
    """
    if max_bytes is None or not zipfile.is_zipfile(path):
        return  # legacy (non-zip) torch files are read as they are
    try:
        with zipfile.ZipFile(path) as archive:
            declared = sum(info.file_size for info in archive.infolist())
    except (zipfile.BadZipFile, OSError) as err:
        raise ValueError(f"{what} {path!r} is not a readable torch archive: {err}") from err
    if declared > max_bytes:
        raise ValueError(
            f"{what} {path!r} declares {declared} bytes of records, more than the "
            f"{max_bytes} bytes expected: refused before inflating it (a corrupt file or a "
            "decompression bomb)"
        )


def torch_load(
    path: str, map_location: Any = "cpu", what: str = "file", max_bytes: int | None = None
) -> Any:
    """``torch.load(path, weights_only=True)`` with errors that name the file.

    Args:
        path: The file.
        map_location: Where tensors go.
        what: What the file is, for messages (``"checkpoint"``, ``"cache part"``).
        max_bytes: Largest total size the archive may declare (see :func:`check_archive`).

    Raises:
        FileNotFoundError: The file does not exist.
        ValueError: The file cannot be read safely.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} {path!r} does not exist")
    check_archive(path, max_bytes, what)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # unpickling errors of every kind
        raise ValueError(
            f"{what} {path!r} cannot be loaded with weights_only=True (only tensors and "
            f"plain containers are accepted; a truncated or corrupt file fails too): {err}"
        ) from err


def finite_number(value: Any, low: float = 0.0, allow_equal: bool = True) -> bool:
    """Whether ``value`` is a real number (not a bool), finite and ``>= low`` (``> low``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    if not math.isfinite(value):
        return False
    return value >= low if allow_equal else value > low
