"""Everything the server writes under `data_dir` is private to its own user: directories 0700,
files 0600 (uploaded batch input, batch output, the usage buffer, the SQLite database).

The modes are given when a file or directory is created (never a chmod after the fact, which
leaves a window in which the file is readable), and tightened on start for what an older
version created with the process umask (0644/0755). The umask can only make them stricter.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import IO

DIR_MODE = 0o700
FILE_MODE = 0o600


def private_dir(path: Path, *, tighten: bool = True) -> Path:
    """Create `path` (and each missing parent) with mode 0700; tighten it if it exists (unless
    `tighten` is false: `data_dir` itself may be a directory the operator chose and shares).

    Existing parents are left alone: they may be the operator's (e.g. /var/lib)."""
    missing: list[Path] = []
    current = path
    while not current.exists():
        missing.append(current)
        current = current.parent
    for directory in reversed(missing):
        with contextlib.suppress(FileExistsError):  # another process made it first
            directory.mkdir(mode=DIR_MODE)
    if tighten:
        _tighten(path, DIR_MODE)
    return path


def private_file(path: Path, *, create: bool = True) -> None:
    """Create `path` empty with mode 0600 if missing and `create` (so a library that opens it
    by name, like SQLite, keeps that mode), and tighten it if it exists."""
    if create:
        with contextlib.suppress(FileExistsError):
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE))
    _tighten(path, FILE_MODE)


def open_private(path: Path, mode: str = "wb") -> IO[bytes]:
    """`open(path, mode)` for "wb" or "ab", creating the file 0600."""
    flags = os.O_WRONLY | os.O_CREAT
    flags |= os.O_APPEND if mode == "ab" else os.O_TRUNC
    return os.fdopen(os.open(path, flags, FILE_MODE), mode)


def _tighten(path: Path, mode: int) -> None:
    with contextlib.suppress(OSError):  # not ours to change (or gone): leave it
        if path.stat().st_mode & 0o777 & ~mode:
            path.chmod(mode)
