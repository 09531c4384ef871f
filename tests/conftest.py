"""Shared fixtures. The real SmolLM2 model is loaded once per test session; tests talk to the
app over HTTP with the official openai SDK, either in-process (ASGI transport) or against a real
uvicorn server on loopback when they need real sockets (disconnects, signals)."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import openai
import pytest
from asgi_lifespan import LifespanManager

from llm_api.core.config import Settings
from llm_api.main import create_app
from llm_api.services.llm.registry import DEFAULT_MODEL_ID

MODEL = DEFAULT_MODEL_ID
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def service_up(host: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
        return True
    return False


def require_service(name: str, host: str, port: int) -> None:
    """Skip locally when a service is absent; in CI its absence is a failure."""
    if service_up(host, port):
        return
    if IN_CI:
        pytest.fail(f"{name} at {host}:{port} is required in CI but is not reachable")
    pytest.skip(f"{name} at {host}:{port} is not running")


def test_settings(tmp_path: Path, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "environment": "test",
        "jwt_secret": "test-secret-" + "x" * 40,
        "data_dir": tmp_path,
        "log_level": "WARNING",
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def session_tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("llm-api")


@pytest.fixture(scope="session")
async def app(session_tmp: Path) -> AsyncIterator[object]:
    """One app with the real model for the whole session (loading it takes ~1 s)."""
    application = create_app(test_settings(session_tmp))
    async with LifespanManager(application, startup_timeout=120, shutdown_timeout=60):
        state = application.state.llm_api
        for _ in range(600):
            if state.llm.ready:
                break
            await _sleep(0.1)
        assert state.llm.ready, "model did not load"
        yield application


async def _sleep(seconds: float) -> None:
    import asyncio

    await asyncio.sleep(seconds)


@pytest.fixture(scope="session")
async def http(app: object) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)  # type: ignore[arg-type]
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        yield client


@pytest.fixture(scope="session")
async def client(http: httpx.AsyncClient) -> AsyncIterator[openai.AsyncOpenAI]:
    """The official openai SDK, talking to the in-process app."""
    yield openai.AsyncOpenAI(
        base_url="http://testserver/v1", api_key="unused", http_client=http, max_retries=0
    )


class LiveServer:
    def __init__(self, proc: subprocess.Popen[bytes], port: int, log: Path) -> None:
        self.proc, self.port, self.log = proc, port, log
        self.base_url = f"http://127.0.0.1:{port}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def start_live_server(
    tmp: Path, env: dict[str, str] | None = None, args: list[str] | None = None
) -> LiveServer:
    """`llm-api serve` in a subprocess on a free port; waits for /ready."""
    tmp.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log = tmp / f"server-{port}.log"
    full_env = {
        **os.environ,
        "LLM_API_ENVIRONMENT": "test",
        "LLM_API_JWT_SECRET": "test-secret-" + "x" * 40,
        "LLM_API_DATA_DIR": str(tmp),
        "LLM_API_PORT": str(port),
        **(env or {}),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "llm_api.cli", "serve", *(args or [])],
        env=full_env,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    server = LiveServer(proc, port, log)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {log.read_text()[-2000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{server.base_url}/ready", timeout=1).status_code == 200:
                return server
        time.sleep(0.2)
    server.stop()
    raise RuntimeError(f"server not ready: {log.read_text()[-2000:]}")


@pytest.fixture(scope="session")
def live_server(session_tmp: Path) -> Iterator[LiveServer]:
    server = start_live_server(session_tmp / "live")
    yield server
    server.stop()
