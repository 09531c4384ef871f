"""Shared fixtures. The real SmolLM2 model is loaded once per test session; tests talk to the
app over HTTP with the official openai SDK, either in-process (ASGI transport) or against a real
uvicorn server on loopback when they need real sockets (disconnects, signals)."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import httpx
import openai
import pytest
from asgi_lifespan import LifespanManager

from llm_api.core.config import Settings
from llm_api.main import create_app
from llm_api.services.auth import api_keys, scopes
from llm_api.services.llm.registry import DEFAULT_MODEL_ID, builtin_registry

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
        # Shared fixtures run many requests as one account; tests/rate_limit turns limits on.
        "rate_limit_enabled": False,
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def session_tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("llm-api")


@dataclass(frozen=True)
class Account:
    """A user made through the real services, with one API key."""

    user_id: str
    email: str
    password: str
    api_key: str
    key_id: str
    role: str = "user"
    tier: str = "free"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}


async def create_account(
    app: Any,
    email: str | None = None,
    *,
    role: Literal["user", "admin"] = "user",
    tier: Literal["free", "paid"] = "free",
    password: str | None = None,
) -> Account:
    """Create a user and an API key in the app's database (argon2 hashing: ~20 ms)."""
    state = app.state.llm_api
    email = email or f"user-{uuid.uuid4().hex[:12]}@example.com"
    password = password or "pw-" + uuid.uuid4().hex
    async with state.db.sessions.begin() as db:
        user = await state.auth.users.create(db, email, password, role=role, tier=tier)
        # Every scope the role allows, so account tests can use the key; scope tests make
        # their own narrower keys (tests/auth/test_scopes.py).
        key, raw = await api_keys.create_key(db, user.id, "test", scopes.allowed_for(role))
    return Account(user.id, user.email, password, raw, key.id, role, tier)


@contextlib.asynccontextmanager
async def running_app(settings: Settings) -> AsyncIterator[Any]:
    """An app with its lifespan running and its models loaded."""
    application = create_app(settings)
    async with LifespanManager(application, startup_timeout=120, shutdown_timeout=60):
        state = application.state.llm_api
        for _ in range(600):
            if state.llm.ready:
                break
            await _sleep(0.1)
        assert state.llm.ready, "model did not load"
        yield application


@pytest.fixture(scope="session")
async def app(session_tmp: Path) -> AsyncIterator[Any]:
    """One app with the real model for the whole session (loading it takes ~1 s). Auth is on:
    `app.state.test_account` holds the user and API key that `http` and `client` send."""
    async with running_app(test_settings(session_tmp)) as application:
        application.state.test_account = await create_account(application, "test-user@example.com")
        yield application


@pytest.fixture(scope="session")
def account(app: Any) -> Account:
    """The user whose key `http` and `client` send (free tier, role user)."""
    acct: Account = app.state.test_account
    return acct


@pytest.fixture(scope="session")
async def second_account(app: Any) -> Account:
    """Another free user, for cross-user (BOLA) checks."""
    return await create_account(app, "second-user@example.com")


@pytest.fixture(scope="session")
async def admin_account(app: Any) -> Account:
    return await create_account(app, "admin@example.com", role="admin")


@pytest.fixture(scope="session")
async def paid_account(app: Any) -> Account:
    return await create_account(app, "paid-user@example.com", tier="paid")


@contextlib.asynccontextmanager
async def postgres_database() -> AsyncIterator[str]:
    """A fresh PostgreSQL database (llmapi_test_<random>) on 127.0.0.1:5432, dropped after;
    yields its SQLAlchemy URL. Call require_service("PostgreSQL", ...) first."""
    import asyncpg

    name = f"llmapi_test_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(host="127.0.0.1", port=5432, user="postgres", database="postgres")
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    try:
        yield f"postgresql+asyncpg://postgres@127.0.0.1:5432/{name}"
    finally:
        admin = await asyncpg.connect(
            host="127.0.0.1", port=5432, user="postgres", database="postgres"
        )
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


@pytest.fixture(scope="session")
async def pg_url() -> AsyncIterator[str]:
    """A fresh PostgreSQL database for this test session (skipped locally without PostgreSQL,
    a failure in CI)."""
    require_service("PostgreSQL", "127.0.0.1", 5432)
    async with postgres_database() as url:
        yield url


@pytest.fixture(scope="session")
async def pg_app(session_tmp: Path, pg_url: str) -> AsyncIterator[Any]:
    """The same app on PostgreSQL (migrated at start), with `app.state.test_account`."""
    settings = test_settings(session_tmp / "pg", database_url=pg_url, db_auto_migrate=True)
    async with running_app(settings) as application:
        application.state.test_account = await create_account(application, "pg-user@example.com")
        yield application


async def _sleep(seconds: float) -> None:
    import asyncio

    await asyncio.sleep(seconds)


@pytest.fixture(scope="session")
async def http(app: Any, account: Account) -> AsyncIterator[httpx.AsyncClient]:
    """httpx over ASGI, sending the test account's API key."""
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(
        transport=transport, base_url="http://testserver", headers=account.headers
    ) as client:
        yield client


@pytest.fixture(scope="session")
async def client(http: httpx.AsyncClient, account: Account) -> AsyncIterator[openai.AsyncOpenAI]:
    """The official openai SDK, talking to the in-process app with the test account's key."""
    yield openai.AsyncOpenAI(
        base_url="http://testserver/v1", api_key=account.api_key, http_client=http, max_retries=0
    )


class LiveServer:
    def __init__(self, proc: subprocess.Popen[bytes], port: int, log: Path) -> None:
        self.proc, self.port, self.log = proc, port, log
        self.base_url = f"http://127.0.0.1:{port}"
        # Made with the CLI before start (`llm-api users create` + `keys create`).
        self.api_key = ""

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def cli_api_key(env: dict[str, str], email: str, tier: str = "free") -> str:
    """Create (if needed) a user and a new API key with the real CLI; returns the key."""
    cli = [sys.executable, "-m", "llm_api.cli"]
    if env.get("LLM_API_DATABASE_URL"):
        subprocess.run([*cli, "db", "upgrade"], env=env, check=True, capture_output=True)
    subprocess.run(  # exits 1 when the user exists already (a reused data dir): fine
        [*cli, "users", "create", email, "--tier", tier, "--password-stdin"],
        env=env,
        input=b"pw-" + uuid.uuid4().hex.encode() + b"\n",
        capture_output=True,
    )
    out = subprocess.run(
        [*cli, "keys", "create", email], env=env, check=True, capture_output=True, text=True
    )
    return out.stdout.strip().splitlines()[-1]


def start_live_server(
    tmp: Path,
    env: dict[str, str] | None = None,
    args: list[str] | None = None,
    port: int | None = None,
) -> LiveServer:
    """`llm-api serve` in a subprocess on a free port (or `port`, for settings that must name
    it in advance); waits for /ready."""
    tmp.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    log = tmp / f"server-{port}.log"
    full_env = {
        **os.environ,
        "LLM_API_ENVIRONMENT": "test",
        "LLM_API_JWT_SECRET": "test-secret-" + "x" * 40,
        "LLM_API_DATA_DIR": str(tmp),
        "LLM_API_PORT": str(port),
        "LLM_API_RATE_LIMIT_ENABLED": "false",  # tests/rate_limit passes "true"
        **(env or {}),
    }
    api_key = ""
    if full_env.get("LLM_API_AUTH_ENABLED", "true").lower() not in ("0", "false", "no"):
        api_key = cli_api_key(full_env, "live-user@example.com")
    proc = subprocess.Popen(
        [sys.executable, "-m", "llm_api.cli", "serve", *(args or [])],
        env=full_env,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    server = LiveServer(proc, port, log)
    server.api_key = api_key
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


async def eventually(condition: Any, timeout: float = 15.0) -> None:
    """Wait until a condition (a plain or async predicate) holds, instead of a fixed sleep, so
    a loaded CI machine only makes a test slower, never wrong."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return
        assert time.monotonic() < deadline, "condition never held"
        await asyncio.sleep(0.01)


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """llama-cpp-python's own OpenAI-compatible server (`python -m llama_cpp.server`) on the
    built-in GGUF, on loopback: a real upstream for the `openai` backend and the router. Yields
    its /v1 base URL."""
    port = free_port()
    log = tmp_path_factory.mktemp("llama-server") / "server.log"
    gguf = builtin_registry().models[0].gguf_path()
    args = ["--model", str(gguf), "--host", "127.0.0.1", "--port", str(port)]
    args += ["--n_ctx", "2048", "--n_threads", "2", "--verbose", "false"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "llama_cpp.server", *args],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"llama_cpp.server exited: {log.read_text()[-2000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{base}/models", timeout=1).status_code == 200:
                    break
            time.sleep(0.3)
        else:
            pytest.fail("llama_cpp.server did not start")
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
