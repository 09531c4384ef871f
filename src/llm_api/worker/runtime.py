"""What a batch worker process holds: one event loop on a background thread, the model
service, the database and the runner. Built once per process on first use.

The loop runs forever on its own thread so the reaper keeps working between tasks; Celery's
(synchronous) task bodies hand coroutines to it and wait.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from concurrent.futures import Future
from typing import Any, TypeVar

from llm_api.core.config import Settings
from llm_api.db.engine import build_engine, build_sessionmaker
from llm_api.services import tracing
from llm_api.services.batches.runner import BatchRunner, BatchRunnerConfig
from llm_api.services.batches.storage import FileStore
from llm_api.services.fine_tuning.runner import FineTuneRunner
from llm_api.services.llm.embeddings import EmbeddingService
from llm_api.services.llm.pipeline import PipelineParts, build_pipeline
from llm_api.services.llm.serving import CompletionServing
from llm_api.services.money.startup import start_money
from llm_api.services.rate_limit import RateLimiter, start_rate_limiter
from llm_api.services.redis_pool import SharedRedis
from llm_api.services.usage.pipeline import UsagePipeline

T = TypeVar("T")


class WorkerRuntime:
    def __init__(self, settings: Settings) -> None:
        from llm_api.main import build_llm_service

        self.settings = settings
        tracing.configure(settings.tracing_capture_content)  # when OTEL_* asks for traces
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self.loop.run_forever, name="batch-loop", daemon=True
        )
        self._thread.start()
        self.engine = build_engine(settings)
        self.sessions = build_sessionmaker(self.engine)
        self.redis = SharedRedis.from_settings(settings)
        self.llm = build_llm_service(settings, self.redis)
        # The same pipeline as the API process, without the response cache (batch lines are
        # rarely repeated): the rate limiter for the owner's daily token quota, then usage
        # records (with batch_id) through the durable buffer.
        self.usage, self.limiter = self.run(self._accounting())
        self.pipeline = build_pipeline(
            PipelineParts(
                self.llm,
                settings,
                limiter=self.limiter,
                subscribers=(self.usage.recorder.on_completion,),
            )
        )
        self.run(self.llm.start())
        self._fine_tune: FineTuneRunner | None = None
        self.runner = BatchRunner(
            self.sessions,
            CompletionServing(self.llm, self.pipeline),
            FileStore(settings.data_dir / "files"),
            BatchRunnerConfig(
                concurrency=settings.batch_concurrency,
                lease_seconds=settings.batch_lease_seconds,
            ),
            # No per-input cache in workers: batch lines are rarely repeated.
            EmbeddingService(self.llm, None, settings, self.pipeline.admission),
        )

    @property
    def fine_tune(self) -> FineTuneRunner:
        """The fine-tuning runner, built on first use (training imports torch only then)."""
        if self._fine_tune is None:
            from llm_api.services.fine_tuning.queue import runner_config

            self._fine_tune = FineTuneRunner(
                self.sessions,
                FileStore(self.settings.data_dir / "files"),
                runner_config(self.settings, self.llm.registry),
            )
        return self._fine_tune

    async def _accounting(self) -> tuple[UsagePipeline, RateLimiter]:
        usage = UsagePipeline(self.settings, self.sessions)
        usage.start([])  # needs the running loop: its flusher tasks live on it
        # Budgets bind batch lines too (and their soft-limit alerts go out from here as well).
        self.money = await start_money(self.settings, self.sessions)
        return usage, await start_rate_limiter(self.settings, self.redis, self.money.budgets)

    def shutdown(self) -> None:
        """Flush usage records before the process exits (warm shutdown)."""
        self.run(self.usage.aclose())
        self.run(self.limiter.aclose())
        self.run(self.money.aclose())
        if self.redis is not None:
            self.run(self.redis.aclose())
        tracing.shutdown()  # exports the last spans

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.submit(coro).result()

    def submit(self, coro: Coroutine[Any, Any, T]) -> Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)


_runtime: WorkerRuntime | None = None
_lock = threading.Lock()


def get_runtime() -> WorkerRuntime:
    global _runtime  # one per worker process, created lazily after fork
    with _lock:
        if _runtime is None:
            _runtime = WorkerRuntime(Settings())
        return _runtime
