"""Fixtures for the observability, drain and deployment tests: an app with JSON logs captured in
memory and a metrics token. In-process apps run with auth on (a real user's API key); live
servers started here run with auth off on loopback, since they are about signals and processes."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager
from fastapi import FastAPI

from llm_api.main import create_app
from tests.conftest import Account, create_account, free_port, test_settings

METRICS_TOKEN = "metrics-token-" + "m" * 24
OPS_ENV = {  # for live servers started by these tests
    "LLM_API_AUTH_ENABLED": "false",
    "LLM_API_METRICS_TOKEN": METRICS_TOKEN,
    "LLM_API_LOG_JSON": "true",
    "LLM_API_LOG_LEVEL": "INFO",
}


class LogCapture:
    """Lines exactly as the configured formatter renders them (redaction included)."""

    def __init__(self) -> None:
        self.stream = io.StringIO()
        root = logging.getLogger()
        self.handler = logging.StreamHandler(self.stream)
        self.handler.setFormatter(root.handlers[0].formatter)
        root.addHandler(self.handler)

    def text(self) -> str:
        return self.stream.getvalue()

    def records(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.text().splitlines() if line.startswith("{")]

    def access(self) -> list[dict[str, Any]]:
        return [r for r in self.records() if r.get("logger") == "llm_api.access"]

    def close(self) -> None:
        logging.getLogger().removeHandler(self.handler)


def ops_app(tmp: Path, **overrides: object) -> FastAPI:
    settings = test_settings(
        tmp,
        log_json=True,
        log_level="INFO",
        metrics_token=METRICS_TOKEN,
        **overrides,
    )
    return create_app(settings)


async def wait_ready(app: FastAPI) -> None:
    state = app.state.llm_api
    for _ in range(1200):
        if state.llm.ready:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("model did not load")


@pytest.fixture(scope="module")
def ops_tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ops")


@pytest.fixture(scope="module")
async def ops(ops_tmp: Path) -> AsyncIterator[tuple[FastAPI, LogCapture]]:
    app = ops_app(ops_tmp)
    logs = LogCapture()
    async with LifespanManager(app, startup_timeout=120, shutdown_timeout=60):
        await wait_ready(app)
        app.state.ops_user = await create_account(app)
        app.state.ops_admin = await create_account(app, role="admin")
        yield app, logs
    logs.close()


@pytest.fixture(scope="module")
def ops_user(ops: tuple[FastAPI, LogCapture]) -> Account:
    user: Account = ops[0].state.ops_user
    return user


@pytest.fixture(scope="module")
def ops_admin(ops: tuple[FastAPI, LogCapture]) -> Account:
    admin: Account = ops[0].state.ops_admin
    return admin


@pytest.fixture(scope="module")
async def ops_http(
    ops: tuple[FastAPI, LogCapture], ops_user: Account
) -> AsyncIterator[httpx.AsyncClient]:
    """Sends the user's API key on every request."""
    transport = httpx.ASGITransport(app=ops[0])
    async with httpx.AsyncClient(
        transport=transport, base_url="http://127.0.0.1", timeout=120, headers=ops_user.headers
    ) as client:
        yield client


@pytest.fixture
def logs(ops: tuple[FastAPI, LogCapture]) -> Iterator[LogCapture]:
    capture = ops[1]
    capture.stream.seek(0)
    capture.stream.truncate()
    yield capture


class Spawned:
    """`llm-api serve` (uvicorn) in a subprocess, not waited for: tests watch it start."""

    def __init__(self, tmp: Path, env: dict[str, str] | None = None) -> None:
        tmp.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = tmp / f"server-{self.port}.log"
        full_env = {
            **os.environ,
            "LLM_API_ENVIRONMENT": "test",
            "LLM_API_JWT_SECRET": "test-secret-" + "x" * 40,
            "LLM_API_DATA_DIR": str(tmp),
            "LLM_API_PORT": str(self.port),
            "LLM_API_RATE_LIMIT_ENABLED": "false",
            **OPS_ENV,
            **(env or {}),
        }
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "llm_api.cli", "serve"],
            env=full_env,
            stdout=self.log_path.open("wb"),
            stderr=subprocess.STDOUT,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def json_log(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log().splitlines():
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    out.append(json.loads(line))
        return out

    def wait_ready(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.log()[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.base_url}/ready", timeout=2).status_code == 200:
                    return
            time.sleep(0.1)
        raise RuntimeError(f"server not ready: {self.log()[-3000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)
