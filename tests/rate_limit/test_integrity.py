"""The limiter's integrity under hostile input and faults, on the real Redis: absurd upstream
usage, clients rotating IPv6 addresses, a stalled event loop, and a network partition."""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import orjson
from aiohttp import web
from redis.asyncio import Redis

from llm_api.services.rate_limit.types import LimitSpec
from tests.conftest import eventually, free_port, require_service
from tests.core_apps import registry_app
from tests.rate_limit.conftest import (
    REDIS_URL,
    delete_prefix,
    unique_prefix,
)

UNLIMITED: dict[str, int | None] = {
    "requests_per_minute": None,
    "tokens_per_minute": None,
    "concurrent_requests": None,
    "tokens_per_day": None,
}


def rpm(limit: int, subject: str, period_ms: int = 60_000) -> LimitSpec:
    return LimitSpec("rpm", "requests per minute (RPM)", "user", subject, "window", "requests",
                     limit, period_ms)  # fmt: skip


def rid() -> str:
    return uuid.uuid4().hex


# --- upstream usage ---------------------------------------------------------------------------


@asynccontextmanager
async def absurd_upstream() -> AsyncIterator[str]:
    """An OpenAI-compatible upstream that answers one word and reports usage of 2e15 and 3e15
    tokens (a buggy or hostile provider)."""

    async def chat(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        events = [
            {"choices": [{"index": 0, "delta": {"content": "Hi"}, "finish_reason": None}]},
            {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
            {
                "choices": [],
                "usage": {"prompt_tokens": 2 * 10**15, "completion_tokens": 3 * 10**15},
            },
        ]
        for event in events:
            await resp.write(b"data: " + orjson.dumps(event) + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        return resp

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    runner = web.AppRunner(app, shutdown_timeout=0.5)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        await runner.cleanup()


async def test_absurd_upstream_usage_cannot_poison_the_shared_limiter(tmp_path: Path) -> None:
    """Usage is bounded by what the request could produce before it is charged, and the Redis
    scripts keep counts exact: the caller stays under the shared limits and no one else falls
    back to degraded mode."""
    require_service("Redis", "127.0.0.1", 6379)
    prefix = unique_prefix()
    limit = 100_000
    tiers = {"paid": {**UNLIMITED, "tokens_per_minute": limit}, "ip": UNLIMITED}
    body = {"model": "absurd", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
    try:
        async with (
            absurd_upstream() as url,
            registry_app(
                tmp_path,
                [{"id": "absurd", "backend": "openai", "base_url": url}],
                rate_limit_enabled=True,
                redis_url=REDIS_URL,
                rate_limit_key_prefix=prefix,
                rate_limit_tiers=tiers,
            ) as (app, http, _),
        ):
            limiter = app.state.llm_api.rate_limiter
            first = await http.post("/v1/chat/completions", json=body)
            assert first.status_code == 200, first.text
            usage = first.json()["usage"]
            assert usage["completion_tokens"] == 5  # at most max_tokens
            assert 0 < usage["prompt_tokens"] <= len(orjson.dumps(body)) + 100  # the bytes sent
            await eventually(lambda: limiter.in_flight == 0 and not limiter._tasks)
            for _ in range(3):
                r = await http.post("/v1/chat/completions", json=body)
                assert r.status_code == 200, r.text
            # Admitted by Redis itself: nothing degraded, and the count is the bounded one.
            assert not limiter._degraded and not limiter.store.down
            remaining = int(r.headers["x-ratelimit-remaining-tokens"])
            assert limit - 4 * (usage["total_tokens"] + 50) < remaining < limit
            redis = Redis.from_url(REDIS_URL)
            try:
                members = await redis.zrange(f"{{{prefix}}}:client:127.0.0.1:tpm:z", 0, -1)
            finally:
                await redis.aclose()
            assert len(members) == 4
            assert all(re.fullmatch(rb"[^:]+:\d+", m) for m in members), members
    finally:
        await delete_prefix(prefix)
