"""Readiness of the whole server when gunicorn runs several workers.

Each worker loads its own model copy, and the kernel hands a new connection to whichever worker
accepts first, so one worker's /ready says nothing about the others: a probe could see 200 from a
warm worker while the next request lands on one still loading. Under gunicorn each worker drops
a `ready-<pid>` marker into the shared PROMETHEUS_MULTIPROC_DIR once its models are warm
(gunicorn.conf.py removes it when the worker exits), and /ready is 200 only when there are as many
markers as gunicorn runs workers. Outside gunicorn this is a no-op: one process, its own state.
"""

from __future__ import annotations

import os
from pathlib import Path

WORKERS_ENV = "LLM_API_GUNICORN_WORKERS"  # set by gunicorn.conf.py's post_fork hook
PREFIX = "ready-"


def _shared_dir() -> Path | None:
    if not os.environ.get(WORKERS_ENV):
        return None
    d = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    return Path(d) if d else None


def mark_ready() -> None:
    if (d := _shared_dir()) is not None:
        (d / f"{PREFIX}{os.getpid()}").touch()


def clear(directory: str, pid: int | None = None) -> None:
    """Remove one worker's marker (pid) or every marker (a fresh start)."""
    for path in Path(directory).glob(f"{PREFIX}{pid if pid is not None else '*'}"):
        path.unlink(missing_ok=True)


def all_workers_ready() -> bool:
    d = _shared_dir()
    if d is None:
        return True
    expected = int(os.environ[WORKERS_ENV])
    return sum(1 for _ in d.glob(f"{PREFIX}*")) >= expected
