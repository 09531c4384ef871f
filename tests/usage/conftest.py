"""Fixtures for the response cache and usage-record tests (issue 5): apps with their own data
dir, users with API keys, a fresh PostgreSQL database per test, a private redis-server, and a
TCP proxy that can cut a service off (without touching the shared PostgreSQL or Redis)."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from asgi_lifespan import LifespanManager
from fastapi import FastAPI
from sqlalchemy import func, select

from llm_api.db.tables import UsageRecord
from llm_api.main import create_app
from llm_api.services.auth import api_keys
from llm_api.services.auth.scopes import allowed_for
from tests.conftest import MODEL, free_port, require_service, service_up, test_settings

PG_HOST, PG_PORT = "127.0.0.1", 5432
REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379


def nonce() -> str:
    """A unique id for prompts and request ids that must not meet another test's or run's.
    Tests that expect a cache hit use fixed prompts instead: the cache key holds the tenant
    (a fresh user per test), and a fixed prompt has one greedy answer that ends on a stop
    sequence every run, where a random hex nonce sometimes sent the model into a loop that
    ran out of tokens (a different answer than the one the test expected)."""
    return uuid.uuid4().hex[:12]


@dataclass
class Running:
    app: FastAPI
    http: httpx.AsyncClient

    @property
    def state(self) -> Any:
        return self.app.state.llm_api

    def client(self, key: str = "unused", **headers: str) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(
            base_url="http://127.0.0.1/v1",
            api_key=key,
            http_client=self.http,
            max_retries=0,
            default_headers=headers or None,
        )

    async def user(self, role: str = "user") -> tuple[str, str]:
        """A new user and one of its API keys: (user id, raw key)."""
        auth = self.state.auth
        async with self.state.db.sessions.begin() as session:
            user = await auth.users.create(
                session, f"u-{nonce()}@example.com", "password-" + "x" * 12, role=role
            )
            _, raw = await api_keys.create_key(session, user.id, "test", allowed_for(role))
            return user.id, raw

    async def flush(self) -> None:
        assert await self.state.usage.flusher.flush_once(), "flush failed"

    async def records(self, **where: Any) -> list[UsageRecord]:
        async with self.state.db.sessions() as session:
            query = select(UsageRecord).filter_by(**where).order_by(UsageRecord.created_at)
            return list(await session.scalars(query))

    async def record_count(self) -> int:
        async with self.state.db.sessions() as session:
            return int(await session.scalar(select(func.count()).select_from(UsageRecord)) or 0)


@contextlib.asynccontextmanager
async def running_app(tmp: Path, **overrides: Any) -> AsyncIterator[Running]:
    # One llama.cpp thread: the test machine's two cores are shared with other suites.
    values: dict[str, Any] = {"usage_flush_interval_seconds": 0.2, "llama_threads": 1}
    values.update(overrides)
    app = create_app(test_settings(tmp, **values))
    async with LifespanManager(app, startup_timeout=120, shutdown_timeout=60):
        state = app.state.llm_api
        for _ in range(1200):
            if state.llm.ready:
                break
            await asyncio.sleep(0.05)
        assert state.llm.ready, "model did not load"
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as http:
            yield Running(app, http)


# The model stops at the first space or newline: answers are a word or two, end with
# finish_reason "stop" and cost a few decode steps.
SHORT = [" ", "\n"]
# Room to end on a SHORT stop sequence: a 16-token budget was sometimes spent on an echoed
# nonce, so the answer (a `length` one) differed from the one the test expected.
ROOM = 64


def chat_body(prompt: str, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": MODEL,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": ROOM,
        "temperature": 0,
        "stop": SHORT,
    }
    body.update(extra)
    return body


# --- Redis --------------------------------------------------------------------------------------


@pytest.fixture
def shared_redis_url() -> str:
    require_service("Redis", REDIS_HOST, REDIS_PORT)
    return f"redis://{REDIS_HOST}:{REDIS_PORT}/0"


class RedisServer:
    """A private redis-server on a free port: outage tests stop this one, never the shared one."""

    def __init__(self, tmp: Path) -> None:
        self.port = free_port()
        self.tmp = tmp
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.skip("redis-server is not installed")
        self.proc = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.tmp),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while not service_up("127.0.0.1", self.port):
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()


# --- a TCP proxy that can be cut ----------------------------------------------------------------


class TcpProxy:
    """Forwards 127.0.0.1:<port> to a target. `close()` refuses new connections and resets open
    ones (the service looks down); `open()` listens again on the same port. `delay` adds latency
    to every forwarded read (a slow service)."""

    def __init__(self, target_port: int, delay: float = 0.0) -> None:
        self.port = free_port()
        self.target_port = target_port
        self.delay = delay
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.StreamWriter] = set()
        self.accepted = 0

    async def open(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for writer in list(self._conns):
            writer.transport.abort()
        self._conns.clear()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.transport.abort()
            return
        self._conns.update((writer, up_writer))

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    if self.delay:
                        await asyncio.sleep(self.delay)
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.transport.abort()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self._conns.difference_update((writer, up_writer))
