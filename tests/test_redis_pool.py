"""One Redis client and one failure policy (services/redis_pool.py) for the response cache, the
rate limiter and the routing breakers: what one use learns about Redis, every use acts on."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

from llm_api.services.cache.store import RedisCacheStore
from llm_api.services.llm.routing.breaker import RedisBreakers
from llm_api.services.rate_limit.redis_store import RedisStore, StoreUnavailable
from llm_api.services.rate_limit.types import LimitSpec
from llm_api.services.redis_pool import RedisHealth, SharedRedis, build_redis
from tests.conftest import free_port, require_service
from tests.conftest import test_settings as settings_for
from tests.rate_limit.conftest import delete_prefix, unique_prefix

REDIS_URL = "redis://127.0.0.1:6379/0"


def uses(redis: SharedRedis) -> tuple[RedisCacheStore, RedisStore, RedisBreakers]:
    prefix = unique_prefix()
    return (
        RedisCacheStore(redis.client, 60, 0.5, redis.health),
        RedisStore(redis.client, prefix, 0.5, redis.health),
        RedisBreakers(redis.client, prefix, 3, 1.0, 5.0, 0.5, redis.health),
    )


def spec() -> LimitSpec:
    return LimitSpec("rpm", "requests per minute (RPM)", "user", "u1", "window", "requests", 10,
                     60_000)  # fmt: skip


async def test_one_client_for_every_use(tmp_path: Path) -> None:
    require_service("Redis", "127.0.0.1", 6379)
    redis = SharedRedis.from_settings(settings_for(tmp_path, redis_url=REDIS_URL))
    assert redis is not None
    cache, limiter, breakers = uses(redis)
    try:
        assert cache.redis is limiter.redis is breakers.redis is redis.client
        await cache.set("a", b'{"x":1}')
        assert await cache.get("a") == b'{"x":1}'
        assert (await limiter.admit(uuid.uuid4().hex, [spec()])).allowed
        assert await breakers.states(["d"]) == ["closed"]
        assert not redis.health.down
    finally:
        await redis.aclose()
        await delete_prefix(limiter.prefix)


async def test_what_one_use_learns_every_use_acts_on() -> None:
    """The cache finds Redis gone (a refused connection): the limiter and the breakers then skip
    it without a call, each with its own fallback, until the back-off has passed."""
    redis = SharedRedis(build_redis(f"redis://127.0.0.1:{free_port()}/0", 0.5))
    cache, limiter, breakers = uses(redis)
    try:
        assert await cache.get("a") is None  # a miss, never an error
        assert redis.health.down
        started = asyncio.get_running_loop().time()
        try:
            await limiter.admit(uuid.uuid4().hex, [spec()])
            raise AssertionError("admitted without Redis")
        except StoreUnavailable as exc:
            assert str(exc) == "redis marked down" and not exc.sent  # never sent
        assert await breakers.states(["d"]) == ["closed"]  # this process's own state
        assert asyncio.get_running_loop().time() - started < 0.05  # no call was made
    finally:
        await redis.aclose()


async def test_only_timeouts_of_redis_own_count() -> None:
    health = RedisHealth()
    for _ in range(health.FAILURES_TO_TRIP - 1):
        health.failed("cache", TimeoutError())
    assert not health.down
    health.succeeded()  # an answer in between: the count starts again
    for _ in range(health.FAILURES_TO_TRIP - 1):
        health.failed("cache", TimeoutError())
    assert not health.down
    health.failed("breakers", TimeoutError())
    assert health.down
    await health.aclose()
