"""How a new batch reaches a worker: a Celery message (production, Redis broker), or the
in-process dispatcher (embedded mode, no Redis) that runs the same BatchRunner."""

from __future__ import annotations

import asyncio
from typing import Protocol

import structlog
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from llm_api.core.config import Settings
from llm_api.services.batches.dispatcher import dispatch_forever
from llm_api.services.batches.runner import BatchRunner, BatchRunnerConfig
from llm_api.services.batches.storage import FileStore
from llm_api.services.llm.embeddings import EmbeddingService
from llm_api.services.llm.serving import CompletionServing

log = structlog.get_logger(__name__)


class BatchQueue(Protocol):
    async def enqueue(self, batch_id: str, traceparent: str | None = None) -> None:
        """Hand a new batch to a worker; `traceparent` (W3C) is the trace its run continues."""

    async def aclose(self) -> None: ...


class CeleryBatchQueue:
    def __init__(self, broker_url: str) -> None:
        from celery import Celery

        from llm_api.worker.celery_app import configure

        self._app = configure(Celery("llm_api", broker=broker_url))

    async def enqueue(self, batch_id: str, traceparent: str | None = None) -> None:
        from llm_api.worker.celery_app import RUN_BATCH

        # The trace travels in the task message's headers (worker/tasks.py reads it).
        headers = {"traceparent": traceparent} if traceparent else None
        try:
            await asyncio.to_thread(
                self._app.send_task, RUN_BATCH, args=[batch_id], headers=headers
            )
        except Exception:  # the workers' reaper picks up batches whose message was lost
            log.warning("batch_enqueue_failed", batch_id=batch_id, exc_info=True)

    async def aclose(self) -> None:
        self._app.close()


class EmbeddedBatchQueue:
    """Runs batches inside the API process, one at a time, with the shared model."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession], runner: BatchRunner) -> None:
        self._runner = runner
        # Each new batch's trace until its run starts (a batch resumed after a restart, which
        # no request enqueued in this process, starts a trace of its own).
        self._traces: dict[str, str] = {}
        self._task = asyncio.create_task(
            dispatch_forever(sessions, self._run, interval=1.0), name="embedded-batches"
        )

    async def _run(self, batch_id: str) -> str | None:
        return await self._runner.run(batch_id, self._traces.pop(batch_id, None))

    async def enqueue(self, batch_id: str, traceparent: str | None = None) -> None:
        """Nothing to send: the dispatcher polls the database every second."""
        if traceparent:
            self._traces[batch_id] = traceparent

    async def aclose(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


def start_batches(
    settings: Settings,
    sessions: async_sessionmaker[AsyncSession],
    llm: CompletionServing,
    embeddings: EmbeddingService | None = None,
) -> tuple[FileStore, BatchQueue]:
    """Built in the lifespan. With Redis, batches go to Celery workers (`llm-api worker`);
    without it, or when LLM_API_BATCH_EMBEDDED_WORKER=true, this process runs them."""
    files = FileStore(settings.data_dir / "files")
    embedded = settings.batch_embedded_worker
    if embedded is None:
        embedded = not settings.redis_url
    if embedded or not settings.redis_url:
        runner = BatchRunner(
            sessions,
            llm,
            files,
            BatchRunnerConfig(
                concurrency=settings.batch_concurrency,
                lease_seconds=settings.batch_lease_seconds,
            ),
            embeddings,
        )
        return files, EmbeddedBatchQueue(sessions, runner)
    return files, CeleryBatchQueue(settings.redis_url)
