"""The Celery application for batch jobs (production: Redis broker, `llm-api worker`).

Reliability settings: late acknowledgement and reject-on-worker-lost, so a task whose worker is
killed goes back to the queue; prefetch of one, so a worker never hoards batches. The batch
runner's lease and result-file bookkeeping make a redelivered task resume, not repeat.
"""

from __future__ import annotations

from celery import Celery

from llm_api.core.config import Settings

RUN_BATCH = "llm_api.run_batch"  # the task name the API sends and workers consume
RUN_FINE_TUNE = "llm_api.run_fine_tune"  # a fine-tuning job (same queue; it holds a worker)


def make_celery(settings: Settings) -> Celery:
    if not settings.redis_url:
        raise RuntimeError(
            "Celery workers need LLM_API_REDIS_URL (embedded mode runs batches in-process)"
        )
    return configure(Celery("llm_api", broker=settings.redis_url, include=["llm_api.worker.tasks"]))


def configure(app: Celery) -> Celery:
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        task_serializer="json",
        accept_content=["json"],
        task_default_queue="llm-api-batches",
        broker_connection_retry_on_startup=True,
        # Redelivery of an unacknowledged task after a lost worker; the reaper usually resumes
        # the batch well before this.
        broker_transport_options={"visibility_timeout": 3600},
        worker_hijack_root_logger=False,
    )
    return app
