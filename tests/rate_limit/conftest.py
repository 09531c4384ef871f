"""Fixtures for the rate-limit tests: stores on the real Redis (unique key prefix per test,
deleted after) and in memory, and a way to switch limits on for the shared app."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from llm_api.core.rate_limits import TierLimits
from llm_api.services.rate_limit.limiter import RateLimiter, build_rate_limiter
from llm_api.services.rate_limit.memory_store import MemoryStore
from llm_api.services.rate_limit.redis_store import RedisStore
from llm_api.services.rate_limit.types import Store
from llm_api.services.redis_pool import SharedRedis, build_redis
from tests.conftest import free_port, require_service, test_settings
from tests.pipeline_support import limiter_swapped

REDIS_URL = "redis://127.0.0.1:6379/0"


def unique_prefix() -> str:
    return f"llm-api-test:{uuid.uuid4().hex[:10]}"


async def delete_prefix(prefix: str, url: str = REDIS_URL) -> None:
    client = Redis.from_url(url)
    try:
        keys = [k async for k in client.scan_iter(match=f"{{{prefix}}}:*", count=1000)]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


async def keys_without_ttl(prefix: str, url: str = REDIS_URL) -> list[bytes]:
    client = Redis.from_url(url)
    try:
        return [
            k
            async for k in client.scan_iter(match=f"{{{prefix}}}:*", count=1000)
            if await client.pttl(k) < 0
        ]
    finally:
        await client.aclose()


@contextlib.asynccontextmanager
async def redis_store_ctx() -> AsyncIterator[RedisStore]:
    require_service("Redis", "127.0.0.1", 6379)
    prefix = unique_prefix()
    # A roomier timeout than production's 100 ms: the shared 2-core test machine stalls.
    store = RedisStore(build_redis(REDIS_URL, 0.5), prefix, 0.5)
    try:
        yield store
        assert await keys_without_ttl(prefix) == []  # no key ever lives without a TTL
    finally:
        await store.aclose()
        await store.redis.aclose()
        await delete_prefix(prefix)


@pytest.fixture
async def redis_store() -> AsyncIterator[RedisStore]:
    async with redis_store_ctx() as store:
        yield store


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[Store]:
    if request.param == "memory":
        yield MemoryStore()
        return
    async with redis_store_ctx() as redis_store:
        yield redis_store


@contextlib.asynccontextmanager
async def limits_on(
    app: Any,
    tmp: Path,
    backend: str = "memory",
    tiers: dict[str, dict[str, int | None]] | None = None,
    minute_ms: int = 600_000,
    **overrides: Any,
) -> AsyncIterator[RateLimiter]:
    """Swap an enabled limiter into the shared app's LLM service for one test. The "minute"
    windows last `minute_ms` (10 min by default) so that a loaded test machine, where a request
    may take many seconds, cannot let a window roll over in the middle of a test."""
    values: dict[str, Any] = {
        "rate_limit_enabled": True,
        "rate_limit_tiers": {k: TierLimits(**v) for k, v in (tiers or {}).items()},
        **overrides,
    }
    prefix = values.setdefault("rate_limit_key_prefix", unique_prefix())
    if backend == "redis":
        require_service("Redis", "127.0.0.1", 6379)
        values.setdefault("redis_url", REDIS_URL)
    settings = test_settings(tmp, **values)
    redis = SharedRedis.from_settings(settings)
    limiter = build_rate_limiter(settings, redis)
    limiter.policy.minute_ms = minute_ms
    await limiter.start()
    try:
        with limiter_swapped(app, limiter):
            yield limiter
    finally:
        await limiter.aclose()
        if redis is not None:
            await redis.aclose()
        if backend == "redis":
            await delete_prefix(prefix, values["redis_url"])


class RedisServer:
    """A private redis-server on a free port, for outage tests (the shared one on 6379 is never
    stopped). `stop()` and `start()` use the same command line."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            out = subprocess.run(
                ["redis-cli", "-p", str(self.port), "ping"], capture_output=True, text=True
            )
            if out.stdout.strip() == "PONG":
                return
            time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            subprocess.run(["redis-cli", "-p", str(self.port), "shutdown", "nosave"], check=False)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def private_redis() -> Iterator[RedisServer]:
    server = RedisServer()
    server.start()
    yield server
    server.stop()


class NetworkCut:
    """A TCP proxy in front of a Redis, standing in for the network between us and it. `cut()`
    partitions it: nothing is forwarded in either direction, connections stay open and new ones
    are accepted but answered by nothing. What is sent meanwhile is lost (`hold=False`: TCP gave
    up) or delivered when the network heals (`hold=True`: TCP's retransmissions get through).
    `heal()` forwards again. Runs on the test's event loop."""

    def __init__(self, target_port: int, hold: bool = False) -> None:
        self.target_port = target_port
        self.hold = hold
        self.port = 0
        self.cut_off = False
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._held: list[tuple[asyncio.StreamWriter, bytearray]] = []

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def __aenter__(self) -> NetworkCut:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def cut(self) -> None:
        self.cut_off = True

    def heal(self) -> None:
        self.cut_off = False
        for dst, held in self._held:
            if held and not dst.is_closing():
                dst.write(bytes(held))
            held.clear()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            held = bytearray()
            self._held.append((dst, held))
            task = asyncio.create_task(self._pump(src, dst, held))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pump(
        self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, held: bytearray
    ) -> None:
        try:
            while data := await src.read(65536):
                if self.cut_off:
                    if self.hold:
                        held += data
                    continue
                dst.write(data)
                await dst.drain()
            while self.cut_off and self.hold:  # the sender closed: deliver, then close
                await asyncio.sleep(0.01)
        except OSError:
            pass
        finally:
            dst.close()
