"""RowLease, the batch and fine-tuning runners' lease on a row: taken once, renewed by its
holder, lost to a takeover, and released as an expired (resumable) lease."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine

from llm_api.db.tables import Base, Batch
from llm_api.services.batches.runner import ACTIVE
from llm_api.services.leases import Lease, RowLease


@pytest.fixture
async def sessions(tmp_path: Path) -> AsyncIterator[async_sessionmaker[AsyncSession]]:
    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'leases.db'}")
    async with engine.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)
    maker = async_sessionmaker(engine, expire_on_commit=False)
    async with maker.begin() as s:
        for batch_id, status in (("batch_a", "in_progress"), ("batch_done", "completed")):
            s.add(Batch(id=batch_id, user_id="u", endpoint="e", input_file_id="f", status=status))
    yield maker
    await engine.dispose()


def lease_of(owner: str, sessions: async_sessionmaker[AsyncSession]) -> RowLease:
    return RowLease(
        Batch,
        ACTIVE,
        owner,
        sessions,
        renew_failed_event="batch_lease_renew_failed",
        id_key="batch_id",
    )


async def row(sessions: async_sessionmaker[AsyncSession]) -> Batch:
    async with sessions() as s:
        batch = await s.get(Batch, "batch_a")
        assert batch is not None
        return batch


async def test_one_worker_holds_a_row_until_it_releases_it(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    a, b = lease_of("worker-a", sessions), lease_of("worker-b", sessions)
    lease = Lease(6.0)
    assert await a.acquire("batch_a", lease) and lease.held()
    assert not await b.acquire("batch_a", Lease(6.0))
    assert await a.acquire("batch_a", Lease(6.0))  # its own lease: taken again (a restart)
    assert not await a.acquire("batch_done", Lease(6.0))  # finished: nothing to run
    await b.release("batch_a")  # not b's: nothing changes
    assert (await row(sessions)).lease_owner == "worker-a"
    await a.release("batch_a")
    released = await row(sessions)
    assert released.lease_owner is None and released.lease_until is not None
    assert await b.acquire("batch_a", Lease(6.0))


async def test_the_heartbeat_renews_and_stops_when_another_worker_took_over(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    a = lease_of("worker-a", sessions)
    lease = Lease(0.6)  # renewed every 0.1 s
    assert await a.acquire("batch_a", lease)
    async with a.renewing("batch_a", lease):
        first = (await row(sessions)).lease_until
        await asyncio.sleep(0.35)
        assert lease.held() and (await row(sessions)).lease_until != first
        async with sessions.begin() as s:
            taken = await s.get(Batch, "batch_a")
            assert taken is not None
            taken.lease_owner = "worker-b"
        await asyncio.wait_for(lease.lost.wait(), timeout=2)
    assert not lease.held()
    assert (await row(sessions)).lease_owner == "worker-b"  # a's release leaves b's lease


async def test_renewing_releases_the_row_when_the_run_fails(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    a = lease_of("worker-a", sessions)
    lease = Lease(6.0)
    assert await a.acquire("batch_a", lease)
    with pytest.raises(RuntimeError):
        async with a.renewing("batch_a", lease):
            raise RuntimeError("run failed")
    released = await row(sessions)
    assert released.lease_owner is None
    assert released.lease_until is not None
    until = released.lease_until
    assert (until if until.tzinfo else until.replace(tzinfo=UTC)) <= datetime.now(UTC)
