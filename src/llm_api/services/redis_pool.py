"""One Redis client for the whole process, and one policy for when Redis fails.

The response cache (services/cache/store.py), the rate limiter and the login throttle
(services/rate_limit/redis_store.py) and the routing breakers (services/llm/routing/breaker.py)
share the client built here from `LLM_API_REDIS_URL`: one connection pool, one set of connection
settings, one place that closes it (the lifespan). Celery's broker connection is Celery's own.

The failure policy, the same for every use:
- Each call is bounded by its use's own budget (LLM_API_CACHE_TIMEOUT_MS,
  LLM_API_RATE_LIMIT_REDIS_TIMEOUT_MS, LLM_API_BREAKER_REDIS_TIMEOUT_MS), timed by the caller;
  the client's socket timeouts are only a backstop beyond the longest of them.
- No retries: a retry would multiply the budget, and every use has something better to do.
- `RedisHealth` decides when Redis is down: a refused connection at once, or FAILURES_TO_TRIP
  timeouts in a row. Then every use skips Redis for BACKOFF_S instead of paying the budget on
  every request, and tries again after it. One warning when it goes down, one line when it
  answers again.
- What a use does without Redis is its own, fixed: the cache misses (fail open); the limiter
  applies LLM_API_RATE_LIMIT_FAILURE_MODE (local share, open or closed); the breakers keep this
  process's own state.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import structlog
from redis.asyncio import BlockingConnectionPool, Redis
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.retry import Retry

from llm_api.core.config import Settings

log = structlog.get_logger(__name__)

MAX_CONNECTIONS = 128
# The limiter extends a call's deadline up to 5 times when the wait was this process's own
# (rate_limit/redis_store._Deadline): the backstop lies beyond that.
_BACKSTOP_FACTOR = 2 * (5 + 2)


class RedisHealth:
    """Whether Redis is worth calling now: shared by every use of the one client."""

    BACKOFF_S = 1.0
    FAILURES_TO_TRIP = 3

    def __init__(self) -> None:
        self._down_until = 0.0
        self._failures = 0
        self._reported = False  # a warning was logged for the current outage

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


def build_redis(url: str, budget_s: float, max_connections: int = MAX_CONNECTIONS) -> Redis:
    """The client: a blocking pool (a burst queues for one of `max_connections` connections
    instead of opening one each), periodic health checks, no retries; the pool reconnects by
    itself when Redis is back. Its timeouts are a backstop beyond the longest wait any use
    allows (`budget_s`): each of them is a bare timer that a stalled event loop fires before
    the reply it raced with is read, so the uses time their calls themselves."""
    backstop = budget_s * _BACKSTOP_FACTOR
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
        budget = max(
            settings.cache_timeout_ms,
            settings.rate_limit_redis_timeout_ms,
            settings.breaker_redis_timeout_ms,
        )
        return cls(build_redis(settings.redis_url, budget / 1000))

    async def aclose(self) -> None:
        await self.client.aclose()  # closes the pool too (from_pool)
