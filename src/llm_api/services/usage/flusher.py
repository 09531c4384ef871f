"""Moves buffered records into the database, off the request path.

Every `usage_flush_interval_seconds` the flusher closes the current buffer segment and inserts
each closed segment (its own, and those a killed process left behind) in one transaction, then
deletes the file. When the database is unreachable it keeps the files and retries with
exponential backoff and jitter (capped at `usage_max_backoff_seconds`); nothing is dropped.
Inserts are idempotent by request id, so a segment inserted but not yet deleted when the process
died is harmless when replayed.

A second task fsyncs the buffer in batches, and once an hour old conversations (and audit
events past their retention, services/audit.purge) are deleted.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from datetime import UTC, datetime, timedelta

import structlog
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from llm_api.core.config import Settings
from llm_api.core.metrics import USAGE_BUFFER_BACKLOG
from llm_api.services import audit
from llm_api.services.usage.buffer import DurableBuffer
from llm_api.services.usage.repository import delete_conversations_before, insert_records

log = structlog.get_logger(__name__)

RETENTION_INTERVAL_S = 3600.0


class UsageFlusher:
    def __init__(
        self,
        buffer: DurableBuffer,
        sessions: async_sessionmaker[AsyncSession],
        settings: Settings,
    ) -> None:
        self.buffer = buffer
        self.sessions = sessions
        self.interval = settings.usage_flush_interval_seconds
        self.fsync_interval = settings.usage_fsync_interval_seconds
        self.max_backoff = settings.usage_max_backoff_seconds
        self.retention = timedelta(days=settings.conversation_retention_days)
        self.audit_retention = timedelta(days=settings.audit_retention_days)
        self.failures = 0
        self.flushed = 0  # records inserted (or found already present) by this process
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._flush_lock = asyncio.Lock()
        self._last_retention = 0.0

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._flush_loop(), name="usage-flusher"),
            asyncio.create_task(self._fsync_loop(), name="usage-fsync"),
        ]

    def wake(self) -> None:
        self._wake.set()

    # --- loops ----------------------------------------------------------------------------------

    def _delay(self) -> float:
        if not self.failures:
            return self.interval
        backoff = min(self.max_backoff, self.interval * 2 ** min(self.failures, 16))
        return float(backoff * random.uniform(0.5, 1.0))

    async def _flush_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._delay()):
                    await self._wake.wait()
            self._wake.clear()
            await self.flush_once()
            await self._retention()

    async def _fsync_loop(self) -> None:
        while True:
            await asyncio.sleep(self.fsync_interval)
            try:
                await self.buffer.sync()
            except OSError:
                log.exception("usage_buffer_fsync_failed")

    # --- work -----------------------------------------------------------------------------------

    async def flush_once(self) -> bool:
        """Flush everything closed so far. True when the buffer was emptied."""
        async with self._flush_lock:
            try:
                await self.buffer.rotate()
                # File-system work in threads: it must never stall the event loop.
                segments = await asyncio.to_thread(self.buffer.closed_segments)
                for segment in segments:
                    records = await asyncio.to_thread(self.buffer.read_segment, segment)
                    if records:
                        async with self.sessions.begin() as session:
                            await insert_records(session, records)
                    await asyncio.to_thread(self.buffer.remove, segment)
                    self.flushed += len(records)
            except Exception as exc:  # the DB is down or slow: keep the files, retry later
                self.failures += 1
                log.warning("usage_flush_failed", error=type(exc).__name__, failures=self.failures)
                return False
            USAGE_BUFFER_BACKLOG.set(self.buffer.pending_in_current)
            if self.failures:
                log.info("usage_flush_recovered", after_failures=self.failures)
            self.failures = 0
            return True

    async def _retention(self) -> None:
        now = time.monotonic()
        if now - self._last_retention < RETENTION_INTERVAL_S:
            return
        self._last_retention = now
        try:
            async with self.sessions.begin() as session:
                cutoff = datetime.now(UTC) - self.retention
                deleted = await delete_conversations_before(session, cutoff)
            if deleted:
                log.info("conversations_expired", deleted=deleted)
            if self.audit_retention:  # 0 days: audit events are kept forever
                async with self.sessions.begin() as session:
                    purged = await audit.purge(session, datetime.now(UTC) - self.audit_retention)
                if purged:
                    log.info("audit_events_expired", deleted=purged)
        except Exception as exc:
            self._last_retention = 0.0
            log.warning("conversation_retention_failed", error=type(exc).__name__)

    async def drain(self, timeout: float = 10.0) -> None:
        """On shutdown: stop the loops, then try to flush what is left for up to `timeout`
        seconds. What cannot be written stays on disk for the next start."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.1, deadline - time.monotonic())):
                    if await self.flush_once():
                        break
            if time.monotonic() + 0.5 >= deadline:
                log.warning("usage_flush_incomplete_at_shutdown", kept_on_disk=True)
                break
            await asyncio.sleep(0.5)
        await self.buffer.close()
