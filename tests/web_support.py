"""Helpers for the web UI tests: accounts for a live server made with the real CLI
(`llm-api users create`), and sign-in over HTTP."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx

PASSWORD = "correct horse battery staple"


def live_env(data_dir: Path, **extra: str) -> dict[str, str]:
    """The environment start_live_server gives a server on `data_dir` (same database)."""
    return {
        **os.environ,
        "LLM_API_ENVIRONMENT": "test",
        "LLM_API_JWT_SECRET": "test-secret-" + "x" * 40,
        "LLM_API_DATA_DIR": str(data_dir),
        **extra,
    }


def cli_create_user(data_dir: Path, email: str, *, admin: bool = False) -> None:
    flags = ["--admin"] if admin else []
    subprocess.run(
        [sys.executable, "-m", "llm_api.cli", "users", "create", email, *flags, "--password-stdin"],
        env=live_env(data_dir),
        input=PASSWORD.encode() + b"\n",
        check=True,
        capture_output=True,
    )


async def login(http: httpx.AsyncClient, email: str) -> dict[str, Any]:
    response = await http.post("/v1/auth/token", data={"username": email, "password": PASSWORD})
    assert response.status_code == 200, response.text
    tokens: dict[str, Any] = response.json()
    return tokens
