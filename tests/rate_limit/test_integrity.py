"""The limiter's integrity under hostile input and faults, on the real Redis: absurd upstream
usage, clients rotating IPv6 addresses, a stalled event loop, and a network partition."""

from __future__ import annotations

import asyncio
import re
import signal
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from aiohttp import web
from redis.asyncio import Redis

from llm_api.services.rate_limit.memory_store import MemoryStore, StoreFull
from llm_api.services.rate_limit.policy import ip_subject
from llm_api.services.rate_limit.redis_store import RedisStore, StoreUnavailable
from llm_api.services.rate_limit.types import LimitSpec
from llm_api.services.redis_pool import build_redis
from tests.conftest import MODEL, create_account, eventually, free_port, require_service
from tests.core_apps import registry_app
from tests.rate_limit.conftest import (
    REDIS_URL,
    NetworkCut,
    RedisServer,
    delete_prefix,
    limits_on,
    unique_prefix,
)

CHAT = "/v1/chat/completions"
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
    # The keyless loopback caller of these apps is on the `anonymous` tier.
    tiers = {"anonymous": {**UNLIMITED, "tokens_per_minute": limit}, "ip": UNLIMITED}
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


# --- memory bound and IPv6 --------------------------------------------------------------------


async def test_memory_store_never_drops_a_live_count() -> None:
    """Full of live counts, the store refuses a new subject (503) instead of dropping one, which
    would hand that subject a fresh quota; expired keys make room again, oldest first."""
    store = MemoryStore(max_keys=50)
    assert (await store.admit(rid(), [rpm(1, "victim")])).allowed
    for i in range(24):  # live for a minute
        assert (await store.admit(rid(), [rpm(1, f"long{i}")])).allowed
    for i in range(25):  # live for 300 ms
        assert (await store.admit(rid(), [rpm(1, f"short{i}", 300)])).allowed
    for i in range(200):  # rotating addresses: every new subject is refused, none admitted
        with pytest.raises(StoreFull) as full:
            await store.admit(rid(), [rpm(1, f"rotating{i}")])
        assert 1000 <= full.value.retry_ms <= 60_000
    assert not (await store.admit(rid(), [rpm(1, "victim")])).allowed  # its count is intact
    assert store.keys == 50

    async def room() -> bool:
        try:
            return (await store.admit(rid(), [rpm(1, "new")])).allowed
        except StoreFull:
            return False

    await eventually(room)  # once the short-lived keys expired
    assert not (await store.admit(rid(), [rpm(1, "victim")])).allowed
    assert store.keys <= 50


async def test_full_memory_store_is_a_503_through_the_app(
    app: Any, http: httpx.AsyncClient, tmp_path: Path
) -> None:
    async with limits_on(app, tmp_path, tiers={"free": {"requests_per_minute": 100}}) as limiter:
        assert isinstance(limiter.store, MemoryStore)
        limiter.store.max_keys = limiter.store.keys  # full of other clients' live counts
        acct = await create_account(app)
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
        r = await http.post("/v1/chat/completions", json=body, headers=acct.headers)
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "service_unavailable"
        assert 1 <= int(r.headers["retry-after"]) <= 60


@pytest.mark.parametrize(
    ("address", "subject"),
    [
        ("2001:db8:1:2:aaaa:bbbb:cccc:dddd", "2001:db8:1:2::/64"),
        ("2001:db8:1:2::1", "2001:db8:1:2::/64"),
        ("2001:db8:1:3::1", "2001:db8:1:3::/64"),
        ("::ffff:192.0.2.7", "192.0.2.7"),
        ("192.0.2.7", "192.0.2.7"),
        ("testclient", "testclient"),
    ],
)
def test_ipv6_clients_count_by_their_64(address: str, subject: str) -> None:
    assert ip_subject(address) == subject


async def test_rotating_ipv6_addresses_share_one_quota(app: Any, tmp_path: Path) -> None:
    """Four addresses of one /64 (any host can use 2**64 of them) are one client for the per-IP
    limits; another /64 is another client."""
    tiers = {"free": {"requests_per_minute": 100}, "ip": {"requests_per_minute": 3}}
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}

    async def post_from(address: str, headers: dict[str, str]) -> int:
        transport = httpx.ASGITransport(app=app, client=(address, 40000))
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as h:
            r = await h.post("/v1/chat/completions", json=body, headers=headers)
            return r.status_code

    async with limits_on(app, tmp_path, tiers=tiers):
        acct = await create_account(app)
        codes = [await post_from(f"2001:db8:5:6::{i:x}", acct.headers) for i in range(1, 5)]
        assert codes == [200, 200, 200, 429]
        assert await post_from("2001:db8:5:7::1", acct.headers) == 200


# --- a stalled event loop ---------------------------------------------------------------------


@asynccontextmanager
async def fast_store(url: str = REDIS_URL) -> AsyncIterator[RedisStore]:
    """A store with production's 100 ms timeout."""
    prefix = unique_prefix()
    store = RedisStore(build_redis(url, 0.1), prefix, 0.1)
    try:
        yield store
    finally:
        await store.aclose()
        await store.redis.aclose()
        await delete_prefix(prefix, url)


async def test_a_stalled_loop_is_not_a_slow_redis() -> None:
    """A burst whose replies arrive while the event loop is stalled (standing in for a process
    starved of CPU: the loop does not run for 600 ms) is answered from Redis; Redis is not
    declared down."""
    require_service("Redis", "127.0.0.1", 6379)
    async with fast_store() as store:
        assert (await store.admit(rid(), [rpm(1000, "warm")])).allowed  # connected
        burst = [asyncio.create_task(store.admit(rid(), [rpm(1000, "s")])) for _ in range(50)]
        await asyncio.sleep(0)  # every call has started and sent (or queued for a connection)
        time.sleep(0.6)  # the loop stalls past every call's 200 ms budget
        results = await asyncio.gather(*burst, return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        assert failed == [], failed[:3]
        assert not store.down
        assert (await store.admit(rid(), [rpm(1000, "s")])).states[0].remaining == 1000 - 51


async def test_a_slow_redis_is_still_declared_down(private_redis: RedisServer) -> None:
    """The loop runs freely while Redis does not answer (its process is stopped): three
    timeouts in a row mark it down."""
    async with fast_store(private_redis.url) as store:
        assert (await store.admit(rid(), [rpm(10, "s")])).allowed
        assert private_redis.proc is not None
        private_redis.proc.send_signal(signal.SIGSTOP)
        try:
            for _ in range(3):
                with pytest.raises(StoreUnavailable):
                    await store.admit(rid(), [rpm(10, "s")])
            assert store.down
        finally:
            private_redis.proc.send_signal(signal.SIGCONT)


# --- a network partition ----------------------------------------------------------------------


async def live_leases(url: str, prefix: str, user_id: str) -> int:
    """The user's concurrency leases held in Redis, read past the cut network."""
    client = Redis.from_url(url)
    try:
        t = await client.time()
        key = f"{{{prefix}}}:user:{user_id}:concurrency:z"
        return int(await client.zcount(key, t[0] * 1000 + t[1] // 1000, "+inf"))
    finally:
        await client.aclose()


async def test_releases_that_fail_in_a_partition_are_settled_after_it(
    app: Any, http: httpx.AsyncClient, tmp_path: Path, private_redis: RedisServer
) -> None:
    """Two requests hold the user's 2 slots; they end while the network to Redis is cut, so
    their releases fail. Once it heals the releases go through: the slots come back at once,
    not when the 60 s leases lapse."""
    prefix = unique_prefix()
    tiers = {"free": {**UNLIMITED, "concurrent_requests": 2}, "ip": UNLIMITED}
    async with (
        NetworkCut(private_redis.port) as net,
        limits_on(
            app, tmp_path, "redis", tiers=tiers, redis_url=net.url, rate_limit_key_prefix=prefix
        ) as limiter,
    ):
        acct = await create_account(app)
        counting = {"model": MODEL, "prompt": "1, 2, 3, 4, 5, 6, 7, 8,", "max_tokens": 1500}
        long = [
            asyncio.create_task(http.post("/v1/completions", json=counting, headers=acct.headers))
            for _ in range(2)
        ]

        async def held() -> int:
            return await live_leases(private_redis.url, prefix, acct.user_id)

        await eventually(lambda: _equals(held(), 2))
        net.cut()
        for task in long:  # the clients go away during the partition
            task.cancel()
        await asyncio.gather(*long, return_exceptions=True)
        await eventually(lambda: limiter.in_flight == 0 and not limiter._tasks)
        assert await held() == 2  # the releases did not get through
        net.heal()
        await eventually(lambda: _equals(held(), 0), timeout=10)  # the leases last 60 s
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
        r = await http.post("/v1/chat/completions", json=body, headers=acct.headers)
        assert r.status_code == 200, r.text


async def _equals(value: Any, expected: int) -> bool:
    return bool(await value == expected)


async def test_no_flapping_after_the_network_heals(private_redis: RedisServer) -> None:
    """After a partition the pool's connections are gone; the first burst once Redis is back
    opens them all at once. Its wait is this process's own (connecting, queueing for one of
    the pool's connections), never Redis being down again: before, redis-py's own 100 ms
    pool-wait and connect timeouts counted as a refused connection and flapped the limiter
    back to local mode for a second, again with each burst."""
    async with NetworkCut(private_redis.port) as net, fast_store(net.url) as store:
        spec = rpm(10**6, "s")
        # Connections for a burst (whether it was served or not is not under test here).
        await asyncio.gather(
            *(store.admit(rid(), [spec]) for _ in range(100)), return_exceptions=True
        )
        net.cut()
        for _ in range(3):
            with pytest.raises(StoreUnavailable):
                await store.admit(rid(), [spec])
        assert store.down
        net.heal()

        async def back() -> bool:
            try:
                return (await store.admit(rid(), [spec])).allowed
            except StoreUnavailable:
                return False

        await eventually(back)
        for _ in range(3):  # bursts of 300, as clients come back
            results = await asyncio.gather(
                *(store.admit(rid(), [spec]) for _ in range(300)), return_exceptions=True
            )
            failed = [r for r in results if isinstance(r, BaseException)]
            assert failed == [] and not store.down, (len(failed), failed[:3])


async def test_an_admission_delivered_after_the_partition_takes_nothing(
    app: Any, http: httpx.AsyncClient, tmp_path: Path, private_redis: RedisServer
) -> None:
    """What was sent before a partition arrives when it heals (TCP retransmits it): an
    admission whose caller gave up on it (and was served from the local share) then ran in
    Redis, holding a slot for the 60 s lease with nothing in flight. It is voided instead."""
    prefix = unique_prefix()
    tiers = {"free": {**UNLIMITED, "concurrent_requests": 2}, "ip": UNLIMITED}
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    async with (
        NetworkCut(private_redis.port, hold=True) as net,
        limits_on(
            app, tmp_path, "redis", tiers=tiers, redis_url=net.url, rate_limit_key_prefix=prefix
        ) as limiter,
    ):
        acct = await create_account(app)
        assert (await http.post(CHAT, json=body, headers=acct.headers)).status_code == 200
        # Settled: the next admission goes out on the pool's idle connection (a new one would
        # hang in its handshake, and the admission would never be sent).
        await eventually(lambda: limiter.in_flight == 0 and not limiter._tasks)
        net.cut()
        r = await http.post(CHAT, json=body, headers=acct.headers)
        assert r.status_code == 200  # the admission timed out: served from the local share
        await eventually(lambda: limiter.in_flight == 0 and not limiter._tasks)
        net.heal()  # the admission reaches Redis now

        async def held() -> int:
            return await live_leases(private_redis.url, prefix, acct.user_id)

        await eventually(lambda: limiter.store.down is False)
        assert (await http.post(CHAT, json=body, headers=acct.headers)).status_code == 200
        await eventually(lambda: _equals(held(), 0), timeout=10)  # the lease lasts 60 s
        for _ in range(2):  # both slots are free
            assert (await http.post(CHAT, json=body, headers=acct.headers)).status_code == 200
