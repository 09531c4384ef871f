"""Wiring of the usage records: buffer → recorder (a completion pipeline subscriber and, with
the conversation log on, a cache response hook) → flusher. Built in the lifespan, closed after
the models so that the records of requests cancelled at shutdown are written first."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from llm_api.core.config import Settings
from llm_api.core.drain import DrainHook
from llm_api.services.cache.service import ResponseHook
from llm_api.services.usage.buffer import DurableBuffer
from llm_api.services.usage.flusher import UsageFlusher
from llm_api.services.usage.recorder import UsageRecorder

DRAIN_FLUSH_TIMEOUT_S = 8.0


class UsagePipeline:
    def __init__(
        self,
        settings: Settings,
        sessions: async_sessionmaker[AsyncSession],
    ) -> None:
        self.buffer = DurableBuffer(settings.data_dir / "buffer" / "usage")
        self.recorder = UsageRecorder(self.buffer, conversation_log=settings.conversation_log)
        self.flusher = UsageFlusher(self.buffer, sessions, settings)
        # Only with the conversation log on: with no response hook and no cache key the cache
        # stage passes streams through untouched (no per-frame tee).
        self.response_hooks: tuple[ResponseHook, ...] = (
            (self.recorder.on_response,) if settings.conversation_log else ()
        )

    def start(self, on_drain: list[DrainHook]) -> None:
        """Start the loops; the first flush runs at once and replays whatever a previous
        process left in the buffer directory (a SIGKILL, a database outage)."""
        self.flusher.start()
        self.flusher.wake()
        on_drain.append(self.flush)

    async def flush(self) -> None:
        """The SIGTERM drain hook: in-flight requests have ended, so write their records now."""
        await self.flusher.drain(DRAIN_FLUSH_TIMEOUT_S)

    async def aclose(self) -> None:
        await self.flusher.drain(DRAIN_FLUSH_TIMEOUT_S)
