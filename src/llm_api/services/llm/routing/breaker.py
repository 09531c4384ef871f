"""Circuit breakers, one per deployment: closed → open after N consecutive failures → half-open
after a cooldown (one probe request passes) → closed when the probe succeeds, open again when it
fails.

Two stores with one interface. `MemoryBreakers` keeps the state in this process. `RedisBreakers`
shares it between workers and pods through tiny keys with TTLs, so a dead replica is skipped
everywhere after N failures anywhere; it costs one MGET per request and writes only when a
state changes. When Redis fails or is slow (each call within LLM_API_BREAKER_REDIS_TIMEOUT_MS), or
the shared policy has marked it down (services/redis_pool.py), it falls back to the memory store
rather than failing or holding requests.
Hand-written because the breaker libraries on PyPI (pybreaker, aiobreaker, purgatory) are
synchronous or have no half-open probe token shared across processes.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Literal, Protocol, TypeVar

import structlog
from redis.asyncio import Redis

from llm_api.services.redis_pool import RedisHealth, RedisUnavailable

log = structlog.get_logger(__name__)

State = Literal["closed", "open", "half_open"]
T = TypeVar("T")


class Breakers(Protocol):
    async def states(self, names: list[str]) -> list[State]:
        """Current state of each named breaker (one round trip)."""
        ...

    async def acquire(self, name: str, state: State) -> bool:
        """May a request go to `name` now? In half-open only one probe gets True."""
        ...

    async def success(self, name: str, state: State) -> None: ...

    async def failure(self, name: str) -> None: ...

    async def release(self, name: str, state: State) -> None:
        """A request that had a permit ended without a verdict (client went away)."""
        ...

    async def aclose(self) -> None: ...


@dataclass(slots=True)
class _Entry:
    failures: int = 0
    opened_at: float | None = None
    probing: bool = False


class MemoryBreakers:
    def __init__(self, failures: int, cooldown: float) -> None:
        self.threshold = failures
        self.cooldown = cooldown
        self._entries: dict[str, _Entry] = {}

    def _entry(self, name: str) -> _Entry:
        entry = self._entries.get(name)
        if entry is None:
            entry = self._entries[name] = _Entry()
        return entry

    def state(self, name: str) -> State:
        entry = self._entry(name)
        if entry.opened_at is None:
            return "closed"
        if time.monotonic() - entry.opened_at < self.cooldown:
            return "open"
        return "half_open"

    async def states(self, names: list[str]) -> list[State]:
        return [self.state(n) for n in names]

    async def acquire(self, name: str, state: State) -> bool:
        if state == "closed":
            return True
        entry = self._entry(name)
        if state == "open" or entry.probing:
            return False
        entry.probing = True
        return True

    async def success(self, name: str, state: State) -> None:
        entry = self._entry(name)
        if entry.opened_at is not None:
            log.info("breaker_closed", deployment=name)
        entry.failures, entry.opened_at, entry.probing = 0, None, False

    async def failure(self, name: str) -> None:
        entry = self._entry(name)
        entry.failures += 1
        entry.probing = False
        if entry.opened_at is not None or entry.failures >= self.threshold:
            if entry.opened_at is None or time.monotonic() - entry.opened_at >= self.cooldown:
                log.warning("breaker_opened", deployment=name, failures=entry.failures)
            entry.opened_at = time.monotonic()

    async def release(self, name: str, state: State) -> None:
        if state == "half_open":
            self._entry(name).probing = False

    async def aclose(self) -> None:
        return None


# KEYS: fails, open, half, probe. ARGV: threshold, cooldown ms, half-open ttl ms.
# A failure in half-open (the `half` key exists) re-opens at once.
_FAILURE_LUA = """
local n = redis.call('INCR', KEYS[1])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
if n >= tonumber(ARGV[1]) or redis.call('EXISTS', KEYS[3]) == 1 then
  redis.call('SET', KEYS[2], '1', 'PX', ARGV[2])
  redis.call('SET', KEYS[3], '1', 'PX', ARGV[3])
  redis.call('DEL', KEYS[4])
  return 1
end
return 0
"""


class RedisBreakers:
    """Keys per deployment, all with TTLs so nothing outlives its meaning:
    `:f` consecutive failures, `:o` open (expires after the cooldown), `:h` half-open marker
    (set with `:o`, outlives it: its presence without `:o` means half-open), `:p` the probe
    token (SET NX, expires if the probe never reports)."""

    def __init__(
        self,
        redis: Redis,
        prefix: str,
        failures: int,
        cooldown: float,
        probe_ttl: float,
        timeout: float = 0.1,
        health: RedisHealth | None = None,
    ) -> None:
        self.redis = redis
        self.prefix = prefix
        self.threshold = failures
        self.cooldown_ms = int(cooldown * 1000)
        self.half_ttl_ms = int(cooldown * 1000 * 10 + probe_ttl * 1000)
        self.probe_ms = int(probe_ttl * 1000)
        self.timeout = timeout
        self.health = health if health is not None else RedisHealth()
        self.local = MemoryBreakers(failures, cooldown)
        self._failure = redis.register_script(_FAILURE_LUA)

    async def _call(self, op: Awaitable[T]) -> T:
        """`op` as the shared failure policy times and judges it (services/redis_pool.py);
        RedisUnavailable (the caller then uses its memory store) when Redis failed, was too
        slow or is marked down."""
        return await self.health.call("breakers", op, self.timeout)

    def _keys(self, name: str) -> list[str]:
        base = f"{self.prefix}:{name}"
        return [f"{base}:f", f"{base}:o", f"{base}:h", f"{base}:p"]

    async def states(self, names: list[str]) -> list[State]:
        keys = [k for n in names for k in self._keys(n)[:3]]
        try:
            values = await self._call(self.redis.mget(keys))
        except RedisUnavailable:
            return await self.local.states(names)
        out: list[State] = []
        for i, name in enumerate(names):
            fails, is_open, half = values[3 * i : 3 * i + 3]
            # Failures seen by any worker: a success here must then reset the shared count.
            self.local._entry(name).failures = int(fails or 0)
            out.append("open" if is_open else "half_open" if half else "closed")
        return out

    async def acquire(self, name: str, state: State) -> bool:
        if state == "closed":
            return True
        if state == "open":
            return False
        try:
            token = self.redis.set(self._keys(name)[3], "1", nx=True, px=self.probe_ms)
            return bool(await self._call(token))
        except RedisUnavailable:
            return await self.local.acquire(name, state)

    async def success(self, name: str, state: State) -> None:
        # Writes only when there is something to clear: a closed breaker with no failure
        # recorded costs nothing on the hot path.
        if state == "closed" and not self.local._entry(name).failures:
            return
        self.local._entry(name).failures = 0
        try:
            await self._call(self.redis.delete(*self._keys(name)))
        except RedisUnavailable:
            await self.local.success(name, state)

    async def failure(self, name: str) -> None:
        try:
            opened = await self._call(
                self._failure(
                    keys=self._keys(name),
                    args=[self.threshold, self.cooldown_ms, self.half_ttl_ms],
                )
            )
            self.local._entry(name).failures += 1  # a later success must clear `:f`
            if opened:
                log.warning("breaker_opened", deployment=name)
        except RedisUnavailable:
            await self.local.failure(name)

    async def release(self, name: str, state: State) -> None:
        if state != "half_open":
            return
        try:
            await self._call(self.redis.delete(self._keys(name)[3]))
        except RedisUnavailable:
            await self.local.release(name, state)

    async def aclose(self) -> None:
        pass  # the client is shared: its owner closes it
