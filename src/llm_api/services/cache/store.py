"""Where cached responses live: Redis with a TTL when configured, else an in-process LRU.

Why not the guide's `functools.lru_cache` around the async Redis call: `lru_cache` memoizes what
the function returns, and an `async def` returns a coroutine object. The first caller awaits it;
every later caller with the same arguments gets the same, already-awaited coroutine back and fails
with "cannot reuse already awaited coroutine". It would also cache misses forever, ignore the
Redis TTL and grow per process without a byte bound. Here Redis holds the entries (with TTL) and the
in-process fallback is a TTL+LRU map bounded in bytes.

A failing cache only ever means a miss: every Redis call is bounded by a short timeout (100 ms by
default) and errors are swallowed; when Redis is down is the shared policy's call
(services/redis_pool.RedisHealth: then Redis is skipped for a second, so a dead server costs
nothing per request).

Cancellation (RELIABILITY #29, redis-py CVE-2023-28858/9, the March 2023 ChatGPT leak): a command
cancelled between send and reply used to leave its reply unread on a pooled connection, where the
next caller read it as its own. redis-py >= 4.5.4 (we run 8.x) disconnects the connection whenever
a read is interrupted by any BaseException, cancellation included. As a second guard each entry
stores the key it was written under, and a read whose entry names another key is a miss.
"""

from __future__ import annotations

import contextlib
from typing import Protocol, cast

import orjson
import structlog
from cachetools import TTLCache
from redis.asyncio import Redis

from llm_api.services.redis_pool import RedisHealth, RedisUnavailable

log = structlog.get_logger(__name__)

KEY_PREFIX = "llm-api:cache:"


class CacheStore(Protocol):
    async def get(self, key: str) -> bytes | None: ...

    async def set(self, key: str, value: bytes) -> None: ...

    async def get_many(self, keys: list[str]) -> list[bytes | None]:
        """One look-up for many keys (per-input embedding entries): one round trip to Redis."""
        ...

    async def set_many(self, items: list[tuple[str, bytes]]) -> None: ...

    async def aclose(self) -> None: ...


def wrap(key: str, value: bytes) -> bytes:
    return orjson.dumps({"k": key, "v": orjson.Fragment(value)})


def unwrap(key: str, stored: bytes | None) -> bytes | None:
    """The entry's payload, or None when it is missing, corrupt, or was written under another key
    (which would mean a reply reached the wrong request)."""
    if stored is None:
        return None
    try:
        data = orjson.loads(stored)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(data, dict) or data.get("k") != key:
        log.error("cache_key_mismatch", key=key)
        return None
    return orjson.dumps(data.get("v"))


class MemoryCacheStore:
    """cachetools' TTLCache: least-recently-used eviction, per-entry TTL, and `maxsize` counted in
    bytes through `getsizeof`. One event loop uses it, so it needs no lock."""

    def __init__(self, max_bytes: int, ttl_seconds: float) -> None:
        self.max_bytes = max_bytes
        self._entries: TTLCache[str, bytes] = TTLCache(
            maxsize=max_bytes, ttl=ttl_seconds, getsizeof=lambda v: len(v) + 64
        )

    async def get(self, key: str) -> bytes | None:
        return unwrap(key, self._entries.get(key))

    async def set(self, key: str, value: bytes) -> None:
        stored = wrap(key, value)
        if len(stored) + 64 > self.max_bytes:
            return
        self._entries[key] = stored

    async def get_many(self, keys: list[str]) -> list[bytes | None]:
        return [await self.get(key) for key in keys]

    async def set_many(self, items: list[tuple[str, bytes]]) -> None:
        for key, value in items:
            await self.set(key, value)

    async def aclose(self) -> None:
        self._entries.clear()

    @property
    def bytes_used(self) -> int:
        return int(self._entries.currsize)


class RedisCacheStore:
    """Entries in the shared Redis (services/redis_pool.py), each call within `timeout_seconds`
    (a wait for a free pooled connection included)."""

    def __init__(
        self,
        redis: Redis,
        ttl_seconds: int,
        timeout_seconds: float,
        health: RedisHealth | None = None,
    ) -> None:
        self.redis = redis
        self.ttl = ttl_seconds
        self.timeout = timeout_seconds
        self._own_health = health is None  # a store of its own (tests): closed with it
        self.health = health if health is not None else RedisHealth()

    async def get(self, key: str) -> bytes | None:
        try:
            call = self.redis.get(KEY_PREFIX + key)
            stored = cast(bytes | None, await self.health.call("cache", call, self.timeout))
        except RedisUnavailable:  # a miss; the shared policy logs outages
            return None
        return unwrap(key, stored)

    async def set(self, key: str, value: bytes) -> None:
        call = self.redis.set(KEY_PREFIX + key, wrap(key, value), ex=self.ttl)
        with contextlib.suppress(RedisUnavailable):  # not stored; the policy logs outages
            await self.health.call("cache", call, self.timeout)

    async def get_many(self, keys: list[str]) -> list[bytes | None]:
        if not keys:
            return []
        try:
            call = self.redis.mget([KEY_PREFIX + k for k in keys])
            found = cast(list[bytes | None], await self.health.call("cache", call, self.timeout))
        except RedisUnavailable:  # a miss; the shared policy logs outages
            return [None] * len(keys)
        return [unwrap(k, v) for k, v in zip(keys, found, strict=True)]

    async def set_many(self, items: list[tuple[str, bytes]]) -> None:
        if not items:
            return
        pipe = self.redis.pipeline(transaction=False)  # one round trip, no MULTI
        for key, value in items:
            pipe.set(KEY_PREFIX + key, wrap(key, value), ex=self.ttl)
        with contextlib.suppress(RedisUnavailable):  # not stored; the policy logs outages
            await self.health.call("cache", pipe.execute(), self.timeout)

    async def aclose(self) -> None:
        # The client (and, in the app, the health) are shared: their owner closes them.
        if self._own_health:
            await self.health.aclose()
