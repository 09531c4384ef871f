"""A durable, append-only buffer of JSON lines on local disk.

Why a file and not a Python list or BackgroundTasks: anything held only in memory is lost when the
process is killed, and LiteLLM's in-memory spend queue is known to drop batches. Each line is
handed to the kernel with one `os.write` on an O_APPEND descriptor as the request finishes, so a
SIGKILL loses nothing (the page cache outlives the process); `fsync` runs in batches, bounding what
a power loss could take to `usage_fsync_interval_seconds`. It needs no Redis, so it works the same
in a single-process deployment. (With several pods, `data_dir` must be on a volume that survives a
pod restart.)

Files, in `<data_dir>/buffer/<name>/`:
  `<pid>-<token>-<n>.open`  the segment this process appends to; it holds an exclusive flock on it
  `<...>.jsonl`             a closed segment, waiting to be flushed, deleted once in the database
A `.open` file whose flock can be taken belongs to a dead process (the kernel drops flocks with
the process), so it is treated as closed: this is how a restart replays what SIGKILL left.
Several processes may flush the same closed segment at once; inserts are idempotent by request id,
so that only costs a little work.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import secrets
from pathlib import Path
from typing import Any

import orjson
import structlog

from llm_api.core.private_files import private_dir

log = structlog.get_logger(__name__)

OPEN_SUFFIX = ".open"
CLOSED_SUFFIX = ".jsonl"


class DurableBuffer:
    def __init__(self, directory: Path) -> None:
        self.dir = directory
        private_dir(self.dir)  # 0700; segments are created 0600
        self._prefix = f"{os.getpid()}-{secrets.token_hex(4)}"
        self._seq = 0
        self._fd = -1
        self._path: Path | None = None
        self._written = 0  # lines in the current segment
        self._dirty = False
        self._lock = asyncio.Lock()  # serialises fsync and rotation (writes need no lock)
        self._open_segment()

    # --- writing (on the event loop, one syscall per record) ----------------------------------

    def _create_segment(self) -> tuple[int, Path]:
        self._seq += 1
        path = self.dir / f"{self._prefix}-{self._seq:06d}{OPEN_SUFFIX}"
        # Created and locked under a name scanners ignore, then renamed (the lock stays with the
        # inode): another process must never see an `.open` file without its lock.
        creating = path.with_suffix(".new")
        fd = os.open(creating, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.rename(creating, path)
        return fd, path

    def _open_segment(self) -> None:
        self._fd, self._path = self._create_segment()
        self._written = 0

    @staticmethod
    def _close_segment(fd: int, path: Path) -> None:
        os.fsync(fd)
        os.rename(path, path.with_suffix(CLOSED_SUFFIX))
        os.close(fd)  # closing drops the flock, after the rename

    def append(self, record: dict[str, Any]) -> None:
        """One `write` of one whole line: the kernel appends it atomically, so a kill leaves
        either the whole line or none of it."""
        line = orjson.dumps(record) + b"\n"
        if self._fd < 0:  # a late record after close(): a new segment, replayed at next start
            self._open_segment()
        os.write(self._fd, line)
        self._written += 1
        self._dirty = True

    @property
    def pending_in_current(self) -> int:
        return self._written

    async def sync(self) -> None:
        """fsync what was written since the last call (in a thread: it can take milliseconds)."""
        async with self._lock:
            if self._dirty:
                self._dirty = False
                await asyncio.to_thread(os.fsync, self._fd)

    async def rotate(self) -> None:
        """Close the current segment (if it holds anything) so the flusher can take it."""
        async with self._lock:
            if self._written == 0 or self._path is None:
                return
            # File-system calls run in a thread: under I/O pressure a rename or fsync can take
            # 100+ ms, which must not stall the event loop. Records appended meanwhile go to
            # the old segment, which is closed only after the swap below.
            new_fd, new_path = await asyncio.to_thread(self._create_segment)
            fd, path = self._fd, self._path
            self._fd, self._path, self._written = new_fd, new_path, 0
            await asyncio.to_thread(self._close_segment, fd, path)

    async def close(self) -> None:
        await self.rotate()
        async with self._lock:
            if self._fd >= 0:
                if self._path is not None and self._written == 0:
                    self._path.unlink(missing_ok=True)
                os.close(self._fd)
                self._fd, self._path = -1, None

    # --- reading (by the flusher) -------------------------------------------------------------

    def closed_segments(self) -> list[Path]:
        """Closed segments, oldest first, including `.open` files of dead processes (which are
        renamed to closed here, so the next scan sees them as such)."""
        for path in self.dir.glob(f"*{OPEN_SUFFIX}"):
            if path == self._path:
                continue
            if _owner_is_dead(path):
                with contextlib.suppress(FileNotFoundError):
                    os.rename(path, path.with_suffix(CLOSED_SUFFIX))
                    log.info("usage_buffer_orphan_recovered", segment=path.name)
        return sorted(self.dir.glob(f"*{CLOSED_SUFFIX}"), key=_mtime)

    @staticmethod
    def read_segment(path: Path) -> list[dict[str, Any]]:
        records = []
        try:
            data = path.read_bytes()
        except FileNotFoundError:  # another process flushed it first
            return []
        for number, line in enumerate(data.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(orjson.loads(line))
            except orjson.JSONDecodeError:  # a torn last line after a power loss
                log.error("usage_buffer_bad_line", segment=path.name, line=number)
        return records

    @staticmethod
    def remove(path: Path) -> None:
        path.unlink(missing_ok=True)


def _owner_is_dead(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False  # a live process (maybe this one) still appends to it
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return True
    finally:
        os.close(fd)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return 0.0
