"""A budget's spend survives the loss of its counter: Redis flushed (no persistence, eviction,
failover) or an embedded server restarted. The budget book loads each budget's spend in its
period from the ledger with the rules (one grouped query), and a store that has no counter for
the period starts it from there (LimitSpec.floor), never from 0, and never lowers one it has."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime
from pathlib import Path

import openai
import pytest
from sqlalchemy import func, select

from llm_api.db import migrate
from llm_api.db.engine import Database
from llm_api.db.tables import UsageRecord
from llm_api.services.money.budgets import BudgetRule, ledger_floors
from llm_api.services.rate_limit.memory_store import MemoryStore
from llm_api.services.rate_limit.types import LimitSpec, Settlement, Store
from tests.conftest import MODEL, create_account, postgres_database, require_service
from tests.conftest import test_settings as settings_for
from tests.money.conftest import Priced, priced_app
from tests.money.test_budgets_http import auth, team_with
from tests.rate_limit.conftest import delete_prefix, limits_on, redis_store_ctx


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[Store]:
    if request.param == "memory":
        yield MemoryStore()
        return
    async with redis_store_ctx() as redis_store:  # asserts no key lives without a TTL
        yield redis_store


def budget(cost: int, floor: int, subject: str) -> LimitSpec:
    return LimitSpec(
        "budget", "monthly budget", "team", subject, "budget", "cost", 1000, 3_600_000, cost,
        floor,
    )  # fmt: skip


async def test_a_missing_counter_starts_from_the_floor(store: Store) -> None:
    subject = f"t1:{uuid.uuid4().hex}:2026-12-01"
    first = uuid.uuid4().hex
    d = await store.admit(first, [budget(300, 500, subject)])
    assert d.allowed and d.states[0].remaining == 200  # 500 spent before + 300 reserved
    assert not (await store.admit(uuid.uuid4().hex, [budget(300, 500, subject)])).allowed
    # Settled on top of the floor.
    settle = [Settlement(budget(300, 500, subject), 300, 100)]
    assert await store.settle(first, d.now_ms, settle, []) == [600]
    # An existing counter (600) is the truth: a higher floor (a ledger that caught up with it)
    # does not raise it, a lower one does not lower it.
    d = await store.admit(uuid.uuid4().hex, [budget(0, 990, subject)])
    assert d.allowed and d.states[0].remaining == 400
    d = await store.admit(uuid.uuid4().hex, [budget(400, 0, subject)])
    assert d.allowed and d.states[0].remaining == 0
    assert not (await store.admit(uuid.uuid4().hex, [budget(1, 0, subject)])).allowed
    # A period without spend in the ledger starts from 0.
    d = await store.admit(uuid.uuid4().hex, [budget(300, 0, f"t2:{uuid.uuid4().hex}:x")])
    assert d.allowed and d.states[0].remaining == 700


def test_the_local_fallback_shares_what_the_floor_leaves() -> None:
    spec = budget(10, 600, "t:b:p")
    assert spec.scaled(2).limit == 800  # 600 spent; each of 2 processes may add 200
    assert budget(10, 0, "t:b:p").scaled(2).limit == 500


def record(day: date, cost: int, **who: str) -> UsageRecord:
    return UsageRecord(
        request_id=uuid.uuid4().hex, created_at=datetime(day.year, day.month, day.day, tzinfo=UTC),
        day=day, model="m", endpoint="chat", status=200, latency_ms=1.0, cost_nanos=cost, **who,
    )  # fmt: skip


@pytest.fixture(params=["sqlite", "postgres"])
async def database(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Database]:
    if request.param == "sqlite":
        db = Database.from_settings(settings_for(tmp_path))
        await migrate.upgrade(db.engine)
        yield db
        await db.dispose()
        return
    require_service("PostgreSQL", "127.0.0.1", 5432)
    async with postgres_database() as url:
        db = Database.from_settings(settings_for(tmp_path), url)
        await migrate.upgrade(db.engine)
        yield db
        await db.dispose()


async def test_ledger_floors_per_scope_and_period(database: Database) -> None:
    now = datetime(2026, 12, 16, 12, tzinfo=UTC)  # a Wednesday: week from the 14th
    t, u, k, idle = (uuid.uuid4().hex[:20] for _ in range(4))
    async with database.sessions.begin() as session:
        session.add_all([
            record(date(2026, 12, 16), 100, team_id=t, user_id=u),
            record(date(2026, 12, 14), 20, team_id=t),
            record(date(2026, 12, 2), 3, team_id=t),
            record(date(2026, 11, 30), 4000, team_id=t),
            record(date(2026, 12, 16), 1, team_id=uuid.uuid4().hex[:20]),  # another team
            record(date(2026, 12, 15), 7, user_id=u, key_id=k),
            record(date(2026, 12, 13), 50, user_id=u, key_id=k),
        ])  # fmt: skip
    rules = [
        BudgetRule("td", "team", t, "day", 10**9, None),
        BudgetRule("tm", "team", t, "month", 10**9, None),
        BudgetRule("tn", "team", t, "none", 10**9, None),
        BudgetRule("uw", "user", u, "week", 10**9, None),
        BudgetRule("km", "key", k, "month", 10**9, None),
        BudgetRule("idle", "team", idle, "day", 10**9, None),
    ]
    async with database.sessions() as session:
        floors = await ledger_floors(session, rules, now)
    assert floors == {
        ("td", "2026-12-16"): 100,
        ("tm", "2026-12-01"): 123,
        ("tn", "none"): 4123,
        ("uw", "2026-12-14"): 107,
        ("km", "2026-12-01"): 57,
        ("idle", "2026-12-16"): 0,
    }
    async with database.sessions() as session:
        assert await ledger_floors(session, [], now) == {}


async def spend_until(client: openai.AsyncOpenAI, stop_at: float | None) -> tuple[float, bool]:
    """Short requests (each reserving the same: same prompt, same max_tokens; not cached, as
    temperature > 0) until refused (True) or `stop_at` dollars were spent."""
    spent = 0.0
    for _ in range(40):
        if stop_at is not None and spent >= stop_at:
            return spent, False
        try:
            r = await client.chat.completions.create(
                model=MODEL, max_tokens=8, temperature=0.9,
                messages=[{"role": "user", "content": "Say hi."}],
            )  # fmt: skip
        except openai.RateLimitError as exc:
            assert exc.code == "insufficient_quota"
            return spent, True
        assert r.usage is not None
        spent += (r.usage.model_extra or {})["cost"]
    raise AssertionError("the budget never ran out")


async def ledger_total(priced: Priced, **where: str) -> int:
    async with priced.state.db.sessions() as session:
        query = select(func.coalesce(func.sum(UsageRecord.cost_nanos), 0)).filter_by(**where)
        return int(await session.scalar(query) or 0)


@pytest.mark.model
@pytest.mark.redis
async def test_spend_before_a_redis_flush_still_counts(priced: Priced, tmp_path: Path) -> None:
    http = priced.http
    me = await create_account(priced.app)  # not the package's account: its spend is checked
    team_id, service_key = await team_with(priced, {me.user_id: "owner"})
    body = {"scope": "team", "subject_id": team_id, "period": "month", "hard_limit_usd": "0.05"}
    r = await http.post("/v1/budgets", json=body, headers=auth(me))
    assert r.status_code == 201, r.text
    book = priced.state.money.budgets
    client = openai.AsyncOpenAI(
        base_url="http://127.0.0.1/v1", api_key=service_key, http_client=http, max_retries=0
    )
    async with limits_on(priced.app, tmp_path, "redis", rate_limit_enabled=False) as limiter:
        limiter.budgets = book  # the app's rules; the counters in this test's Redis prefix
        before, refused = await spend_until(client, 0.025)
        assert not refused
        # The ledger has it and the book reloads (every LLM_API_BUDGET_REFRESH_SECONDS);
        # then Redis loses every key of the limiter's.
        await priced.flush()
        await book.refresh()
        await delete_prefix(limiter.store.prefix)  # type: ignore[attr-defined]
        after, refused = await spend_until(client, None)
    assert refused
    await priced.flush()
    ledger = await ledger_total(priced, team_id=team_id)
    assert ledger == round((before + after) * 1e9)
    assert ledger <= 50_000_000, "the spend before the flush was forgotten"


@pytest.mark.model
async def test_an_embedded_server_restarts_with_the_spend_counted(tmp_path: Path) -> None:
    """No Redis: counters in memory. A new app on the same SQLite database starts from the
    ledger's spend."""
    async with priced_app(tmp_path) as first:
        me = first.account
        body = {
            "scope": "user", "subject_id": me.user_id, "period": "day", "hard_limit_usd": "0.03"
        }  # fmt: skip
        r = await first.http.post("/v1/budgets", json=body, headers=auth(me))
        assert r.status_code == 201, r.text
        client = openai.AsyncOpenAI(
            base_url="http://127.0.0.1/v1", api_key=me.api_key, http_client=first.http,
            max_retries=0,
        )  # fmt: skip
        spent, refused = await spend_until(client, None)
        assert refused and spent > 0
    # The same server again (its usage was drained into the database on shutdown).
    async with priced_app(tmp_path) as second:
        client = openai.AsyncOpenAI(
            base_url="http://127.0.0.1/v1", api_key=me.api_key, http_client=second.http,
            max_retries=0,
        )  # fmt: skip
        more, refused = await spend_until(client, None)
        assert refused
        # What the first server spent still counts: together they kept to the budget (a fresh
        # count would have let the second spend up to the whole budget again).
        await second.flush()
        ledger = await ledger_total(second, user_id=me.user_id)
        assert ledger == round((spent + more) * 1e9)
        assert ledger <= 30_000_000, "the restarted server forgot the day's spend"
        r = await second.http.get("/v1/budgets", headers=auth(me))
        assert r.json()["data"][0]["spent_usd"] == f"{ledger / 1e9:.9f}".rstrip("0")
