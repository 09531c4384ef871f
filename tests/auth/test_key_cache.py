"""The in-process cache of verified API keys (services/auth/key_cache.py): a cached key skips the
database until its TTL; revocation, deactivation and tier changes made through the API apply at
once anyway; failures are never cached."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from sqlalchemy import update

from llm_api.db.engine import Database
from llm_api.db.tables import ApiKey, utcnow
from llm_api.services.auth import api_keys
from llm_api.services.auth.key_cache import ApiKeyCache
from llm_api.services.auth.principal import Authenticator
from tests.auth.conftest import AuthEnv
from tests.conftest import Account, create_account


def authenticator(env: AuthEnv) -> Authenticator:
    auth: Authenticator = env.app.state.llm_api.auth.authenticator
    return auth


@contextmanager
def ttl(env: AuthEnv, seconds: float) -> Iterator[ApiKeyCache[object]]:
    """This test's TTL on the shared app (entries are cleared before and after)."""
    cache = authenticator(env).keys
    before = cache.ttl
    cache.ttl = seconds
    cache.clear()
    try:
        yield cache  # type: ignore[misc]
    finally:
        cache.ttl = before
        cache.clear()


async def revoke_in_database(env: AuthEnv, account: Account) -> None:
    """Behind the API's back (an operator's SQL): nothing tells the cache."""
    async with env.app.state.llm_api.db.sessions.begin() as db:
        query = update(ApiKey).where(ApiKey.id == account.key_id)
        await db.execute(query.values(revoked_at=utcnow()))


async def status(env: AuthEnv, account: Account) -> int:
    return (await env.http.get("/v1/models", headers=account.headers)).status_code


async def test_cached_key_skips_the_database_until_the_ttl(env: AuthEnv) -> None:
    account = await create_account(env.app)
    with ttl(env, 2.0) as cache:  # room for a slow database write on a loaded machine
        assert await status(env, account) == 200
        assert len(cache) == 1
        await revoke_in_database(env, account)
        assert await status(env, account) == 200  # served from the cache: no database read
        await asyncio.sleep(2.1)
        assert await status(env, account) == 401  # expired: read again, found revoked


async def test_without_the_cache_every_request_reads_the_database(env: AuthEnv) -> None:
    account = await create_account(env.app)
    with ttl(env, 0) as cache:
        assert await status(env, account) == 200
        assert cache.get(api_keys.digest(account.api_key)) is None  # kept for outages only
        await revoke_in_database(env, account)
        assert await status(env, account) == 401


async def test_revocation_through_the_api_applies_at_once(env: AuthEnv) -> None:
    own, other = await create_account(env.app), await create_account(env.app)
    with ttl(env, 60):
        assert await status(env, own) == 200 and await status(env, other) == 200
        r = await env.http.delete(f"/v1/keys/{own.key_id}", headers=own.headers)
        assert r.status_code == 200, r.text
        assert await status(env, own) == 401
        r = await env.http.delete(f"/v1/admin/keys/{other.key_id}", headers=env.admin.headers)
        assert r.status_code == 200, r.text
        assert await status(env, other) == 401


async def test_deactivation_and_tier_change_apply_at_once(env: AuthEnv) -> None:
    account = await create_account(env.app)
    with ttl(env, 60):
        assert await status(env, account) == 200
        users = f"/v1/admin/users/{account.user_id}"
        r = await env.http.patch(users, json={"is_active": False}, headers=env.admin.headers)
        assert r.status_code == 200, r.text
        assert await status(env, account) == 401
        r = await env.http.patch(users, json={"is_active": True}, headers=env.admin.headers)
        assert r.status_code == 200 and await status(env, account) == 200
        # The cached principal carried tier "free"; the upgrade is seen on the next request.
        await env.http.patch(users, json={"tier": "paid"}, headers=env.admin.headers)
        assert authenticator(env).cached(account.api_key) is None
        assert await status(env, account) == 200
        cached = authenticator(env).cached(account.api_key)
        assert cached is not None and cached.tier == "paid"


async def test_failures_are_never_cached(env: AuthEnv) -> None:
    account = await create_account(env.app)
    with ttl(env, 60) as cache:
        await revoke_in_database(env, account)
        assert await status(env, account) == 401
        assert len(cache) == 0 and authenticator(env).cached(account.api_key) is None
        assert cache.during_outage(api_keys.digest(account.api_key)) is None


def test_a_lookup_that_raced_a_clear_is_not_stored() -> None:
    cache: ApiKeyCache[str] = ApiKeyCache(60)
    began = cache.generation  # a lookup reads the row...
    cache.clear()  # ...while a revocation commits
    cache.put("digest", "stale principal", began)
    assert cache.get("digest") is None
    cache.put("digest", "fresh principal", cache.generation)
    assert cache.get("digest") == "fresh principal"


def test_the_cache_is_bounded() -> None:
    cache: ApiKeyCache[int] = ApiKeyCache(60, max_entries=3)
    for i in range(5):
        cache.put(f"k{i}", i, cache.generation)
    assert len(cache) == 3 and cache.get("k0") is None and cache.get("k4") == 4


async def test_a_cached_key_rides_out_a_database_outage_others_get_503(
    env: AuthEnv, tmp_path: Path
) -> None:
    """The trade-off, pinned: for up to the TTL a verified key needs no database; a key not in
    the cache still needs it, and a database failure is then a 503, never anonymous."""
    if env.kind != "sqlite":
        pytest.skip("one database is enough: the failure is injected by swapping the engine")
    state = env.app.state.llm_api
    known, unknown = await create_account(env.app), await create_account(env.app)
    with ttl(env, 60):
        assert await status(env, known) == 200
        good = state.db
        state.db = Database.from_settings(
            state.settings, f"sqlite+aiosqlite:///{tmp_path}/missing-dir/nope/x.db"
        )
        try:
            assert await status(env, known) == 200
            assert await status(env, unknown) == 503
        finally:
            await state.db.dispose()
            state.db = good
