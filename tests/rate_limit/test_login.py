"""Login throttling (services/rate_limit/login.py): growing delays per (account, client), never a
lock a stranger can put on an account, and a per-client bound that spares other clients and
accounts that logged in from there before. Through the app (httpx, real argon2, real database)
with the in-memory state and with the real Redis, and on two throttles sharing Redis (two
workers)."""

from __future__ import annotations

import contextlib
import dataclasses
import re
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from llm_api.core.exceptions import RateLimitError, ServiceUnavailableError
from llm_api.services.rate_limit.limiter import RateLimiter
from llm_api.services.rate_limit.login import (
    LoginPolicy,
    LoginThrottle,
    MemoryLogins,
    account_subject,
    client_subject,
)
from llm_api.services.rate_limit.redis_store import RedisStore
from llm_api.services.redis_pool import build_redis
from tests.conftest import create_account
from tests.rate_limit.conftest import (
    REDIS_URL,
    RedisServer,
    limits_on,
    redis_store_ctx,
    unique_prefix,
)

ATTACKER = "203.0.113.66"
OWNER = "198.51.100.7"
TOKEN = "/v1/auth/token"


@contextlib.asynccontextmanager
async def from_address(app: Any, host: str) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app, client=(host, 40000))
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
        yield c


async def login(c: httpx.AsyncClient, email: str, password: str) -> httpx.Response:
    return await c.post(TOKEN, data={"username": email, "password": password})


def slow_delays(limiter: RateLimiter) -> None:
    """Delays of minutes, not seconds: a slow test machine cannot let one run out between two
    requests (a pass/fail that would depend on timing). The growth itself is tested below on a
    controlled clock."""
    old = limiter.login
    assert old is not None
    policy = dataclasses.replace(old.policy, base_delay_ms=600_000, max_delay_ms=3_600_000)
    limiter.login = LoginThrottle(policy, old.redis, old.failure_mode)


def shape(r: httpx.Response) -> tuple[int, bool, str, str]:
    """What a caller can observe of an answer, the wait's digits aside."""
    body = r.json()["error"]
    message = re.sub(r"\d+", "N", body["message"])
    return r.status_code, "retry-after" in r.headers, body["type"], message


@pytest.mark.parametrize("backend", ["memory", "redis"])
async def test_hammering_an_account_does_not_lock_out_its_owner(
    app: Any, tmp_path: Path, backend: str
) -> None:
    async with (
        limits_on(app, tmp_path, backend) as limiter,
        from_address(app, ATTACKER) as attacker,
        from_address(app, OWNER) as owner,
    ):
        slow_delays(limiter)
        acct = await create_account(app)
        hammered = [await login(attacker, acct.email, "wrong-password") for _ in range(25)]
        assert [r.status_code for r in hammered] == [401] * 5 + [429] * 20
        refusal = hammered[-1]
        assert refusal.json()["error"]["type"] == "rate_limit_error"
        assert refusal.json()["error"]["code"] == "rate_limit_exceeded"
        assert int(refusal.headers["retry-after"]) >= 1
        # The attacker's own right guess waits too: a throttled attempt is not even checked.
        assert (await login(attacker, acct.email, acct.password)).status_code == 429

        # The owner, from elsewhere, meanwhile: a typo is a plain 401, the password works.
        assert (await login(owner, acct.email, "typo-password")).status_code == 401
        ok = await login(owner, acct.email, acct.password)
        assert ok.status_code == 200 and ok.json()["access_token"]

        # No enumeration: a name with no account is throttled exactly alike.
        ghost = f"nobody-{uuid.uuid4().hex[:8]}@example.com"
        probed = [await login(attacker, ghost, "wrong-password") for _ in range(25)]
        assert [r.status_code for r in probed] == [r.status_code for r in hammered]
        assert shape(probed[0]) == shape(hammered[0])
        assert shape(probed[-1]) == shape(refusal)


@pytest.mark.parametrize("backend", ["memory", "redis"])
async def test_a_success_resets_the_pair(app: Any, tmp_path: Path, backend: str) -> None:
    async with limits_on(app, tmp_path, backend) as limiter, from_address(app, OWNER) as owner:
        slow_delays(limiter)
        acct = await create_account(app)
        for _ in range(4):
            assert (await login(owner, acct.email, "typo-password")).status_code == 401
        assert (await login(owner, acct.email, acct.password)).status_code == 200
        codes = [(await login(owner, acct.email, "typo-password")).status_code for _ in range(6)]
        assert codes == [401] * 5 + [429]  # a fresh allowance, not the 4 failures before


@pytest.mark.parametrize("backend", ["memory", "redis"])
async def test_the_per_client_bound_spares_other_clients_and_known_accounts(
    app: Any, tmp_path: Path, backend: str
) -> None:
    async with (
        limits_on(app, tmp_path, backend, rate_limit_login_per_client="5/hour"),
        from_address(app, ATTACKER) as shared,  # e.g. one NAT or an untrusted proxy
        from_address(app, OWNER) as elsewhere,
    ):
        regular = await create_account(app)
        assert (await login(shared, regular.email, regular.password)).status_code == 200
        stuffing = [
            (await login(shared, f"victim-{i}-{uuid.uuid4().hex[:6]}@example.com", "pw-guess"))
            for i in range(6)
        ]
        assert [r.status_code for r in stuffing] == [401] * 4 + [429] * 2
        assert "this client" in stuffing[-1].json()["error"]["message"]
        assert int(stuffing[-1].headers["retry-after"]) >= 1
        # The account that logged in from this address before still gets in from it ...
        assert (await login(shared, regular.email, regular.password)).status_code == 200
        # ... and other clients are not affected at all.
        newcomer = await create_account(app)
        assert (await login(elsewhere, newcomer.email, newcomer.password)).status_code == 200


class FakeClock:
    def __init__(self) -> None:
        self.ms = 1_000_000

    def __call__(self) -> int:
        return self.ms


async def waits(throttle: LoginThrottle, email: str, client: str) -> int:
    """0 when the attempt is admitted, else the wait in ms it was refused with."""
    try:
        await throttle.check(email, client)
    except RateLimitError as exc:
        return int(exc.headers["retry-after-ms"])
    return 0


async def test_delays_double_up_to_the_cap() -> None:
    policy = LoginPolicy(
        free_attempts=5, max_delay_ms=900_000, client_limit=0, client_period_ms=60_000
    )
    throttle = LoginThrottle(policy, None)
    clock = FakeClock()
    throttle.memory.now_ms = clock  # type: ignore[method-assign]
    assert [await waits(throttle, "a@example.com", OWNER) for _ in range(5)] == [0] * 5
    seen = []
    for _ in range(12):
        wait = await waits(throttle, "a@example.com", OWNER)
        seen.append(wait)
        clock.ms += wait - 1
        assert await waits(throttle, "a@example.com", OWNER) == 1  # not a millisecond early
        clock.ms += 1
        assert await waits(throttle, "a@example.com", OWNER) == 0
    assert seen == [1000 * 2**i for i in range(10)] + [900_000, 900_000]
    # Failures are forgotten an hour after the last attempt.
    clock.ms += 3_600_000
    assert [await waits(throttle, "a@example.com", OWNER) for _ in range(5)] == [0] * 5


def test_ipv6_clients_are_grouped_by_64() -> None:
    assert client_subject("2001:db8:1:2:aaaa::1") == client_subject("2001:db8:1:2:ffff::9")
    assert client_subject("2001:db8:1:2::1") != client_subject("2001:db8:1:3::1")
    assert client_subject("::ffff:192.0.2.1") == client_subject("192.0.2.1") == "192.0.2.1"


async def test_workers_sharing_redis_share_the_count() -> None:
    """Two throttles on one Redis prefix are two workers (or replicas): attempts spread over
    them count together, and the delays the script stores match the policy's."""
    policy = LoginPolicy(
        free_attempts=3, max_delay_ms=900_000, client_limit=0, client_period_ms=60_000
    )
    async with redis_store_ctx() as store_a, redis_store_ctx() as store_b:
        store_b.prefix = store_a.prefix
        worker_a = LoginThrottle(policy, store_a)
        worker_b = LoginThrottle(policy, store_b)
        email = f"shared-{uuid.uuid4().hex[:8]}@example.com"
        assert await waits(worker_a, email, OWNER) == 0
        assert await waits(worker_b, email, OWNER) == 0
        assert await waits(worker_a, email, OWNER) == 0  # the 3rd: the next waits 1 s
        refused = await waits(worker_b, email, OWNER)
        assert 0 < refused <= 1000
        assert await waits(worker_b, email, ATTACKER) == 0  # another client: its own count

        redis = Redis.from_url(REDIS_URL)
        try:
            key = f"{{{store_a.prefix}}}:login:pair:{account_subject(email)}:{OWNER}"
            assert await redis.pttl(key) > 3_500_000  # forgotten after an hour, not never
            await redis.hset(key, "u", 0)  # as if the delay had passed
            assert await waits(worker_b, email, OWNER) == 0
            assert 1000 < await waits(worker_a, email, OWNER) <= 2000
            await worker_a.succeeded(email, OWNER)
            assert not await redis.exists(key)
        finally:
            await redis.aclose()
        assert await waits(worker_b, email, OWNER) == 0


def test_memory_state_is_bounded() -> None:
    policy = LoginPolicy(free_attempts=1, max_delay_ms=900_000, client_limit=0, client_period_ms=1)
    memory = MemoryLogins(policy, max_entries=10)
    clock = FakeClock()
    memory.now_ms = clock  # type: ignore[method-assign]
    assert memory.check("attacker-pair", ATTACKER) == (0, 0)  # its next attempt waits 1 s
    for i in range(50):
        memory.check(f"pair-{i}", OWNER)
        assert memory.check("attacker-pair", ATTACKER)[0] == 1  # still waiting, kept in use
    assert len(memory._pairs) + len(memory._known) + len(memory._clients) <= 10


@pytest.mark.parametrize("mode", ["local", "closed"])
async def test_redis_outage_follows_the_failure_mode(private_redis: RedisServer, mode: str) -> None:
    """`local`: this process keeps throttling in memory (never unlimited); `closed`: 503."""
    policy = LoginPolicy(
        free_attempts=2, max_delay_ms=900_000, client_limit=0, client_period_ms=60_000
    )
    store = RedisStore(build_redis(private_redis.url, 0.5), unique_prefix(), 0.5)
    throttle = LoginThrottle(policy, store, mode)
    try:
        assert await waits(throttle, "a@example.com", OWNER) == 0  # on Redis
        private_redis.stop()
        if mode == "closed":
            with pytest.raises(ServiceUnavailableError):
                await throttle.check("a@example.com", OWNER)
            return
        assert [await waits(throttle, "a@example.com", OWNER) for _ in range(3)][:2] == [0, 0]
        assert await waits(throttle, "a@example.com", OWNER) > 0
    finally:
        await store.aclose()
        await store.redis.aclose()
