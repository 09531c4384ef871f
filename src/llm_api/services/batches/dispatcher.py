"""Finds batches that need a worker: new ones, and ones whose worker died (lease expired).

In embedded mode (no Redis) the API process runs them itself with the same BatchRunner the
Celery task uses. With Redis, each Celery worker runs this as a reaper that re-enqueues stranded
batches, so a SIGKILLed worker's batch resumes within a lease period instead of waiting for the
broker's visibility timeout.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

import structlog
from sqlalchemy import ColumnElement, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from llm_api.db.tables import Batch
from llm_api.services.batches.runner import ACTIVE

log = structlog.get_logger(__name__)


async def runnable_batches(
    sessions: async_sessionmaker[AsyncSession], *, stranded_only: bool = False, limit: int = 16
) -> list[str]:
    """Active batches no worker holds. `stranded_only` (the Celery reaper) skips batches that
    are merely waiting in the broker's queue: only expired leases, or never-started batches old
    enough that their enqueue was surely lost."""
    now = datetime.now(UTC)
    unleased: ColumnElement[bool] = Batch.lease_until.is_(None)
    if stranded_only:
        unleased = unleased & (Batch.created_at < now - timedelta(minutes=5))
    async with sessions() as s:
        rows = await s.scalars(
            select(Batch.id)
            .where(Batch.status.in_(ACTIVE), unleased | (Batch.lease_until < now))
            .order_by(Batch.created_at)
            .limit(limit)
        )
        return list(rows)


async def dispatch_forever(
    sessions: async_sessionmaker[AsyncSession],
    handle: Callable[[str], Awaitable[object]],
    interval: float = 1.0,
    *,
    stranded_only: bool = False,
) -> None:
    """Poll for runnable batches and hand each to `handle` (run it, or enqueue it)."""
    while True:
        try:
            for batch_id in await runnable_batches(sessions, stranded_only=stranded_only):
                await handle(batch_id)
        except asyncio.CancelledError:
            raise
        except Exception:  # the database may be briefly down: try again next round
            log.warning("batch_dispatch_failed", exc_info=True)
        await asyncio.sleep(interval)
