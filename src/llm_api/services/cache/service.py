"""CachedLLMService: the LLM service behind a response cache.

Routes call this instead of `LLMService` for the OpenAI endpoints. It validates the request
(through the service's own request builders, so a hit never skips a 4xx), decides whether the
request may be cached, answers hits from the store (replayed as a stream when asked to stream),
and stores complete, deterministic responses after a miss. It also hands each finished response
to `response_hooks` (the conversation log).

It deals in the pipeline's frames, not wire chunks: a miss passes the service's frames on (a
stream) or its `Answer` (a whole response), a hit replays the stored choices as frames
(entry.py), and the route's serving module encodes either the same way.

Only deterministic requests are cached: effective temperature 0 or an explicit seed. A response
is stored once it is whole: a stream only after its last frame went out, and only when every
choice finished with `stop`, `length` or `tool_calls` (an answer cut at `max_tokens` or the
context window is the same, repeatable answer to the same request). Errors and cancelled or
incomplete responses raise or lack a finish, and are never stored.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import structlog
from pydantic import ValidationError

from llm_api.core import metrics
from llm_api.core.config import Settings
from llm_api.schemas.chat import ChatCompletionRequest
from llm_api.schemas.common import SamplingFields
from llm_api.schemas.completions import CompletionRequest
from llm_api.services.cache.entry import CachedResponse
from llm_api.services.cache.keys import cache_key, model_version
from llm_api.services.cache.store import CacheStore
from llm_api.services.llm import shaping
from llm_api.services.llm.registry import ModelConfig
from llm_api.services.llm.service import LLMService
from llm_api.services.llm.shaping import Answer
from llm_api.services.llm.types import CompletionRecord, Frame, GenerationRequest, RequestContext

log = structlog.get_logger(__name__)

# What a whole answer ends with; a choice without a finish was cut short.
_STORED_FINISHES = frozenset({"stop", "length", "tool_calls"})


@dataclass(frozen=True, slots=True)
class CachePolicy:
    """What the client allows: `Cache-Control: no-cache` → do not read; `no-store` → do not
    write."""

    read: bool = True
    write: bool = True

    @classmethod
    def from_header(cls, value: str | None) -> CachePolicy:
        if not value:
            return cls()
        directives = {part.split("=", 1)[0].strip().lower() for part in value.split(",")}
        return cls(read="no-cache" not in directives, write="no-store" not in directives)


@dataclass(slots=True)
class ResponseEvent:
    """A response that went out whole (from the model or the cache), for the conversation log."""

    ctx: RequestContext
    endpoint: str
    model: str
    request: SamplingFields
    outputs: list[str]
    cache_hit: bool


ResponseHook = Callable[[ResponseEvent], None]


@dataclass(slots=True)
class _Plan:
    endpoint: str
    config: ModelConfig
    seqs: list[GenerationRequest]  # built once here; LLMService runs these on a miss
    key: str | None

    @property
    def choices(self) -> int:
        return len(self.seqs)


class CachedLLMService:
    def __init__(self, llm: LLMService, store: CacheStore | None, settings: Settings) -> None:
        self.llm = llm
        self.store = store
        self.shared = settings.cache_shared
        self.response_hooks: list[ResponseHook] = []
        self._versions: dict[str, str] = {}

    async def aclose(self) -> None:
        if self.store is not None:
            await self.store.aclose()

    # --- planning -------------------------------------------------------------------------------

    def _plan(
        self, endpoint: str, req: SamplingFields, ctx: RequestContext, policy: CachePolicy
    ) -> _Plan:
        if isinstance(req, ChatCompletionRequest):
            config, seqs = self.llm.chat_requests(req, ctx)  # validates: 4xx before any lookup
        else:
            assert isinstance(req, CompletionRequest)
            config, seqs = self.llm.completion_requests(req, ctx)
        params = seqs[0].params
        deterministic = params.temperature == 0 or params.seed is not None
        key = None
        if self.store is not None and deterministic and (policy.read or policy.write):
            key = cache_key(
                endpoint=endpoint,
                model=config.id,
                version=self._version(config),
                tenant="*" if self.shared else f"user:{ctx.user_id}",
                body=req.model_dump(mode="json", by_alias=True),
            )
        return _Plan(endpoint=endpoint, config=config, seqs=seqs, key=key)

    def _version(self, config: ModelConfig) -> str:
        if config.id not in self._versions:
            self._versions[config.id] = model_version(config)
        return self._versions[config.id]

    # --- store ----------------------------------------------------------------------------------

    async def _lookup(
        self, plan: _Plan, policy: CachePolicy, ctx: RequestContext, stream: bool
    ) -> CachedResponse | None:
        ctx.cache = "miss"
        if plan.key is None or not policy.read or self.store is None:
            return None
        started = time.perf_counter()
        raw = await self.store.get(plan.key)
        if raw is None:
            metrics.CACHE_MISSES.labels(cache="response").inc()
            return None
        try:
            entry = CachedResponse.model_validate_json(raw)
        except ValidationError:
            log.warning("cache_entry_invalid", key=plan.key)
            return None
        # A hit is still a request: it counts against the caller's limits like any other (RPM,
        # concurrency, and the tokens it delivers), so a cached prompt cannot be hammered freely.
        for hook in self.llm.admission_hooks:
            await hook(ctx, entry.prompt_tokens + entry.completion_tokens)
        metrics.CACHE_HITS.labels(cache="response").inc()
        ctx.cache, ctx.model = "hit", plan.config.id
        ctx.prompt_tokens, ctx.completion_tokens = entry.prompt_tokens, entry.completion_tokens
        elapsed = (time.perf_counter() - started) * 1000
        ctx.ttft_ms = elapsed
        await self._notify_hit(plan, ctx, entry, elapsed, stream)
        return entry

    async def _notify_hit(
        self, plan: _Plan, ctx: RequestContext, entry: CachedResponse, ms: float, stream: bool
    ) -> None:
        """A hit reached no model, so the service's observers hear of it from here."""
        record = CompletionRecord(
            request_id=ctx.request_id,
            model=plan.config.id,
            endpoint=plan.endpoint,
            user_id=ctx.user_id,
            key_id=ctx.key_id,
            batch_id=ctx.batch_id,
            prompt_tokens=entry.prompt_tokens,
            completion_tokens=entry.completion_tokens,
            finish_reason=entry.choices[-1].finish_reason if entry.choices else None,
            status=200,
            cache_hit=True,
            cancelled=False,
            ttft_ms=ms,
            latency_ms=ms,
            queue_ms=0.0,
            stream=stream,
        )
        for observer in self.llm.observers:
            result = observer(record)
            if inspect.isawaitable(result):
                await result

    async def _finish(
        self,
        plan: _Plan,
        policy: CachePolicy,
        ctx: RequestContext,
        req: SamplingFields,
        answer: Answer,
    ) -> None:
        """After a whole response went out: store it when allowed, and tell the hooks."""
        choices = answer.choices
        complete = all(c.finish_reason in _STORED_FINISHES for c in choices)
        if plan.key is not None and policy.write and complete and self.store is not None:
            entry = CachedResponse.of(answer, ctx.prompt_tokens, ctx.completion_tokens)
            await self.store.set(plan.key, entry.model_dump_json().encode())
        self._emit(plan, ctx, req, [c.text for c in choices], cache_hit=False)

    def _emit(
        self,
        plan: _Plan,
        ctx: RequestContext,
        req: SamplingFields,
        outputs: list[str],
        cache_hit: bool,
    ) -> None:
        event = ResponseEvent(ctx, plan.endpoint, plan.config.id, req, outputs, cache_hit)
        for hook in self.response_hooks:
            try:
                hook(event)
            except Exception:  # a hook must never fail the response it observes
                log.exception("response_hook_failed")

    def _needs_answer(self, plan: _Plan, policy: CachePolicy) -> bool:
        """Whether a miss must assemble the streamed answer: to store it, or for a response hook
        (the conversation log). Otherwise the stream passes through untouched: a request that
        cannot be cached (temperature > 0, no seed) costs no per-frame work here."""
        storable = plan.key is not None and policy.write and self.store is not None
        return storable or bool(self.response_hooks)

    async def _tee(
        self,
        frames: AsyncIterator[Frame],
        plan: _Plan,
        policy: CachePolicy,
        ctx: RequestContext,
        req: SamplingFields,
    ) -> AsyncIterator[Frame]:
        """Pass a live stream through, assembling its answer; act only if it ends normally (a
        cancelled or failed stream raises out of the loop and is neither stored nor logged)."""
        choices, usage = shaping.collector(plan.choices, req.n)
        try:
            async for frame in frames:
                choices[frame.index].add(frame)
                if frame.finish_reason is not None:
                    usage.add(frame)
                yield frame
        finally:
            await frames.aclose()  # type: ignore[attr-defined]
        answer = Answer(choices, usage, ctx.model or plan.config.id)
        await self._finish(plan, policy, ctx, req, answer)

    # --- answers --------------------------------------------------------------------------------
    # Whole answers (`Answer`) or started frame streams, for api/v1/*/serving.py to encode; the
    # model that answered is `ctx.model`.

    async def _whole(
        self, endpoint: str, req: SamplingFields, ctx: RequestContext, policy: CachePolicy
    ) -> Answer:
        plan = self._plan(endpoint, req, ctx, policy)
        hit = await self._lookup(plan, policy, ctx, stream=False)
        if hit is not None:
            self._emit(plan, ctx, req, [c.text for c in hit.choices], cache_hit=True)
            return hit.answer(req.n)
        if isinstance(req, ChatCompletionRequest):
            answer = await self.llm.chat(req, ctx, (plan.config, plan.seqs))
        else:
            assert isinstance(req, CompletionRequest)
            answer = await self.llm.completion(req, ctx, (plan.config, plan.seqs))
        await self._finish(plan, policy, ctx, req, answer)
        return answer

    async def _stream(
        self, endpoint: str, req: SamplingFields, ctx: RequestContext, policy: CachePolicy
    ) -> AsyncIterator[Frame]:
        plan = self._plan(endpoint, req, ctx, policy)
        hit = await self._lookup(plan, policy, ctx, stream=True)
        if hit is not None:
            self._emit(plan, ctx, req, [c.text for c in hit.choices], cache_hit=True)
            return hit.stream()
        if isinstance(req, ChatCompletionRequest):
            frames = await self.llm.chat_stream(req, ctx, (plan.config, plan.seqs))
        else:
            assert isinstance(req, CompletionRequest)
            frames = await self.llm.completion_stream(req, ctx, (plan.config, plan.seqs))
        if not self._needs_answer(plan, policy):
            return frames
        return self._tee(frames, plan, policy, ctx, req)

    async def chat(
        self, req: ChatCompletionRequest, ctx: RequestContext, policy: CachePolicy
    ) -> Answer:
        return await self._whole("chat", req, ctx, policy)

    async def chat_stream(
        self, req: ChatCompletionRequest, ctx: RequestContext, policy: CachePolicy
    ) -> AsyncIterator[Frame]:
        return await self._stream("chat", req, ctx, policy)

    async def completion(
        self, req: CompletionRequest, ctx: RequestContext, policy: CachePolicy
    ) -> Answer:
        return await self._whole("completions", req, ctx, policy)

    async def completion_stream(
        self, req: CompletionRequest, ctx: RequestContext, policy: CachePolicy
    ) -> AsyncIterator[Frame]:
        return await self._stream("completions", req, ctx, policy)


def build_cache_store(settings: Settings) -> CacheStore | None:
    from llm_api.services.cache.store import MemoryCacheStore, RedisCacheStore

    if not settings.cache_enabled:
        return None
    if settings.redis_url:
        return RedisCacheStore(
            settings.redis_url, settings.cache_ttl_seconds, settings.cache_timeout_ms / 1000
        )
    return MemoryCacheStore(settings.cache_max_bytes, settings.cache_ttl_seconds)
