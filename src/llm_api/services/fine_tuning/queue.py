"""How a fine-tuning job reaches a worker: a Celery message (Redis broker, `llm-api worker`),
or, without Redis, a dispatcher inside the API process that trains one job at a time (in a
thread, so the API keeps serving; it does share the CPUs)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Protocol

import structlog
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from llm_api.core.config import Settings
from llm_api.services.batches.dispatcher import dispatch_forever
from llm_api.services.batches.storage import FileStore
from llm_api.services.fine_tuning.runner import FineTuneConfig, FineTuneRunner, runnable_jobs
from llm_api.services.llm.registry import Registry

log = structlog.get_logger(__name__)


class FineTuneQueue(Protocol):
    async def enqueue(self, job_id: str) -> None: ...

    async def aclose(self) -> None: ...


class CeleryFineTuneQueue:
    def __init__(self, broker_url: str) -> None:
        from celery import Celery

        from llm_api.worker.celery_app import configure

        self._app = configure(Celery("llm_api", broker=broker_url))

    async def enqueue(self, job_id: str) -> None:
        from llm_api.worker.celery_app import RUN_FINE_TUNE

        try:
            await asyncio.to_thread(self._app.send_task, RUN_FINE_TUNE, args=[job_id])
        except Exception:  # the workers' reaper picks up jobs whose message was lost
            log.warning("fine_tune_enqueue_failed", job_id=job_id, exc_info=True)

    async def aclose(self) -> None:
        self._app.close()


class EmbeddedFineTuneQueue:
    def __init__(self, sessions: async_sessionmaker[AsyncSession], runner: FineTuneRunner) -> None:
        self._task = asyncio.create_task(
            dispatch_forever(sessions, runner.run, interval=1.0, find=runnable_jobs),
            name="embedded-fine-tuning",
        )

    async def enqueue(self, job_id: str) -> None:
        """Nothing to send: the dispatcher polls the database every second."""

    async def aclose(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


def trainable_models(registry: Registry) -> dict[str, tuple[Path, int]]:
    """Local llama-architecture chat models served from a GGUF: id → (GGUF, context)."""
    out: dict[str, tuple[Path, int]] = {}
    for m in registry.models:
        if m.backend == "llama_cpp" and m.kind == "chat" and m.gguf:
            try:
                out[m.id] = (m.gguf_path(), m.context_length)
            except (FileNotFoundError, ValueError):
                continue
    return out


def runner_config(settings: Settings, registry: Registry) -> FineTuneConfig:
    return FineTuneConfig(
        data_dir=settings.data_dir,
        cache_dir=settings.model_cache_dir,
        base_models=trainable_models(registry),
        lease_seconds=settings.batch_lease_seconds,
        threads=settings.finetune_threads or _cpus(),
        checkpoint_every=settings.finetune_checkpoint_every,
        max_seq_tokens=settings.finetune_max_seq_tokens,
        max_examples=settings.finetune_max_examples,
        prices={m.id: m.pricing for m in registry.models},
    )


def _cpus() -> int:
    from llm_api.core.cpus import available_cpus

    return available_cpus()


def start_fine_tuning(
    settings: Settings,
    sessions: async_sessionmaker[AsyncSession],
    files: FileStore,
    registry: Registry,
) -> FineTuneQueue:
    """As `start_batches`: Celery with Redis, else (or with LLM_API_BATCH_EMBEDDED_WORKER=true)
    this process trains."""
    embedded = settings.batch_embedded_worker
    if embedded is None:
        embedded = not settings.redis_url
    if embedded or not settings.redis_url:
        runner = FineTuneRunner(sessions, files, runner_config(settings, registry))
        return EmbeddedFineTuneQueue(sessions, runner)
    return CeleryFineTuneQueue(settings.redis_url)
