"""File contents on disk, under `data_dir/files/`. Metadata and ownership live in the database;
this module only reads and writes bytes, and never builds a path from user input (ids are ours).
The directory is 0700 and every file 0600 (core/private_files.py).
"""

from __future__ import annotations

import os
import re
import secrets
from pathlib import Path

from llm_api.core.private_files import open_private, private_dir, private_file

_ID = re.compile(r"^(file|batch)-[0-9a-f]{24,32}$")


def new_file_id() -> str:
    return f"file-{secrets.token_hex(12)}"


def new_batch_id() -> str:
    return f"batch-{secrets.token_hex(12)}"


class FileStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        private_dir(self.root)
        for existing in self.root.iterdir():  # files an older version made with the umask
            private_file(existing, create=False)

    def path(self, file_id: str) -> Path:
        if not _ID.match(file_id):
            raise ValueError("invalid file id")
        return self.root / file_id

    def write(self, file_id: str, data: bytes) -> None:
        tmp = self.path(file_id).with_suffix(".tmp")
        with open_private(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        tmp.replace(self.path(file_id))

    def read(self, file_id: str) -> bytes:
        path = self.path(file_id)
        return path.read_bytes() if path.exists() else b""

    def size(self, file_id: str) -> int:
        path = self.path(file_id)
        return path.stat().st_size if path.exists() else 0

    def delete(self, file_id: str) -> None:
        self.path(file_id).unlink(missing_ok=True)


class LineAppender:
    """Append-only JSONL writer for batch results. Each line is written with one `write` and
    fsync'd, so after a crash the file holds whole lines plus at most one torn tail, which
    `recover()` cuts off."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fh = open_private(path, "ab")

    def append(self, line: bytes) -> None:
        self._fh.write(line.rstrip(b"\n") + b"\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        self._fh.close()

    @staticmethod
    def recover(path: Path) -> list[bytes]:
        """Whole lines already in the file; a torn last line (killed mid-write) is removed."""
        if not path.exists():
            return []
        data = path.read_bytes()
        if data and not data.endswith(b"\n"):
            cut = data.rfind(b"\n") + 1
            with path.open("r+b") as fh:
                fh.truncate(cut)
            data = data[:cut]
        return [line for line in data.split(b"\n") if line]
