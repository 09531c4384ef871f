"""Login throttling after OWASP's Authentication Cheat Sheet and ASVS V2.2: growing delays per
(account, client), never a lock that a stranger can put on an account.

- Per (account, client) pair: the first `free_attempts` attempts go through at once; after that
  each attempt must wait a delay that doubles (1 s, 2 s, 4 s, ... up to `max_delay_ms`) after
  the previous one. The count is forgotten an hour after the last attempt, and a success resets
  it. Another client (the account's owner elsewhere) has a pair of its own and is never slowed
  down by an attacker hammering the account.
- Per client, over every account: a generous token bucket (GCRA, as nginx's `limit_req`) against
  credential stuffing. It slows that one client only, and skips the pairs that logged in
  successfully in the last 30 days, so a returning user behind a busy shared address is not
  held up by strangers trying other accounts from it.

Every attempt counts when it is checked (before the password hash), so parallel attempts cannot
slip through together; a success then clears the pair. The account is the submitted name
(hashed), whether or not such a user exists, so the answers tell nothing about which accounts
exist. With LLM_API_REDIS_URL the state lives in Redis (one script call per check, shared by
every worker and replica); otherwise, and as the `local` fallback while Redis is down, in this
process's memory.
"""

from __future__ import annotations

import hashlib
import ipaddress
import math
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import structlog
from limits import parse as parse_limit

from llm_api.core.config import Settings
from llm_api.core.exceptions import RateLimitError, ServiceUnavailableError
from llm_api.core.metrics import RATE_LIMIT_REJECTIONS
from llm_api.services.rate_limit.headers import duration
from llm_api.services.rate_limit.redis_store import RedisStore, StoreUnavailable

log = structlog.get_logger(__name__)

BASE_DELAY_MS = 1_000
FORGET_MS = 3_600_000  # failures are forgotten an hour after the last attempt
KNOWN_MS = 30 * 86_400_000  # a pair that logged in is "known" to the per-client bound this long

# Result of a check: (0 admitted | 1 this pair waits | 2 this client waits, wait in ms).
ADMITTED, PAIR_WAITS, CLIENT_WAITS = 0, 1, 2

CHECK = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local free, base, maxd = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local forget, climit, cperiod = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local pair = redis.call('HMGET', KEYS[1], 'f', 'u')
local f, u = tonumber(pair[1] or '0'), tonumber(pair[2] or '0')
if now < u then return {1, u - now} end
if climit > 0 and redis.call('EXISTS', KEYS[2]) == 0 then
  local emission = math.ceil(cperiod / climit)
  local tat = tonumber(redis.call('GET', KEYS[3]) or '0')
  if tat < now then tat = now end
  if tat + emission - cperiod > now then return {2, tat + emission - cperiod - now} end
  redis.call('SET', KEYS[3], string.format('%d', tat + emission), 'PX', tat + emission - now)
end
f = f + 1
u = 0
if f >= free then
  local d = maxd
  if f - free < 40 then d = math.min(maxd, base * 2 ^ (f - free)) end
  u = now + d
end
redis.call('HSET', KEYS[1], 'f', f, 'u', string.format('%d', u))
redis.call('PEXPIRE', KEYS[1], math.max(forget, u - now))
return {0, 0}
"""

SUCCEED = """
redis.call('DEL', KEYS[1])
redis.call('SET', KEYS[2], '1', 'PX', ARGV[1])
return 1
"""


@dataclass(frozen=True, slots=True)
class LoginPolicy:
    free_attempts: int
    max_delay_ms: int
    client_limit: int  # attempts per client over all accounts in `client_period_ms` (0: none)
    client_period_ms: int
    base_delay_ms: int = BASE_DELAY_MS
    forget_ms: int = FORGET_MS
    known_ms: int = KNOWN_MS

    @classmethod
    def from_settings(cls, settings: Settings) -> LoginPolicy:
        per_client = parse_limit(settings.rate_limit_login_per_client)
        return cls(
            free_attempts=settings.rate_limit_login_free_attempts,
            max_delay_ms=settings.rate_limit_login_max_delay_seconds * 1000,
            client_limit=int(per_client.amount),
            client_period_ms=int(per_client.get_expiry() * 1000),
        )

    def delay_ms(self, failures: int) -> int:
        """The wait after `failures` attempts of one pair that did not succeed."""
        if failures < self.free_attempts:
            return 0
        if failures - self.free_attempts >= 40:  # 2**40 s is past any cap
            return self.max_delay_ms
        return min(self.max_delay_ms, self.base_delay_ms << (failures - self.free_attempts))


def client_subject(host: str | None) -> str:
    """The client a login comes from: its address, an IPv6 one grouped by /64 (one host or
    site gets a whole /64 and can rotate through it at will)."""
    if not host:
        return "unknown"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host[:64]
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


def account_subject(username: str) -> str:
    """No e-mail addresses in Redis keys or memory; the same for names with no account."""
    return hashlib.sha256(username.strip().lower().encode()).hexdigest()[:32]


class MemoryLogins:
    """The same state as the Redis script, in this process. Bounded at `max_entries`: expired
    entries go first, then the least recently touched (logged): an attacker would have to keep
    that many other pairs busier than their own to have their own delay forgotten."""

    def __init__(self, policy: LoginPolicy, max_entries: int = 100_000) -> None:
        self.policy = policy
        self.max_entries = max_entries
        self._pairs: OrderedDict[str, tuple[int, int, int]] = OrderedDict()  # f, until, expiry
        self._known: OrderedDict[str, int] = OrderedDict()  # expiry
        self._clients: OrderedDict[str, int] = OrderedDict()  # GCRA theoretical arrival time
        self._swept_ms = -1_000_000

    @staticmethod
    def now_ms() -> int:
        return int(time.monotonic() * 1000)

    def check(self, pair: str, client: str) -> tuple[int, int]:
        p, now = self.policy, self.now_ms()
        failures, until, expiry = self._pairs.get(pair, (0, 0, 0))
        if expiry <= now:
            failures, until = 0, 0
        if now < until:
            self._pairs.move_to_end(pair)
            return PAIR_WAITS, until - now
        if p.client_limit and self._known.get(pair, 0) <= now:
            emission = -(-p.client_period_ms // p.client_limit)
            tat = max(self._clients.get(client, 0), now)
            if tat + emission - p.client_period_ms > now:
                return CLIENT_WAITS, tat + emission - p.client_period_ms - now
            self._put(self._clients, client, tat + emission)
        failures += 1
        delay = p.delay_ms(failures)
        until = now + delay if delay else 0
        self._put(self._pairs, pair, (failures, until, now + max(p.forget_ms, delay)))
        return ADMITTED, 0

    def forget(self, pair: str) -> None:
        self._pairs.pop(pair, None)

    def succeed(self, pair: str) -> None:
        self._pairs.pop(pair, None)
        self._put(self._known, pair, self.now_ms() + self.policy.known_ms)

    def _put(self, table: OrderedDict[str, Any], key: str, value: Any) -> None:
        table[key] = value
        table.move_to_end(key)
        if len(self._pairs) + len(self._known) + len(self._clients) > self.max_entries:
            self._make_room()

    def _make_room(self) -> None:
        now = self.now_ms()
        swept = now - self._swept_ms >= 1000  # a full sweep at most once a second, not per login
        if swept:
            self._swept_ms = now
            self._sweep(now)
        while len(self._pairs) + len(self._known) + len(self._clients) > self.max_entries:
            largest: OrderedDict[str, Any] = max(self._known, self._pairs, self._clients, key=len)
            largest.popitem(last=False)
            if swept:  # once a second at most
                swept = False
                log.warning("login_throttle_memory_full", max_entries=self.max_entries)

    def _sweep(self, now: int) -> None:
        for key in [k for k, v in self._pairs.items() if v[2] <= now]:
            del self._pairs[key]
        for table in (self._known, self._clients):  # values: expiry, or the TAT (its expiry)
            for key in [k for k, at in table.items() if at <= now]:
                del table[key]


class LoginThrottle:
    def __init__(
        self,
        policy: LoginPolicy,
        redis: RedisStore | None,
        failure_mode: str = "local",
    ) -> None:
        self.policy = policy
        self.redis = redis
        self.failure_mode = failure_mode
        self.memory = MemoryLogins(policy)
        if redis is not None:
            self._check = redis.redis.register_script(CHECK)
            self._succeed = redis.redis.register_script(SUCCEED)

    def _keys(self, pair: str, client: str) -> list[str]:
        assert self.redis is not None
        base = f"{{{self.redis.prefix}}}:login"
        return [f"{base}:pair:{pair}", f"{base}:known:{pair}", f"{base}:client:{client}"]

    async def check(self, username: str, client_host: str | None) -> None:
        """Count one login attempt, or raise 429 (with Retry-After) when it must wait."""
        client = client_subject(client_host)
        pair = f"{account_subject(username)}:{client}"
        p = self.policy
        outcome: tuple[int, int] | None = None
        if self.redis is not None:
            args: list[str | int] = [
                p.free_attempts, p.base_delay_ms, p.max_delay_ms,
                p.forget_ms, p.client_limit, p.client_period_ms,
            ]  # fmt: skip
            try:
                raw = await self.redis._call(self._check, self._keys(pair, client), args)
                assert isinstance(raw, list)
                outcome = (int(raw[0]), int(raw[1]))
            except StoreUnavailable:
                if self.failure_mode == "closed":
                    raise ServiceUnavailableError(
                        "Rate limiting is temporarily unavailable; retry shortly.", retry_after=1
                    ) from None
                if self.failure_mode == "open":
                    return
        if outcome is None:
            outcome = self.memory.check(pair, client)
        kind, wait_ms = outcome
        if kind == ADMITTED:
            return
        scope = "pair" if kind == PAIR_WAITS else "client"
        RATE_LIMIT_REJECTIONS.labels(limit=f"{scope}_login").inc()
        wait_ms = max(1, wait_ms)
        who = "this account from this client" if kind == PAIR_WAITS else "this client"
        raise RateLimitError(
            f"Too many login attempts for {who}. Please try again in {duration(wait_ms)}.",
            headers={
                "Retry-After": str(max(1, math.ceil(wait_ms / 1000))),
                "retry-after-ms": str(wait_ms),
            },
        )

    async def succeeded(self, username: str, client_host: str | None) -> None:
        """A correct password: forget this pair's failures and remember it as known."""
        client = client_subject(client_host)
        pair = f"{account_subject(username)}:{client}"
        if self.redis is not None:
            try:
                await self.redis._call(
                    self._succeed, self._keys(pair, client)[:2], [str(self.policy.known_ms)]
                )
            except StoreUnavailable:
                log.warning("login_throttle_reset_failed")
            else:
                self.memory.forget(pair)  # failures counted here while Redis was down
                return
        self.memory.succeed(pair)
