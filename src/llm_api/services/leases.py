"""A worker's lease on a database row: the batches' and fine-tuning jobs' way of letting one
worker run a job at a time (services/batches/runner.py explains the scheme).

`Lease` is one run's hold as the worker's own clock sees it; `RowLease` takes, renews and gives
back the row's `lease_owner`/`lease_until` for one table.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import AsyncIterator, Collection
from datetime import UTC, datetime, timedelta

import structlog
from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from llm_api.db.tables import Batch, FineTuningJob

log = structlog.get_logger(__name__)

# The tables with `id`, `status`, `lease_owner` and `lease_until` columns.
Leased = type[Batch] | type[FineTuningJob]


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _now() -> datetime:
    return datetime.now(UTC)


class Lease:
    """This worker's hold on one row as its own clock sees it. Each renewal moves `deadline`
    to when the renewal was *sent* plus the lease, less a margin, so the worker stops believing
    it holds the row before the database lets another worker take it (however long the
    renewal took, or if it failed: a database outage or a stalled event loop)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.margin = min(1.0, seconds / 4)
        self.deadline = 0.0
        self.lost = asyncio.Event()

    def renewed(self, sent: float) -> None:
        self.deadline = sent + self.seconds - self.margin

    def held(self) -> bool:
        if not self.lost.is_set() and time.monotonic() >= self.deadline:
            self.lost.set()
        return not self.lost.is_set()


class RowLease:
    """Takes, renews and releases the lease on rows of `model` for the worker `owner`.
    `renew_failed_event` and `id_key` name the debug log line of a renewal the database did
    not answer (e.g. "batch_lease_renew_failed", batch_id=...)."""

    def __init__(
        self,
        model: Leased,
        active: Collection[str],
        owner: str,
        sessions: async_sessionmaker[AsyncSession],
        *,
        renew_failed_event: str,
        id_key: str,
    ) -> None:
        self.model = model
        self.active = tuple(active)
        self.owner = owner
        self.sessions = sessions
        self.renew_failed_event = renew_failed_event
        self.id_key = id_key

    async def acquire(self, row_id: str, lease: Lease) -> bool:
        """Take the row if it is active and its lease is free, lapsed or already ours."""
        m, sent, now = self.model, time.monotonic(), _now()
        async with self.sessions.begin() as s:
            result = await s.execute(
                update(m)
                .where(
                    m.id == row_id,
                    m.status.in_(self.active),
                    (m.lease_until.is_(None))
                    | (m.lease_until < now)
                    | (m.lease_owner == self.owner),
                )
                .values(lease_owner=self.owner, lease_until=now + timedelta(seconds=lease.seconds))
            )
        if not result.rowcount:  # type: ignore[attr-defined]
            return False
        lease.renewed(sent)
        return True

    async def heartbeat(self, row_id: str, lease: Lease) -> None:
        """Renew every sixth of the lease until it is lost (to our clock or another worker)."""
        m = self.model
        while True:
            await asyncio.sleep(lease.seconds / 6)
            if not lease.held():
                return
            sent = time.monotonic()
            try:
                async with self.sessions.begin() as s:
                    result = await s.execute(
                        update(m)
                        .where(m.id == row_id, m.lease_owner == self.owner)
                        .values(lease_until=_now() + timedelta(seconds=lease.seconds))
                    )
            except Exception as exc:  # database unreachable: retry; the lease lapses meanwhile
                log.debug(
                    self.renew_failed_event, **{self.id_key: row_id}, error=type(exc).__name__
                )
                continue
            if not result.rowcount:  # type: ignore[attr-defined]
                lease.lost.set()  # another worker took it over
                return
            lease.renewed(sent)

    async def release(self, row_id: str) -> None:
        # An expired lease (not a cleared one) marks an unfinished row as ready to resume.
        m = self.model
        async with self.sessions.begin() as s:
            await s.execute(
                update(m)
                .where(m.id == row_id, m.lease_owner == self.owner)
                .values(lease_owner=None, lease_until=_now())
            )

    @contextlib.asynccontextmanager
    async def renewing(self, row_id: str, lease: Lease) -> AsyncIterator[None]:
        """Heartbeat while the body runs (after `acquire`), then stop it and release."""
        heartbeat = asyncio.create_task(self.heartbeat(row_id, lease))
        try:
            yield
        finally:
            heartbeat.cancel()
            await asyncio.gather(heartbeat, return_exceptions=True)
            await self.release(row_id)
