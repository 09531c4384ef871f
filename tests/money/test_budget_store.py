"""Budgets in the limiter's stores (Redis script and memory): reserved atomically with the other
limits, settled once to the real cost, a new period starts from zero; and in the limiter:
headers, the 429 insufficient_quota, the soft-limit hook."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, timedelta

import pytest

from llm_api.core.exceptions import InsufficientQuotaError
from llm_api.services.llm.types import CompletionRecord, RequestContext
from llm_api.services.money.budgets import BudgetBook, BudgetRule
from llm_api.services.money.periods import period_end, period_key, period_start
from llm_api.services.rate_limit.limiter import RateLimiter
from llm_api.services.rate_limit.memory_store import MemoryStore
from llm_api.services.rate_limit.policy import LimitPolicy, RateLimitOverrides
from llm_api.services.rate_limit.types import LimitSpec, Settlement, Store
from tests.rate_limit.conftest import redis_store_ctx


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[Store]:
    if request.param == "memory":
        yield MemoryStore()
        return
    async with redis_store_ctx() as redis_store:  # asserts no key lives without a TTL
        yield redis_store


def rid() -> str:
    return uuid.uuid4().hex


def budget(limit: int, cost: int, subject: str = "t1:b1:2026-12-01") -> LimitSpec:
    return LimitSpec(
        "budget", "monthly budget", "team", subject, "budget", "cost", limit, 3_600_000, cost
    )


def tpm(limit: int, cost: int) -> LimitSpec:
    return LimitSpec("tpm", "tokens", "user", "u1", "window", "tokens", limit, 60_000, cost)


async def test_reserve_settle_once_and_all_or_nothing(store: Store) -> None:
    first = rid()
    d = await store.admit(first, [tpm(10_000, 100), budget(1000, 600)])
    assert d.allowed and d.states[1].remaining == 400
    # Refused by the budget: the token limit in the same call takes nothing.
    d = await store.admit(rid(), [tpm(10_000, 100), budget(1000, 600)])
    assert not d.allowed and d.rejected == 1 and d.states[1].remaining == 400
    d = await store.admit(rid(), [tpm(10_000, 0)])
    assert d.allowed and d.states[0].remaining == 10_000 - 100
    # Settled to the real cost (less than reserved), once: a replay changes nothing.
    settle = [Settlement(budget(1000, 600), 600, 150)]
    assert await store.settle(first, d.now_ms, settle, []) == [150]
    assert await store.settle(first, d.now_ms, settle, []) == [-1]
    d = await store.admit(rid(), [budget(1000, 850)])
    assert d.allowed and d.states[0].remaining == 0
    # Exhausted: any request that may cost something is refused; one that costs nothing is not.
    assert not (await store.admit(rid(), [budget(1000, 1)])).allowed
    assert (await store.admit(rid(), [budget(1000, 0)])).allowed


async def test_a_new_period_starts_from_zero(store: Store) -> None:
    book = BudgetBook()
    rule = BudgetRule(uuid.uuid4().hex, "team", "t9", "day", 1000, None)
    book.set_rules([rule])
    ctx = RequestContext(request_id="x", team_id="t9")
    day1 = datetime(2026, 12, 7, 23, 59, 30, tzinfo=UTC)
    (charge,) = book.charges(ctx, 700, now=day1)
    assert charge.period == "2026-12-07" and charge.spec.period_ms == 30_000
    assert (await store.admit(rid(), [charge.spec])).allowed
    assert not (await store.admit(rid(), [book.charges(ctx, 700, now=day1)[0].spec])).allowed
    day2 = day1 + timedelta(seconds=31)
    (charge,) = book.charges(ctx, 700, now=day2)
    assert charge.period == "2026-12-08"
    d = await store.admit(rid(), [charge.spec])
    assert d.allowed and d.states[0].remaining == 300


def test_periods() -> None:
    now = datetime(2026, 12, 31, 12, tzinfo=UTC)  # a Thursday
    assert period_start("day", now) == date(2026, 12, 31)
    assert period_start("week", now) == date(2026, 12, 28)
    assert period_start("month", now) == date(2026, 12, 1)
    assert period_end("month", now) == datetime(2027, 1, 1, tzinfo=UTC)
    assert period_end("week", now) == datetime(2027, 1, 4, tzinfo=UTC)
    assert period_key("none", now) == "none" and period_end("none", now) is None


def record(request_id: str, cost: int) -> CompletionRecord:
    return CompletionRecord(
        request_id=request_id, model="m", endpoint="chat", user_id="u1", key_id="k1",
        batch_id=None, prompt_tokens=10, completion_tokens=5, finish_reason="stop", status=200,
        cache_hit=False, cancelled=False, ttft_ms=None, latency_ms=1.0, queue_ms=0.0,
        stream=False, cost_nanos=cost, team_id=None,
    )  # fmt: skip


async def test_limiter_headers_refusal_and_soft_limit_once() -> None:
    crossings: list[tuple[str, str, int]] = []

    async def on_soft(rule: BudgetRule, period: str, total: int) -> None:
        crossings.append((rule.id, period, total))

    book = BudgetBook(on_soft_limit=on_soft)
    book.set_rules([BudgetRule("b1", "key", "k1", "month", 1_000_000_000, 400_000_000)])
    policy = LimitPolicy({}, RateLimitOverrides(), 60_000, "20/hour")
    limiter = RateLimiter(policy, MemoryStore(), enabled=False, budgets=book)  # budgets only
    ctx = RequestContext(request_id="r1", user_id="u1", key_id="k1")
    headers = await limiter.admit_completion(ctx, 100, 300_000_000)
    assert headers["x-llm-api-budget-remaining"] == "0.7"
    limiter.on_completion(record("r1", 250_000_000))  # settles: 0.25 spent
    for i in range(2, 4):  # 0.25 + 0.2 crosses the soft limit (0.4) once; 0.65 is past it
        ctx = RequestContext(request_id=f"r{i}", user_id="u1", key_id="k1")
        await limiter.admit_completion(ctx, 100, 300_000_000)
        limiter.on_completion(record(f"r{i}", 200_000_000))
    await book.aclose()  # waits for the hook's task
    assert [c[0] for c in crossings] == ["b1"] and crossings[0][2] == 450_000_000
    ctx = RequestContext(request_id="r9", user_id="u1", key_id="k1")
    headers = await limiter.admit_completion(ctx, 100, 10_000_000)
    assert "soft limit" in headers["x-llm-api-budget-warning"]
    limiter.on_completion(record("r9", 10_000_000))
    with pytest.raises(InsufficientQuotaError) as refused:
        await limiter.admit_completion(RequestContext("r10", "u1", "k1"), 100, 400_000_000)
    err = refused.value
    assert err.status_code == 429 and err.code == "insufficient_quota"
    assert "API key's monthly budget of $1 is exhausted: $0.34 left" in str(err)
    assert err.headers["x-should-retry"] == "false"


async def test_a_voided_admission_gives_its_reservation_back() -> None:
    """An admission whose reply never came is voided (redis_store.VOID): a budget's reservation
    comes back like the token limits' do."""
    async with redis_store_ctx() as store:
        spec = budget(1000, 700, subject=f"t-void:{rid()}:2026-12-01")
        request = rid()
        assert (await store.admit(request, [spec])).allowed
        await store.void(request, [spec])
        d = await store.admit(rid(), [spec])
        assert d.allowed and d.states[0].remaining == 300
