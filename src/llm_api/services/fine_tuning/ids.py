"""Ids of fine-tuning objects and the working directory of a job (never from user input)."""

from __future__ import annotations

import re
import secrets
from pathlib import Path

from llm_api.core.private_files import private_dir

_JOB = re.compile(r"^ftjob-[0-9a-f]{24}$")


def new_job_id() -> str:
    return f"ftjob-{secrets.token_hex(12)}"


def new_event_id() -> str:
    return f"ftevent-{secrets.token_hex(12)}"


def new_checkpoint_id() -> str:
    return f"ftckpt-{secrets.token_hex(12)}"


def model_name(base: str, owner: str, suffix: str | None, job_id: str) -> str:
    """`ft:<base>:<owner>:<suffix>:<id>`, OpenAI's shape (an empty suffix stays empty)."""
    return f"ft:{base}:{owner}:{suffix or ''}:{job_id.removeprefix('ftjob-')}"


def job_dir(data_dir: Path, job_id: str, *, create: bool = False) -> Path:
    if not _JOB.match(job_id):
        raise ValueError("invalid job id")
    path = data_dir / "fine_tuning" / job_id
    if create:
        private_dir(data_dir / "fine_tuning")
        private_dir(path)
    return path
