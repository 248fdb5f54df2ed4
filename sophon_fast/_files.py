"""Atomic file writes: a reader, or a run resumed after a kill, sees the old file or the new one.

The content goes to a temporary file in the target's folder, is flushed and fsynced, gets the
permissions ``open()`` would give it (0666 less the umask), and is renamed over the target
(``os.replace``); the folder is then fsynced so that the rename itself survives a power cut. A
failure at any point removes the temporary file and leaves the target as it was.

This sits at the bottom of the package so that every layer (checkpoints, attack reports, demos)
writes its files the same way; the checkpoint writer adds its crash-test write points through
``reach``.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = ["atomic_write", "atomic_write_text"]


def _umask() -> int:
    """The process umask (reading it means setting it: restored at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_directory(directory: Path) -> None:
    """Make a rename in ``directory`` durable (POSIX; a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(
    path: str | os.PathLike,
    write: Callable[[str], None],
    reach: Callable[[str, Path], None] | None = None,
) -> None:
    """Replace ``path`` with what ``write(temporary_path)`` writes, atomically.

    ``reach(stage, temporary)``, when given, is called with ``"written"`` once ``write`` returned
    and with ``"synced"`` after the fsync, both before the rename.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        # mkstemp creates 0600 (and safetensors writes a fresh file): the renamed file gets what
        # open() would give it, 0666 less the umask
        os.chmod(tmp, 0o666 & ~_umask())
        if reach is not None:
            reach("written", Path(tmp))
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        if reach is not None:
            reach("synced", Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_directory(path.parent)  # the rename itself survives a power cut


def atomic_write_text(
    path: str | os.PathLike, text: str, *, reach: Callable[[str, Path], None] | None = None
) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically (see :func:`atomic_write`)."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)

    atomic_write(path, write, reach)
