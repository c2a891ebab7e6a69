"""Output directories of the ``captum-sam`` command: refuse, check, clean.

Both subcommands refuse an ``--out`` directory that holds anything unless
``--overwrite`` is given; then they remove only the files an earlier run of the same
command wrote there (:func:`make_out_ready`) and keep, and name, everything else.
Everything here runs before any expensive work and imports no torch.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

__all__ = [
    "UsageError",
    "RunFailed",
    "work_started",
    "OutputLayout",
    "train_layout",
    "compare_layout",
    "make_out_ready",
    "refuse_non_empty",
    "check_training_settings",
    "usage_errors",
    "error_message",
    "require_writable_dir",
    "clean_out_dir",
    "out_lock",
    "OUT_LOCK",
]


class UsageError(Exception):
    """The command line cannot be carried out as given (exit status 2)."""


class RunFailed(Exception):
    """The run failed after its work started (exit status 1); the cause is chained."""


@contextlib.contextmanager
def work_started() -> Iterator[None]:
    """A ``ValueError``/``TypeError`` from here on is a failed run, not a bad command line.

    (A corrupt cache file found after training, say.) Raises :class:`RunFailed` from it.
    """
    try:
        yield
    except UsageError:
        raise
    except (ValueError, TypeError) as err:
        raise RunFailed(str(err)) from err


_TEMPORARY = r"\.tmp-.*\.part"  # left behind by a killed core.files.atomic_write
OUT_LOCK = ".captum-sam.lock"
"""The lock file a running command holds in its ``--out`` (:func:`out_lock`)."""
# the plots of evaluation/report.py (_plots writes these names)
_PLOTS = ("loo_scatter.png", "mislabel_recall.png", "harmful_removal.png", "trace.png")


@dataclass(frozen=True)
class OutputLayout:
    """The files a command writes into a directory: ``--overwrite`` removes only these.

    Attributes:
        names: Exact file names.
        patterns: Regular expressions that a whole file name must match.
        subdirs: ``(pattern, layout)`` of the subdirectories the command creates (the
            pattern matches the whole name); one the cleaning leaves empty is removed.
        manifest_checkpoints: When the directory holds a trajectory ``manifest.json``
            (its ``format`` field says so): also that manifest, the checkpoint files it
            names and the files matching ``record_patterns`` (checkpoints a killed
            recorder wrote before its manifest named them). A ``manifest.json`` of
            anything else, and files named like checkpoints next to it, are kept.
        record_patterns: See ``manifest_checkpoints``.
        reused: Patterns of files the command wrote and reads again (a cache): kept.
    """

    names: frozenset[str] = frozenset()
    patterns: tuple[str, ...] = ()
    subdirs: tuple[tuple[str, OutputLayout], ...] = ()
    manifest_checkpoints: bool = False
    record_patterns: tuple[str, ...] = ()
    reused: tuple[str, ...] = ()


@dataclass
class CleanedDir:
    """What :func:`clean_out_dir` did; paths relative to the directory, ``/`` after a folder."""

    removed: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)


def train_layout() -> OutputLayout:
    """What ``train`` writes: the files of :class:`~captum_sam.TrajectoryRecorder`."""
    from captum_sam.trajectory import MANIFEST

    return OutputLayout(
        patterns=(_TEMPORARY,),
        manifest_checkpoints=True,
        record_patterns=(re.escape(MANIFEST), r"initial\.pt", r"step_\d+\.pt"),
    )


def compare_layout() -> OutputLayout:
    """What ``compare`` writes (:func:`~captum_sam.evaluation.compare.run_compare`).

    The ground-truth cache ``cache/`` keeps its results (``<mode>-<key>/manifest.json``
    and ``row-*.pt``, and a writer's lock): they are keyed by a hash of everything they
    depend on, so never stale, and reusing them makes a second run faster. Only its
    temporary files, and rows of the older flat layout (``<mode>-<hex>-<hex>-<hex>.pt``,
    no longer served), are removed.
    """
    from captum_sam.evaluation.retrain import RETRAIN_MODES

    modes = "(?:" + "|".join(RETRAIN_MODES) + ")"
    results = OutputLayout(
        patterns=(_TEMPORARY,), reused=(r"manifest\.json", r"row-[0-9a-f]+\.pt", r"\.lock")
    )
    cache = OutputLayout(
        patterns=(_TEMPORARY, rf"{modes}-[0-9a-f]+-[0-9a-f]+-[0-9a-f]+\.pt"),
        subdirs=((rf"{modes}-[0-9a-f]+", results),),
    )
    return OutputLayout(
        names=frozenset({"report.md", "results.json", "fixed_point.pt", *_PLOTS}),
        patterns=(_TEMPORARY,),
        subdirs=(("trajectory", train_layout()), ("cache", cache)),
    )


def _manifest_checkpoints(directory: str) -> set[str] | None:
    """The checkpoint files a trajectory manifest in ``directory`` names (plain ``.pt`` names).

    ``None`` when ``directory`` holds no trajectory manifest (none, unreadable, or a
    ``manifest.json`` of something else).
    """
    from captum_sam.record_schema import FORMAT
    from captum_sam.trajectory import MANIFEST

    try:
        with open(os.path.join(directory, MANIFEST), encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        return None
    checkpoints = manifest.get("checkpoints")
    entries = [manifest.get("initial"), *(checkpoints if isinstance(checkpoints, list) else [])]
    names = {e.get("file") for e in entries if isinstance(e, dict)}
    return {n for n in names if isinstance(n, str) and re.fullmatch(r"[^/\\\x00]+\.pt", n)}


def _sort_entries(
    directory: str, layout: OutputLayout, prefix: str = ""
) -> tuple[list[str], list[str], list[str], list[str]]:
    """``(files to remove, folders to remove after them, reused, kept)`` of ``directory``."""
    remove: list[str] = []
    folders: list[str] = []
    reused: list[str] = []
    kept: list[str] = []
    owned = set(layout.names)
    patterns = layout.patterns
    if layout.manifest_checkpoints:
        named = _manifest_checkpoints(directory)
        if named is not None:  # a record: its manifest, its files, a killed run's files
            owned |= named
            patterns = (*patterns, *layout.record_patterns)
    for name in sorted(os.listdir(directory)):
        if not prefix and name == OUT_LOCK:  # the running command's own lock
            continue
        path, rel = os.path.join(directory, name), prefix + name
        is_dir = os.path.isdir(path) and not os.path.islink(path)  # links are never followed
        sub = next((lay for pat, lay in layout.subdirs if re.fullmatch(pat, name)), None)
        if is_dir and sub is not None:
            r, f, u, k = _sort_entries(path, sub, rel + "/")
            remove, folders, reused, kept = remove + r, folders + f, reused + u, kept + k
            if not (u or k):
                folders.append(rel)
        elif is_dir:
            kept.append(rel + "/")
        elif name in owned or any(re.fullmatch(p, name) for p in patterns):
            remove.append(rel)
        elif any(re.fullmatch(p, name) for p in layout.reused):
            reused.append(rel)
        else:
            kept.append(rel)
    return remove, folders, reused, kept


def clean_out_dir(directory: str, layout: OutputLayout) -> CleanedDir:
    """Remove from ``directory`` what an earlier run described by ``layout`` wrote there.

    Files (and symbolic links, never followed) that the layout names are removed, then
    its subdirectories left empty; everything else is kept.

    Returns:
        The removed, reused (cache) and kept entries, relative to ``directory``.
    """
    remove, folders, reused, kept = _sort_entries(directory, layout)
    for rel in remove:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(directory, rel))
    for rel in folders:  # deepest first
        os.rmdir(os.path.join(directory, rel))
    return CleanedDir(removed=remove + [f + "/" for f in folders], reused=reused, kept=kept)


def _count(items: Sequence[str], noun: str) -> str:
    if len(items) == 1:
        return f"1 {noun}"
    return f"{len(items)} {noun[:-1] + 'ies' if noun.endswith('y') else noun + 's'}"


def _listing(names: Sequence[str], limit: int = 10) -> str:
    more = len(names) - limit
    return ", ".join(names[:limit]) + (f" and {more} more" if more > 0 else "")


def refuse_non_empty(path: str, overwrite: bool, flag: str = "--out") -> None:
    """Raise unless ``path`` is missing, an empty folder, or ``overwrite``; changes nothing.

    Raises:
        NotADirectoryError: ``path`` exists and is not a directory.
        FileExistsError: ``path`` holds anything and ``overwrite`` is false.
    """
    if os.path.lexists(path) and not os.path.isdir(path):
        raise NotADirectoryError(
            errno.ENOTDIR, f"{flag} {path!r} exists and is not a directory", path
        )
    if overwrite or not os.path.isdir(path):
        return
    entries = sorted(e for e in os.listdir(path) if e != OUT_LOCK)
    if entries:
        raise FileExistsError(
            errno.EEXIST,
            f"{flag} {path!r} is not empty ({_listing(entries, 5)}); pass --overwrite to "
            f"replace an earlier run (files it did not write are kept) or choose another {flag}",
            path,
        )


@contextlib.contextmanager
def out_lock(path: str, overwrite: bool, command: str) -> Iterator[None]:
    """Hold ``--out`` for one command: a second command on the same directory is refused.

    Checks ``--out`` (:func:`refuse_non_empty`) before taking the lock, so a path that
    is not a directory is reported as such, and again once the lock is held (the
    check no other run can race). A killed holder releases the lock with its process.

    Raises:
        UsageError: Not a directory, not empty without ``overwrite``, or held by another
            running command (the message names the lock file and its holder).
    """
    from captum_sam.core.files import DirectoryLock

    created = not os.path.lexists(path)
    with usage_errors():
        refuse_non_empty(path, overwrite)
        require_writable_dir(path, "--out")
    try:
        lock = DirectoryLock(path, f"captum-sam {command} --out", OUT_LOCK).__enter__()
    except (OSError, ValueError) as err:
        raise UsageError(error_message(err)) from err
    try:
        with usage_errors():
            refuse_non_empty(path, overwrite)
        yield
    except BaseException:
        lock.__exit__(None, None, None)
        if created:  # a command that failed before writing leaves no empty --out behind
            with contextlib.suppress(OSError):
                os.rmdir(path)  # (only an empty directory is removed)
        raise
    lock.__exit__(None, None, None)


def require_writable_dir(path: str, flag: str) -> None:
    """Create the directory ``path`` if needed and check that files can be created in it."""
    if os.path.lexists(path) and not os.path.isdir(path):
        raise NotADirectoryError(
            errno.ENOTDIR, f"{flag} {path!r} exists and is not a directory", path
        )
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        reason = err.strerror or str(err)
        raise type(err)(
            err.errno, f"{flag} {path!r} is not a writable directory ({reason})", path
        ) from err


def make_out_ready(path: str, layout: OutputLayout, overwrite: bool) -> None:
    """Create ``--out``, check it is writable and, with ``--overwrite``, clean it."""
    with usage_errors():
        require_writable_dir(path, "--out")
        if not overwrite:
            return
        cleaned = clean_out_dir(path, layout)
    if cleaned.removed or cleaned.reused or cleaned.kept:
        parts = [f"removed {_count(cleaned.removed, 'entry')} of an earlier run from {path!r}"]
        if cleaned.reused:
            parts.append(f"kept {_count(cleaned.reused, 'cache file')} for reuse")
        if cleaned.kept:
            parts.append(f"kept {_count(cleaned.kept, 'other entry')}: {_listing(cleaned.kept)}")
        print("captum-sam: --overwrite: " + "; ".join(parts), file=sys.stderr)


def check_training_settings(
    epochs: int, batch_size: int, lr: float, rho: float, weight_decay: float
) -> None:
    """Reject what training would reject, before ``--overwrite`` removes anything."""
    for flag, count in (("--epochs", epochs), ("--batch-size", batch_size)):
        if count < 1:
            raise ValueError(f"{flag} must be a positive integer, got {count}")
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"--lr must be a finite number > 0, got {lr}")
    for flag, value in (("--rho", rho), ("--weight-decay", weight_decay)):
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{flag} must be a finite number >= 0, got {value}")


@contextlib.contextmanager
def usage_errors() -> Iterator[None]:
    """Report an ``OSError`` of the checks made before any work as a usage error."""
    try:
        yield
    except OSError as err:
        raise UsageError(error_message(err)) from err


def error_message(err: BaseException) -> str:
    """``err`` on one line; an ``OSError`` names its file(s)."""
    if isinstance(err, OSError) and err.strerror:
        text = err.strerror
        names = [
            n if isinstance(n, str) else os.fsdecode(n) if isinstance(n, bytes) else str(n)
            for n in (err.filename, err.filename2)
            if n is not None
        ]
        missing = [repr(n) for n in names if n not in text]
        if missing:
            text += ": " + " -> ".join(missing)
    else:
        text = str(err) or type(err).__name__
    return " ".join(text.split())
