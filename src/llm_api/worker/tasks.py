"""Celery tasks. `celery -A llm_api.worker.tasks worker` (or `llm-api worker`) runs them."""

from __future__ import annotations

from typing import Any

import structlog
from celery.signals import worker_ready, worker_shutting_down

from llm_api.core.config import Settings
from llm_api.services.batches.dispatcher import dispatch_forever
from llm_api.services.fine_tuning.runner import runnable_jobs
from llm_api.worker.celery_app import RUN_BATCH, RUN_FINE_TUNE, make_celery
from llm_api.worker.runtime import get_runtime

log = structlog.get_logger(__name__)

app = make_celery(Settings())


@app.task(name=RUN_BATCH, bind=True)  # type: ignore[untyped-decorator]
def run_batch(self: Any, batch_id: str) -> str | None:
    """Run or resume one batch; a no-op when another worker holds it or it has finished. The
    message's `traceparent` header (services/batches/queue.py) is the trace the run continues."""
    runtime = get_runtime()
    traceparent = (self.request.headers or {}).get("traceparent") or getattr(
        self.request, "traceparent", None
    )
    status = runtime.run(runtime.runner.run(batch_id, traceparent))
    log.info("batch_task_done", batch_id=batch_id, status=status)
    return status


@app.task(name=RUN_FINE_TUNE)  # type: ignore[untyped-decorator]
def run_fine_tune(job_id: str) -> str | None:
    """Train (or resume) one fine-tuning job; a no-op when another worker holds it."""
    runtime = get_runtime()
    status = runtime.run(runtime.fine_tune.run(job_id))
    log.info("fine_tune_task_done", job_id=job_id, status=status)
    return status


@worker_ready.connect  # type: ignore[untyped-decorator]
def _start_reaper(**_: Any) -> None:
    runtime = get_runtime()  # loads the model before the first task arrives

    async def enqueue(batch_id: str) -> None:
        run_batch.delay(batch_id)

    # Polled at a third of the lease, so a dead worker's batch is re-enqueued within about
    # 1.3 leases of its last heartbeat (an indexed query per round).
    interval = runtime.settings.batch_lease_seconds / 3
    runtime.submit(
        dispatch_forever(runtime.sessions, enqueue, interval=interval, stranded_only=True)
    )

    async def enqueue_job(job_id: str) -> None:
        run_fine_tune.delay(job_id)

    # Fine-tuning jobs whose worker died (lease expired), the same way.
    runtime.submit(
        dispatch_forever(
            runtime.sessions, enqueue_job, interval=interval, stranded_only=True, find=runnable_jobs
        )
    )


@worker_shutting_down.connect  # type: ignore[untyped-decorator]
def _flush_usage(**_: Any) -> None:
    get_runtime().shutdown()
