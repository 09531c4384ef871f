"""The completion pipeline, composed in one place: `build_pipeline`.

    cache → admission (rate limits, accounting) → fallbacks → backend (route, prepare, gate, n)

Every stage is built once (in the lifespan, the batch worker, or a test) and takes the next
stage, or what it needs, in its constructor (services/llm/stages.py, services/cache/service.py).
What a request cost goes to the subscribers given here, in this order: the rate limiter's
settlement first (synchronous: it must run even while the request is being cancelled), then
the rest (usage records, metrics).

    frames, outcome = await pipeline.run(call)

`frames` is an async iterator of `Frame`s (each with its choice `index`); errors raised before
the first frame (validation, admission, an upstream failing on every fallback) raise from
`run` itself. `outcome` is final once `frames` ended: the answering model, token counts, TTFT,
cache status and rate-limit headers, for the route and the access log.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass

from llm_api.core.config import Settings
from llm_api.services.cache.service import CacheStage, ResponseHook
from llm_api.services.cache.store import CacheStore
from llm_api.services.llm.priority import Tickets
from llm_api.services.llm.service import LLMService
from llm_api.services.llm.stages import (
    Accounting,
    AdmissionStage,
    BackendStage,
    Call,
    FallbackStage,
    Outcome,
    Subscriber,
)
from llm_api.services.llm.streams import first_then_rest
from llm_api.services.llm.types import Frame
from llm_api.services.rate_limit.limiter import RateLimiter


@dataclass(frozen=True, slots=True)
class PipelineParts:
    """What a pipeline is built from (kept, so that a test can build another from the same)."""

    llm: LLMService
    settings: Settings
    store: CacheStore | None = None
    limiter: RateLimiter | None = None
    subscribers: tuple[Subscriber, ...] = ()  # after the limiter's settlement, in order
    response_hooks: tuple[ResponseHook, ...] = ()  # the conversation log


class Pipeline:
    def __init__(self, parts: PipelineParts, cache: CacheStage, admission: AdmissionStage):
        self.parts = parts
        self.cache = cache
        self.admission = admission

    async def run(self, call: Call) -> tuple[AsyncGenerator[Frame, None], Outcome]:
        out = Outcome(model=call.model.id)
        frames = await first_then_rest(self.cache.run(call, out))
        return frames, out

    async def aclose(self) -> None:
        await self.cache.aclose()


def build_pipeline(parts: PipelineParts) -> Pipeline:
    llm, limiter = parts.llm, parts.limiter
    subscribers: Sequence[Subscriber] = parts.subscribers
    if limiter is not None:
        subscribers = (limiter.on_completion, *subscribers)
    backend = BackendStage(llm.backends, llm.gates, Tickets.from_settings(parts.settings))
    fallbacks = FallbackStage(backend)
    admission = AdmissionStage(
        fallbacks,
        limiter.admit_completion if limiter is not None else None,
        Accounting(subscribers),
        llm.drain_cut,
    )
    cache = CacheStage(admission, parts.store, parts.settings, parts.response_hooks)
    return Pipeline(parts, cache, admission)
