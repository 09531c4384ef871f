"""Finds batches that need a worker: new ones, and ones whose worker died (lease expired).

In embedded mode (no Redis) the API process runs them itself with the same BatchRunner the
Celery task uses. With Redis, each Celery worker runs this as a reaper that re-enqueues stranded
batches, so a SIGKILLed worker's batch resumes within a lease period instead of waiting for the
broker's visibility timeout.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import structlog
from sqlalchemy import ColumnElement, select
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from llm_api.db.tables import Batch
from llm_api.services.batches.runner import ACTIVE

log = structlog.get_logger(__name__)

# What a database outage raises (connection refused or reset, timeouts), as opposed to a bug.
UNREACHABLE = (OperationalError, InterfaceError, OSError, TimeoutError)


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


@dataclass
class DispatchHealth:
    """Whether the dispatcher can reach the database. An outage is logged once as a warning
    when it starts and once as info when it ends, not as a traceback every round."""

    failing_since: float | None = None
    failed_rounds: int = 0  # in the current outage
    outages: int = 0
    rounds: int = 0

    def failed(self, exc: BaseException) -> None:
        self.rounds += 1
        self.failed_rounds += 1
        if self.failing_since is None:
            self.failing_since = time.monotonic()
            self.outages += 1
            log.warning("batch_dispatch_unavailable", error=_describe(exc))

    def succeeded(self) -> None:
        self.rounds += 1
        if self.failing_since is not None:
            seconds = round(time.monotonic() - self.failing_since, 1)
            log.info("batch_dispatch_recovered", seconds=seconds, rounds=self.failed_rounds)
            self.failing_since = None
            self.failed_rounds = 0


def _describe(exc: BaseException) -> str:
    # The exception's class and first line: a driver's message, never the query's parameters.
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {first[:200]}" if first else type(exc).__name__


async def dispatch_forever(
    sessions: async_sessionmaker[AsyncSession],
    handle: Callable[[str], Awaitable[object]],
    interval: float = 1.0,
    *,
    stranded_only: bool = False,
    health: DispatchHealth | None = None,
    find: Callable[..., Awaitable[list[str]]] = runnable_batches,
) -> None:
    """Poll for runnable batches (or what `find` returns: fine-tuning jobs) and hand each to
    `handle` (run it, or enqueue it)."""
    health = health or DispatchHealth()
    reported: set[str] = set()  # batches whose failure was logged (once each, until they run)
    while True:
        try:
            batch_ids = await find(sessions, stranded_only=stranded_only)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the database may be down: try again next round
            health.failed(exc)
        else:
            health.succeeded()
            for batch_id in batch_ids:  # one batch failing does not hold up the others
                try:
                    await handle(batch_id)
                except asyncio.CancelledError:
                    raise
                except UNREACHABLE as exc:  # the database went away mid-batch: same outage
                    health.failed(exc)
                    break
                except Exception:
                    if batch_id not in reported:
                        reported.add(batch_id)
                        log.warning("batch_dispatch_failed", batch_id=batch_id, exc_info=True)
                else:
                    reported.discard(batch_id)
        await asyncio.sleep(interval)
