"""The response cache on real Redis (issue 5, points 1 and 6): entries with a TTL, tenant
isolation and stream replay through the shared Redis; outages and slowness of a private
redis-server only ever mean misses; a cancelled Redis call never hands a value to another
request (RELIABILITY #29, redis-py CVE-2023-28858/9)."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import pytest
from redis.asyncio import Redis

from llm_api.schemas.chat import ChatCompletionRequest
from llm_api.services.cache.service import CachePolicy, build_cache_store
from llm_api.services.cache.store import KEY_PREFIX, MemoryCacheStore, RedisCacheStore
from llm_api.services.llm.types import RequestContext
from llm_api.services.redis_pool import SharedRedis, build_redis
from tests.conftest import MODEL
from tests.conftest import test_settings as make_settings
from tests.usage.conftest import (
    ROOM,
    SHORT,
    RedisServer,
    Running,
    TcpProxy,
    chat_body,
    nonce,
    running_app,
)

pytestmark = [pytest.mark.model, pytest.mark.redis]


@pytest.fixture(scope="module")
async def env(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Running]:
    async with running_app(tmp_path_factory.mktemp("redis-cache")) as running:
        yield running


def use_store(env: Running, store: RedisCacheStore | MemoryCacheStore) -> None:
    env.state.responses.pipeline.cache.store = store


async def post(env: Running, key: str, body: dict, **headers: str) -> tuple[str, dict]:
    resp = await env.http.post(
        "/v1/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {key}", **headers},
    )
    assert resp.status_code == 200, resp.text
    return resp.headers["x-cache"], resp.json()


async def test_redis_is_used_when_configured(tmp_path: Path) -> None:
    assert isinstance(build_cache_store(make_settings(tmp_path), None), MemoryCacheStore)
    settings = make_settings(tmp_path, redis_url="redis://127.0.0.1:6379/0")
    redis = SharedRedis.from_settings(settings)
    assert redis is not None
    store = build_cache_store(settings, redis)
    assert isinstance(store, RedisCacheStore) and store.ttl == 3600 and store.timeout == 0.1
    assert store.redis is redis.client and store.health is redis.health  # the shared ones
    assert build_cache_store(make_settings(tmp_path, cache_enabled=False), redis) is None
    await redis.aclose()


async def test_hits_come_from_redis_with_a_ttl(env: Running, shared_redis_url: str) -> None:
    store = RedisCacheStore(
        build_redis(shared_redis_url, 0.1), ttl_seconds=120, timeout_seconds=0.1
    )
    use_store(env, store)
    alice_id, alice = await env.user()
    _, bob = await env.user()
    body = chat_body("Say hi.")
    assert (await post(env, alice, body))[0] == "miss"
    request = ChatCompletionRequest.model_validate(body)
    ctx = RequestContext(request_id=nonce(), user_id=alice_id)
    serving = env.state.responses
    key = serving.pipeline.cache.key(serving.plan(request, ctx, CachePolicy(), stream=False))
    assert key is not None
    assert 0 < await store.redis.ttl(KEY_PREFIX + key) <= 120  # the entry expires
    state, hit = await post(env, alice, body)
    assert state == "hit"
    assert (await post(env, bob, body))[0] == "miss"  # tenant isolation on Redis too

    client = env.client(alice)
    stream = await client.chat.completions.create(
        model=MODEL,
        messages=body["messages"],
        max_tokens=ROOM,
        temperature=0,
        stop=SHORT,
        stream=True,
    )
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text == hit["choices"][0]["message"]["content"]
    await store.aclose()
    await store.redis.aclose()


async def test_shared_scope_serves_other_tenants(tmp_path: Path, shared_redis_url: str) -> None:
    async with running_app(tmp_path, cache_shared=True) as env:
        use_store(env, RedisCacheStore(build_redis(shared_redis_url, 0.1), 120, 0.1))
        _, alice = await env.user()
        _, bob = await env.user()
        body = chat_body("Say ok.")
        # no-cache: alice's answer is fresh (an entry left by an earlier run is not read) and
        # written; bob, another tenant, is then served alice's entry.
        assert (await post(env, alice, body, **{"Cache-Control": "no-cache"}))[0] == "miss"
        assert (await post(env, bob, body))[0] == "hit"


async def test_redis_down_means_misses_only(env: Running, tmp_path: Path) -> None:
    server = RedisServer(tmp_path)
    server.start()
    store = RedisCacheStore(build_redis(server.url, 0.1), 120, 0.1)
    use_store(env, store)
    _, key = await env.user()
    body = chat_body("Say go.")
    try:
        assert (await post(env, key, body))[0] == "miss"
        assert (await post(env, key, body))[0] == "hit"
        server.stop()
        for _ in range(3):
            started = time.perf_counter()
            state, reply = await post(env, key, body)
            assert state == "miss" and reply["choices"][0]["message"]["content"] is not None
        # After the outage: the cache comes back by itself.
        server.start()
        await asyncio.sleep(1.1)  # the store skips Redis for a second after a failure
        assert (await post(env, key, body))[0] == "miss"  # the restarted server is empty
        assert (await post(env, key, body))[0] == "hit"
    finally:
        server.stop()
        await store.aclose()
        await store.redis.aclose()
    assert time.perf_counter() - started < 30


async def test_slow_redis_times_out_as_a_miss(tmp_path: Path) -> None:
    server = RedisServer(tmp_path)
    server.start()
    proxy = TcpProxy(server.port, delay=0.5)  # every read takes half a second
    await proxy.open()
    store = RedisCacheStore(build_redis(f"redis://127.0.0.1:{proxy.port}/0", 0.1), 120, 0.1)
    try:
        for _ in range(3):
            started = time.perf_counter()
            assert await store.get("k" * 64) is None
            await store.set("k" * 64, b'{"x":1}')
            assert time.perf_counter() - started < 0.35  # two bounded calls, or skipped
    finally:
        await store.aclose()
        await store.redis.aclose()
        await proxy.close()
        server.stop()


async def test_cancelled_calls_never_return_another_requests_value(tmp_path: Path) -> None:
    """RELIABILITY #29: thousands of GETs on a shared pool through a slow link, a random half of
    them cancelled mid-flight; every GET that completes gets the value of its own key."""
    server = RedisServer(tmp_path)
    server.start()
    proxy = TcpProxy(server.port, delay=0.002)
    await proxy.open()
    url = f"redis://127.0.0.1:{proxy.port}/0"
    seeder = Redis.from_url(f"redis://127.0.0.1:{server.port}/0")
    keys = [f"race:{i}" for i in range(200)]
    await seeder.mset({k: orjson.dumps({"owner": k}) for k in keys})
    store = RedisCacheStore(
        build_redis(url, 5.0), 120, 5.0
    )  # a long timeout: only our cancellations interrupt
    rng = random.Random(29)
    wrong: list[tuple[str, object]] = []
    completed = cancelled = 0

    async def one(key: str) -> None:
        nonlocal completed
        raw = await store.redis.get(key)
        completed += 1
        if raw is None or orjson.loads(raw)["owner"] != key:
            wrong.append((key, raw))

    try:
        for _ in range(10):
            tasks = [asyncio.create_task(one(rng.choice(keys))) for _ in range(300)]
            await asyncio.sleep(rng.uniform(0.001, 0.01))
            for task in tasks:
                if rng.random() < 0.5:
                    task.cancel()
            results = await asyncio.gather(*tasks, return_exceptions=True)
            cancelled += sum(isinstance(r, asyncio.CancelledError) for r in results)
            errors = [r for r in results if isinstance(r, Exception)]
            assert not errors, errors[:3]
    finally:
        await store.aclose()
        await store.redis.aclose()
        await seeder.aclose()
        await proxy.close()
        server.stop()
    assert not wrong, wrong[:5]
    assert completed > 500 and cancelled > 500  # the race was really exercised


async def test_entry_written_under_another_key_is_a_miss() -> None:
    """The second guard: an entry names the key it was written for."""
    store = MemoryCacheStore(1 << 20, 60)
    await store.set("a" * 64, b'{"v":1}')
    store._entries["b" * 64] = store._entries["a" * 64]  # a reply landing on the wrong key
    assert await store.get("a" * 64) == b'{"v":1}'
    assert await store.get("b" * 64) is None


async def test_memory_store_is_bounded_in_bytes() -> None:
    store = MemoryCacheStore(10_000, 60)
    for i in range(100):
        await store.set(f"{i:064d}", b'"' + b"x" * 500 + b'"')
    assert store.bytes_used <= 10_000
    assert await store.get(f"{99:064d}") is not None  # the newest survive
    assert await store.get(f"{0:064d}") is None  # the least recently used went first
    await store.set("big" * 20, b'"' + b"x" * 20_000 + b'"')  # larger than the bound: skipped
    assert await store.get("big" * 20) is None
