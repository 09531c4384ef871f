"""The stores behind the limiter, on the real Redis and in memory: atomicity, sliding windows,
reservation and settlement, leases. The same tests run on both, so both behave the same."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from llm_api.services.rate_limit.memory_store import MemoryStore, StoreFull
from llm_api.services.rate_limit.types import LimitSpec, Settlement, Store


def rpm(limit: int, period_ms: int = 60_000, subject: str = "u1") -> LimitSpec:
    return LimitSpec("rpm", "requests per minute (RPM)", "user", subject, "window", "requests",
                     limit, period_ms)  # fmt: skip


def tpm(limit: int, cost: int, period_ms: int = 60_000, subject: str = "u1") -> LimitSpec:
    return LimitSpec("tpm", "tokens per minute (TPM)", "user", subject, "window", "tokens",
                     limit, period_ms, cost)  # fmt: skip


def conc(limit: int, lease_ms: int = 60_000, subject: str = "u1") -> LimitSpec:
    return LimitSpec("concurrency", "concurrent requests", "user", subject, "concurrency",
                     "concurrency", limit, lease_ms)  # fmt: skip


def rid() -> str:
    return uuid.uuid4().hex


async def test_exactly_limit_of_500_concurrent(store: Store) -> None:
    spec = rpm(100)
    decisions = await asyncio.gather(*(store.admit(rid(), [spec]) for _ in range(500)))
    assert sum(d.allowed for d in decisions) == 100
    refused = [d for d in decisions if not d.allowed]
    assert all(d.retry_ms > 0 and d.states[0].remaining == 0 for d in refused)


async def test_all_or_nothing_across_limits(store: Store) -> None:
    """A request refused by one limit takes nothing from the others."""
    ok = rpm(10, subject="a")
    full = rpm(1, subject="b")
    assert (await store.admit(rid(), [full])).allowed
    for _ in range(5):
        d = await store.admit(rid(), [ok, full])
        assert not d.allowed and d.rejected == 1
    d = await store.admit(rid(), [ok])
    assert d.allowed and d.states[0].remaining == 9  # the 5 refusals took nothing from `ok`


async def test_sliding_window_boundary_burst(store: Store) -> None:
    """2N requests straddling a window edge: a fixed window lets 2N through; a sliding window
    admits at most N in any window (burst: none beyond N)."""
    n, period = 10, 1000
    spec = rpm(n, period)
    admitted_at: list[float] = []
    loop = asyncio.get_running_loop()
    start = loop.time()
    # N/2 early in the window, N/2 just before the one-window mark, N just after it (where a
    # fixed window would reset and admit them all), then N once the early ones have left.
    schedule = [0.1] * (n // 2) + [0.85] * (n // 2) + [1.02] * n + [1.15] * n
    refused_at_edge = 0
    for at in schedule:
        await asyncio.sleep(max(0.0, start + at - loop.time()))
        if (await store.admit(rid(), [spec])).allowed:
            admitted_at.append(loop.time() - start)
        elif at == 1.02:
            refused_at_edge += 1
    assert refused_at_edge == n
    # Every window of `period` holds at most N admitted requests.
    for t0 in admitted_at:
        inside = [t for t in admitted_at if t0 <= t < t0 + period / 1000]
        assert len(inside) <= n, (t0, admitted_at)
    assert len(admitted_at) == n + n // 2  # the first N/2 left the window at 1.1 s


async def test_retry_after_is_the_real_wait(store: Store) -> None:
    spec = rpm(2, 1500)
    assert (await store.admit(rid(), [spec])).allowed
    assert (await store.admit(rid(), [spec])).allowed
    refused = await store.admit(rid(), [spec])
    assert not refused.allowed and 1000 < refused.retry_ms <= 1500
    await asyncio.sleep(refused.retry_ms / 1000 - 0.2)
    assert not (await store.admit(rid(), [spec])).allowed  # not before the wait
    await asyncio.sleep(0.3)
    assert (await store.admit(rid(), [spec])).allowed  # right after it


async def test_token_reservation_and_settlement(store: Store) -> None:
    first, second = rid(), rid()
    d = await store.admit(first, [tpm(1000, 900)])
    assert d.allowed and d.states[0].remaining == 100
    refused = await store.admit(second, [tpm(1000, 200)])
    assert not refused.allowed  # the 900 reserved count until settled
    await store.settle(first, d.now_ms, [Settlement(tpm(1000, 900), 900, 150)], [])
    d2 = await store.admit(second, [tpm(1000, 800)])
    assert d2.allowed and d2.states[0].remaining == 50  # 150 real + 800 reserved


async def test_request_larger_than_the_limit(store: Store) -> None:
    d = await store.admit(rid(), [tpm(100, 101)])
    assert not d.allowed and d.retry_ms == 60_000


async def test_concurrency_leases(store: Store) -> None:
    spec = conc(2)
    a, b, c = rid(), rid(), rid()
    assert (await store.admit(a, [spec])).allowed
    assert (await store.admit(b, [spec])).allowed
    assert not (await store.admit(c, [spec])).allowed
    await store.settle(a, 0, [], [spec])
    assert (await store.admit(c, [spec])).allowed


async def test_leases_lapse_unless_renewed(store: Store) -> None:
    """A crashed worker never renews: its slots come back after the lease."""
    spec = conc(1, lease_ms=400)
    crashed, alive = rid(), rid()
    assert (await store.admit(crashed, [spec])).allowed
    assert not (await store.admit(rid(), [spec])).allowed
    await asyncio.sleep(0.5)
    assert (await store.admit(alive, [spec])).allowed  # the crashed one's lease lapsed
    for _ in range(3):
        await asyncio.sleep(0.2)
        await store.renew([(alive, spec)])
    assert not (await store.admit(rid(), [spec])).allowed  # renewed: still held at 0.6 s


async def test_memory_store_is_bounded() -> None:
    """Bounded in keys, without dropping a live one (test_integrity.py has the rest)."""
    store = MemoryStore(max_keys=50)
    for i in range(50):
        assert (await store.admit(rid(), [rpm(1, subject=f"s{i}")])).allowed
    for i in range(50, 200):
        with pytest.raises(StoreFull):
            await store.admit(rid(), [rpm(1, subject=f"s{i}")])
    assert len(store._windows) == 50


@pytest.mark.parametrize("divisor,expected", [(1, 10), (3, 4), (20, 1)])
def test_scaled_share(divisor: int, expected: int) -> None:
    assert rpm(10).scaled(divisor).limit == expected


async def test_large_counts_stay_exact(store: Store) -> None:
    """Counts of 1e14 and more (Lua's own number formatting writes them as 1e+15) settle and
    read back exactly: the subject is refused by its limit, never by a script error."""
    big = 10**15
    first = rid()
    d = await store.admit(first, [tpm(big, 10)])
    assert d.allowed
    await store.settle(first, d.now_ms, [Settlement(tpm(big, 10), 10, big - 3)], [])
    d = await store.admit(rid(), [tpm(big, 3)])
    assert d.allowed and d.states[0].remaining == 0
    refused = await store.admit(rid(), [tpm(big, 1)])
    assert not refused.allowed and 59_000 < refused.retry_ms <= 60_000
    # Past the cap (an upstream's absurd usage): held at the cap, still exact.
    second = rid()
    d = await store.admit(second, [tpm(big, 1, subject="u2")])
    await store.settle(second, d.now_ms, [Settlement(tpm(big, 1, subject="u2"), 1, 2 * big)], [])
    refused = await store.admit(rid(), [tpm(big, 1, subject="u2")])
    assert not refused.allowed and refused.states[0].remaining == 0
