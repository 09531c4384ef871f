"""The Redis store: ONE Lua script per request checks and takes all of its limits atomically.

Why hand-written Lua and not the `limits` library (which slowapi builds on): `limits` checks one
limit per call (five limits = five round trips, PERFORMANCE.md: each costs about a whole
request's CPU), cannot take several limits all-or-nothing (a request refused by its third limit
would already have spent the first two), and has no reservation that is later settled to the
real token count. None of the well-kept libraries covers weighted reservations with settlement
or TTL'd concurrency leases, so this module does, in three short scripts.

Data, per limit (all keys share one hash tag so the scripts also run on Redis Cluster):
- window limits: a sorted set of entries `<request id>:<cost>` scored by admission time (ms,
  Redis' own clock, so replicas with skewed clocks agree), and a counter with the sum of the
  costs in the window. Entries older than the window are trimmed (and subtracted) on access.
- concurrency limits: a sorted set of request ids scored by lease expiry.
- budgets (money, in the same script as the token limits, so one round trip takes both): a
  counter of the period's spend plus outstanding reservations, and a hash of the outstanding
  reservations by request id (settlement replaces one by the real cost, once). The key names
  the calendar period, so a new period starts at 0; both live until the period's end plus a
  day (BUDGET_GRACE_MS: a request running across midnight still settles). A counter that is
  missing (Redis lost its data: it keeps nothing on disk) is re-seeded in the same script from
  the period's spend in the usage ledger (`LimitSpec.floor`, loaded with the budget rules) plus
  any reservations it still holds: the spend before the loss still counts.
Every key is written with a PEXPIRE in the same script: no key ever lives without a TTL.
Counts are exact: Lua numbers are doubles, so every count is capped (types.MAX_UNITS) and every
member is written with `string.format('%d')`; Lua's own `..` would write 1e+15, which the cost
pattern cannot read back (that made every later script call for the subject fail).
"""

from __future__ import annotations

import asyncio

import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError

from llm_api.services.rate_limit.types import Decision, LimitSpec, LimitState, Settlement
from llm_api.services.redis_pool import RedisHealth, RedisUnavailable

log = structlog.get_logger(__name__)

# How long a budget's keys outlive their period: a request admitted before midnight settles after.
BUDGET_GRACE_MS = 86_400_000
_KINDS = {"window": "w", "concurrency": "c", "budget": "b"}

_ENTRY_COST = "tonumber(string.match(%s, ':(%%-?%%d+)$'))"

ADMIT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local rid = ARGV[1]
if redis.call('EXISTS', KEYS[#KEYS]) == 1 then return {-1, now, 0, 0} end  -- voided (see VOID)
local n = (#ARGV - 1) / 5
local used, waits = {}, {}
local reject, retry = 0, 0
for i = 1, n do
  local a = 2 + (i - 1) * 5
  local kind, limit = ARGV[a], tonumber(ARGV[a + 1])
  local period, cost = tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3])
  local z, tk = KEYS[2 * i - 1], KEYS[2 * i]
  local u, wait = 0, 0
  if kind == 'w' then
    u = tonumber(redis.call('GET', tk) or '0')
    local expired = redis.call('ZRANGEBYSCORE', z, '-inf', now - period)
    if #expired > 0 then
      for _, m in ipairs(expired) do u = u - COST(m) end
      redis.call('ZREMRANGEBYSCORE', z, '-inf', now - period)
      if redis.call('ZCARD', z) == 0 then
        u = 0
        redis.call('DEL', tk)
      else
        if u < 0 then u = 0 end
        redis.call('SET', tk, u, 'KEEPTTL')
      end
    end
    if u + cost > limit then
      wait = period
      if cost <= limit then
        local need, freed = u + cost - limit, 0
        local entries = redis.call('ZRANGE', z, 0, -1, 'WITHSCORES')
        for j = 1, #entries, 2 do
          freed = freed + COST(entries[j])
          if freed >= need then
            wait = tonumber(entries[j + 1]) + period - now
            break
          end
        end
      end
    end
  elseif kind == 'b' then
    local v = redis.call('GET', tk)
    if v then
      u = tonumber(v)
    else  -- lost (or new): from the ledger's spend plus any reservations still held
      u = tonumber(ARGV[a + 4])
      for _, r in ipairs(redis.call('HVALS', z)) do u = u + tonumber(r) end
      if u > 0 then redis.call('SET', tk, string.format('%d', u), 'PX', period + GRACE) end
    end
    if cost > 0 and u + cost > limit then wait = period end
  else
    redis.call('ZREMRANGEBYSCORE', z, '-inf', now)
    u = redis.call('ZCARD', z)
    if u + 1 > limit then wait = 1000 end
  end
  used[i] = u
  if wait > 0 and wait >= retry then
    reject, retry = i, wait
  end
end
local out = {reject == 0 and 1 or 0, now, reject, retry}
for i = 1, n do
  local a = 2 + (i - 1) * 5
  local kind, limit = ARGV[a], tonumber(ARGV[a + 1])
  local period, cost = tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3])
  local z, tk = KEYS[2 * i - 1], KEYS[2 * i]
  if kind == 'c' then cost = 1 end
  local remaining, reset = limit - used[i], 0
  if reject == 0 then
    remaining = remaining - cost
    if kind == 'b' then
      redis.call('HSET', z, rid, string.format('%d', cost))
      redis.call('INCRBY', tk, string.format('%d', cost))
      redis.call('PEXPIRE', z, period + GRACE)
      redis.call('PEXPIRE', tk, period + GRACE)
      reset = period
    elseif kind == 'w' then
      if cost > 0 then
        redis.call('ZADD', z, now, string.format('%s:%d', rid, cost))
        redis.call('INCRBY', tk, cost)
        redis.call('PEXPIRE', z, period)
        redis.call('PEXPIRE', tk, period)
      end
      reset = period
    else
      redis.call('ZADD', z, now + period, rid)
      redis.call('PEXPIRE', z, period)
    end
  elseif kind == 'w' then
    local newest = redis.call('ZRANGE', z, -1, -1, 'WITHSCORES')
    if #newest > 0 then reset = tonumber(newest[2]) + period - now end
  elseif kind == 'b' then
    reset = period
  end
  if remaining < 0 then remaining = 0 end
  out[#out + 1] = remaining
  out[#out + 1] = reset
end
return out
""".replace("COST(m)", _ENTRY_COST % "m").replace("COST(entries[j])", _ENTRY_COST % "entries[j]")

SETTLE = """
local rid, at, n = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local totals = {}
for i = 1, n do
  local z, tk = KEYS[2 * i - 1], KEYS[2 * i]
  local a = 4 + (i - 1) * 4
  local kind = ARGV[a]
  local reserved, used = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  local period = tonumber(ARGV[a + 3])
  if kind == 'b' then
    if redis.call('HDEL', z, rid) == 1 then
      totals[#totals + 1] = redis.call('INCRBY', tk, string.format('%d', used - reserved))
      if redis.call('PTTL', tk) < 0 then redis.call('PEXPIRE', tk, period + GRACE) end
    else
      totals[#totals + 1] = -1
    end
  elseif redis.call('ZREM', z, string.format('%s:%d', rid, reserved)) == 1 then
    if used > 0 then redis.call('ZADD', z, at, string.format('%s:%d', rid, used)) end
    local total = redis.call('INCRBY', tk, used - reserved)
    if redis.call('ZCARD', z) == 0 then
      redis.call('DEL', tk)
    else
      if total < 0 then redis.call('SET', tk, 0) end
      redis.call('PEXPIRE', z, period)
      redis.call('PEXPIRE', tk, period)
    end
  end
end
for j = 2 * n + 1, LAST do redis.call('ZREM', KEYS[j], rid) end
return totals
"""

# An admission whose reply never came (a timeout) may have run, or may yet run: what was sent
# before a partition is delivered when it heals (TCP retransmits it), long after its caller
# moved on. Its id is marked void, so that a late arrival takes nothing (ADMIT checks), and
# whatever it took if it did run is given back (SETTLE to 0). Either order ends the same.
VOID = "redis.call('SET', KEYS[#KEYS], '1', 'PX', ARGV[#ARGV])\n" + SETTLE.replace(
    "LAST", "#KEYS - 1"
)
SETTLE = SETTLE.replace("LAST", "#KEYS")
ADMIT = ADMIT.replace("GRACE", str(BUDGET_GRACE_MS))
SETTLE = SETTLE.replace("GRACE", str(BUDGET_GRACE_MS))
VOID = VOID.replace("GRACE", str(BUDGET_GRACE_MS))
# Long enough for TCP to give up retransmitting what an abandoned connection sent.
VOID_TTL_MS = 600_000

RENEW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
for i = 1, #KEYS do
  local lease = tonumber(ARGV[2 * i])
  if redis.call('ZADD', KEYS[i], 'XX', 'CH', now + lease, ARGV[2 * i - 1]) == 1 then
    redis.call('PEXPIRE', KEYS[i], lease)
  end
end
return 1
"""


class StoreUnavailable(Exception):
    """Redis did not answer in time (or is known to be down); the limiter applies its policy.
    `sent`: the call may have reached Redis (it timed out), so it may yet take effect."""

    def __init__(self, message: str = "", sent: bool = False) -> None:
        super().__init__(message)
        self.sent = sent


class RedisStore:
    """The limiter's scripts on the shared client, each call timed and judged by `health`
    (services/redis_pool.py, shared with the cache and the breakers)."""

    def __init__(
        self, redis: Redis, prefix: str, timeout_s: float, health: RedisHealth | None = None
    ) -> None:
        self.redis = redis
        self.prefix = prefix
        self.timeout_s = timeout_s
        self._own_health = health is None  # a store of its own (tests): closed with it
        self.health = health if health is not None else RedisHealth()
        self._admit = redis.register_script(ADMIT)
        self._settle = redis.register_script(SETTLE)
        self._void = redis.register_script(VOID)
        self._renew = redis.register_script(RENEW)

    def _key(self, spec: LimitSpec, suffix: str) -> str:
        return f"{{{self.prefix}}}:{spec.key}:{suffix}"

    @property
    def down(self) -> bool:
        return self.health.down

    async def _call(self, script: object, keys: list[str], args: list[str | int]) -> object:
        try:
            # Budget: connect + command.
            call = script(keys=keys, args=args)  # type: ignore[operator]
            return await self.health.call("rate_limit", call, self.timeout_s * 2)
        except RedisUnavailable as exc:
            raise StoreUnavailable(str(exc), sent=exc.sent) from exc

    async def admit(self, request_id: str, specs: list[LimitSpec]) -> Decision:
        keys: list[str] = []
        args: list[str | int] = [request_id]
        for spec in specs:
            keys += [self._key(spec, "z"), self._key(spec, "t")]
            args += [_KINDS[spec.kind], spec.limit, spec.period_ms, spec.cost, spec.floor]
        raw = await self._call(self._admit, [*keys, self._void_key(request_id)], args)
        assert isinstance(raw, list)
        out = [int(x) for x in raw]
        if out[0] == -1:  # an id voided before: only a reused request id gets here
            raise StoreUnavailable("request id voided")
        states = [LimitState(out[i], out[i + 1]) for i in range(4, len(out), 2)]
        return Decision(
            allowed=out[0] == 1,
            now_ms=out[1],
            states=states,
            rejected=out[2] - 1 if out[2] else None,
            retry_ms=out[3],
        )

    async def settle(
        self,
        request_id: str,
        admitted_ms: int,
        settlements: list[Settlement],
        leases: list[LimitSpec],
    ) -> list[int]:
        keys, args = self._settle_args(request_id, admitted_ms, settlements, leases)
        raw = await self._call(self._settle, keys, args)
        return [int(x) for x in raw] if isinstance(raw, list) else []

    def _settle_args(
        self,
        request_id: str,
        admitted_ms: int,
        settlements: list[Settlement],
        leases: list[LimitSpec],
    ) -> tuple[list[str], list[str | int]]:
        keys: list[str] = []
        args: list[str | int] = [request_id, admitted_ms, len(settlements)]
        for s in settlements:
            keys += [self._key(s.spec, "z"), self._key(s.spec, "t")]
            args += [_KINDS[s.spec.kind], s.reserved, s.used, s.spec.period_ms]
        keys += [self._key(spec, "z") for spec in leases]
        return keys, args

    async def void(self, request_id: str, specs: list[LimitSpec]) -> None:
        """Undo an admission whose reply never came, now or whenever it arrives (VOID)."""
        windows = [Settlement(s, s.cost, 0) for s in specs if s.kind in ("window", "budget")]
        leases = [s for s in specs if s.kind == "concurrency"]
        keys, args = self._settle_args(request_id, 0, windows, leases)
        await self._call(self._void, [*keys, self._void_key(request_id)], [*args, VOID_TTL_MS])

    def _void_key(self, request_id: str) -> str:
        return f"{{{self.prefix}}}:void:{request_id}"

    async def renew(self, leases: list[tuple[str, LimitSpec]]) -> None:
        if not leases:
            return
        keys = [self._key(spec, "z") for _, spec in leases]
        args: list[str | int] = []
        for request_id, spec in leases:
            args += [request_id, spec.period_ms]
        await self._call(self._renew, keys, args)

    async def ping(self) -> bool:
        try:
            async with asyncio.timeout(self.timeout_s * 2):
                return bool(await self.redis.ping())  # type: ignore[misc]
        except (RedisError, OSError, TimeoutError):
            return False

    async def aclose(self) -> None:
        # The client (and, in the app, the health) are shared: their owner closes them.
        if self._own_health:
            await self.health.aclose()
