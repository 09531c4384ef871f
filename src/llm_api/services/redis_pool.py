"""One Redis client for the whole process, and one policy for when Redis fails.

The response cache (services/cache/store.py), the rate limiter and the login throttle
(services/rate_limit/redis_store.py) and the routing breakers (services/llm/routing/breaker.py)
share the client built here from `LLM_API_REDIS_URL`: one connection pool, one set of connection
settings, one place that closes it (the lifespan). Celery's broker connection is Celery's own.

The failure policy, the same for every use:
- Every call goes through `RedisHealth.call`, within its use's own budget
  (LLM_API_CACHE_TIMEOUT_MS, 2 × LLM_API_RATE_LIMIT_REDIS_TIMEOUT_MS,
  LLM_API_BREAKER_REDIS_TIMEOUT_MS); the client's socket timeouts are only a backstop beyond the
  longest wait. A budget is extended (`_Deadline`) when the wait was this process's own doing:
  its event loop was stalled, or Redis answered other calls meanwhile (this one queued behind
  them). Such a call still fails if it runs out, but says nothing about Redis.
- No retries: a retry would multiply the budget, and every use has something better to do.
- `RedisHealth` decides when Redis is down: a refused connection at once, or FAILURES_TO_TRIP
  timeouts of Redis's own in a row. Then every use skips Redis for BACKOFF_S instead of paying
  the budget on every request, and tries again after it. One warning when it goes down, one
  line when it answers again.
- What a use does without Redis is its own, fixed: the cache misses (fail open); the limiter
  applies LLM_API_RATE_LIMIT_FAILURE_MODE (local share, open or closed); the breakers keep this
  process's own state.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

import structlog
from redis.asyncio import BlockingConnectionPool, Redis
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.retry import Retry

from llm_api.core.config import Settings
from llm_api.services.loop_lag import LoopLag

log = structlog.get_logger(__name__)
T = TypeVar("T")

MAX_CONNECTIONS = 128


class RedisUnavailable(Exception):
    """A call failed, timed out or was skipped (Redis marked down): the use applies its own
    fallback. `sent`: the call may have reached Redis (it timed out), so it may yet take effect."""

    def __init__(self, message: str = "", sent: bool = False) -> None:
        super().__init__(message)
        self.sent = sent


class _Deadline:
    """The time limit of one Redis call. When it is reached and the wait was this process's own
    doing, not Redis's, the call gets another budget (up to MAX_EXTENSIONS times):
    - the loop was late by half the budget or more (stalled: the reply may be sitting unread);
    - or Redis answered another call since this one started (it is up; this call was queued
      behind this process's own work: a burst, new connections, a busy loop).
    Otherwise it expires on the next loop iteration, after any wake-up already queued (so a
    reply that arrived with the timer still wins)."""

    MAX_EXTENSIONS = 5

    def __init__(
        self,
        timeout: asyncio.Timeout,
        budget: float,
        lag: LoopLag,
        last_reply: Callable[[], float],
    ) -> None:
        self._timeout = timeout
        self._budget = budget
        self._lag = lag
        self._last_reply = last_reply
        self._loop = asyncio.get_running_loop()
        self._started = self._loop.time()
        self._when = self._started + budget
        self.extensions = 0
        # Set when it expires: whether the wait was Redis's (which counts toward marking it
        # down) rather than this process's (which fails this call only).
        self.redis_to_blame = False
        self._handle = self._loop.call_at(self._when, self._check)

    def _check(self) -> None:
        now = self._loop.time()
        stall = max(now - self._when, self._lag.since(self._started))
        ours = stall >= self._budget / 4 or self._last_reply() >= self._started
        if ours and self.extensions < self.MAX_EXTENSIONS:
            self.extensions += 1
            self._when = now + self._budget
            self._handle = self._loop.call_at(self._when, self._check)
        else:
            self.redis_to_blame = not ours
            self._timeout.reschedule(now)

    def cancel(self) -> None:
        self._handle.cancel()


# The backstop lies beyond the longest wait a call may get: its budget (up to twice the
# timeout setting, for the limiter), extended.
_BACKSTOP_FACTOR = 2 * (_Deadline.MAX_EXTENSIONS + 2)


class RedisHealth:
    """Whether Redis is worth calling now, and the timing of every call: shared by every use of
    the one client."""

    BACKOFF_S = 1.0
    FAILURES_TO_TRIP = 3

    def __init__(self) -> None:
        self._down_until = 0.0
        self._failures = 0
        self._reported = False  # a warning was logged for the current outage
        self._lag = LoopLag()
        self._last_reply = 0.0  # loop time of the latest reply from Redis

    async def call(self, use: str, op: Awaitable[T], budget: float) -> T:
        """`op` (a call on the client, not yet awaited) within `budget` seconds, extended while
        the wait is this process's own. Raises RedisUnavailable when Redis is marked down (then
        `op` never runs), fails, or does not answer in time."""
        if self.down:
            if asyncio.iscoroutine(op):
                op.close()
            raise RedisUnavailable("redis marked down")
        self._lag.start()
        deadline: _Deadline | None = None
        try:
            async with asyncio.timeout(None) as timeout:
                deadline = _Deadline(timeout, budget, self._lag, lambda: self._last_reply)
                try:
                    result = await op
                finally:
                    deadline.cancel()
        except (RedisError, OSError, TimeoutError) as exc:
            timed_out = isinstance(exc, TimeoutError) and deadline is not None
            if timed_out and deadline is not None and not deadline.redis_to_blame:
                # This process was too slow, not Redis: fail this call only.
                log.info("redis_call_late", use=use, extensions=deadline.extensions)
                raise RedisUnavailable("the event loop was too slow", sent=True) from exc
            sent = self.failed(use, exc)
            raise RedisUnavailable(str(exc) or type(exc).__name__, sent=sent) from exc
        self.succeeded()
        self._last_reply = asyncio.get_running_loop().time()
        return result

    async def aclose(self) -> None:
        await self._lag.aclose()

    @property
    def down(self) -> bool:
        return time.monotonic() < self._down_until

    def succeeded(self) -> None:
        self._failures = 0
        if self._reported:
            self._reported = False
            log.info("redis_available_again")

    def failed(self, use: str, exc: BaseException) -> bool:
        """Count a failure that was Redis's doing (not a stalled event loop's). Returns whether
        the call may have reached Redis (a timeout), as opposed to a refused connection."""
        self._failures += 1
        refused = isinstance(exc, (RedisConnectionError, OSError)) and not isinstance(
            exc,
            TimeoutError,  # the builtin one is an OSError too
        )
        if refused or self._failures >= self.FAILURES_TO_TRIP:
            if not self._reported:
                self._reported = True
                log.warning("redis_unavailable", use=use, error=type(exc).__name__)
            self._down_until = time.monotonic() + self.BACKOFF_S
        return not refused


def build_redis(url: str, timeout_s: float, max_connections: int = MAX_CONNECTIONS) -> Redis:
    """The client: a blocking pool (a burst queues for one of `max_connections` connections
    instead of opening one each), periodic health checks, no retries; the pool reconnects by
    itself when Redis is back. Its timeouts are a backstop beyond the longest wait any use
    allows (`timeout_s`: the longest timeout setting): each of them is a bare timer that a
    stalled event loop fires before the reply it raced with is read, so calls are timed by
    `RedisHealth.call` instead."""
    backstop = timeout_s * _BACKSTOP_FACTOR
    pool = BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=backstop,
        socket_timeout=backstop,
        socket_connect_timeout=backstop,
        health_check_interval=15,
        retry=Retry(NoBackoff(), 0),
        client_name="llm-api",
    )
    return Redis.from_pool(pool)


@dataclass
class SharedRedis:
    """The client and its health, handed to every use."""

    client: Redis
    health: RedisHealth = field(default_factory=RedisHealth)

    @classmethod
    def from_settings(cls, settings: Settings) -> SharedRedis | None:
        """None without LLM_API_REDIS_URL: every use keeps its state in this process."""
        if not settings.redis_url:
            return None
        timeout = max(
            settings.cache_timeout_ms,
            settings.rate_limit_redis_timeout_ms,
            settings.breaker_redis_timeout_ms,
        )
        return cls(build_redis(settings.redis_url, timeout / 1000))

    async def aclose(self) -> None:
        await self.health.aclose()
        await self.client.aclose()  # closes the pool too (from_pool)
