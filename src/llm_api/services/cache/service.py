"""CachedLLMService: the LLM service behind a response cache.

Routes call this instead of `LLMService` for the OpenAI endpoints. It validates the request
(through the service's own request builders, so a hit never skips a 4xx), decides whether the
request may be cached, answers hits from the store (replayed as a stream when asked to stream),
and stores complete, deterministic responses after a miss. It also hands each finished response
to `response_hooks` (the conversation log).

Only deterministic requests are cached: effective temperature 0 or an explicit seed. A response
is stored once it is whole: a stream only after its last chunk went out, and only when every
choice finished with `stop` or `length` (an answer cut at `max_tokens` or the context window is
the same, repeatable answer to the same request). Errors and cancelled or incomplete responses
raise or lack a finish, and are never stored.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TypeVar

import structlog
from pydantic import ValidationError

from llm_api.core import metrics
from llm_api.core.config import Settings
from llm_api.schemas.chat import ChatCompletion, ChatCompletionChunk, ChatCompletionRequest
from llm_api.schemas.common import SamplingFields
from llm_api.schemas.completions import Completion, CompletionRequest
from llm_api.services.cache.entry import CachedChoice, CachedResponse
from llm_api.services.cache.keys import cache_key, model_version
from llm_api.services.cache.store import CacheStore
from llm_api.services.llm import shaping
from llm_api.services.llm.registry import ModelConfig
from llm_api.services.llm.service import LLMService
from llm_api.services.llm.types import CompletionRecord, GenerationRequest, RequestContext
from llm_api.services.redis_pool import SharedRedis

log = structlog.get_logger(__name__)

C = TypeVar("C", bound=ChatCompletionChunk | Completion | shaping.TextFrame)
# What a whole answer ends with; a choice without a finish was cut short.
_STORED_FINISHES = frozenset({"stop", "length"})


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
        outputs: list[str],
        finishes: list[str | None],
    ) -> None:
        """After a whole response went out: store it when allowed, and tell the hooks."""
        complete = len(finishes) == plan.choices and all(f in _STORED_FINISHES for f in finishes)
        if plan.key is not None and policy.write and complete and self.store is not None:
            entry = CachedResponse(
                model=plan.config.id,
                choices=[
                    CachedChoice(text=t, finish_reason=f or "stop")
                    for t, f in zip(outputs, finishes, strict=True)
                ],
                prompt_tokens=ctx.prompt_tokens,
                completion_tokens=ctx.completion_tokens,
            )
            await self.store.set(plan.key, entry.model_dump_json().encode())
        self._emit(plan, ctx, req, outputs, cache_hit=False)

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

    def _needs_text(self, plan: _Plan, policy: CachePolicy) -> bool:
        """Whether a miss must remember the streamed text: to store it, or for a response hook
        (the conversation log). Otherwise the stream passes through untouched: a request that
        cannot be cached (temperature > 0, no seed) costs no per-chunk work here."""
        storable = plan.key is not None and policy.write and self.store is not None
        return storable or bool(self.response_hooks)

    async def _tee(
        self,
        chunks: AsyncIterator[C],
        plan: _Plan,
        policy: CachePolicy,
        ctx: RequestContext,
        req: SamplingFields,
    ) -> AsyncIterator[C]:
        """Pass a live stream through, remembering its text; act only if it ends normally (a
        cancelled or failed stream raises out of the loop and is neither stored nor logged)."""
        outputs: list[list[str]] = [[] for _ in range(plan.choices)]
        finishes: list[str | None] = [None] * plan.choices
        try:
            async for chunk in chunks:
                for index, text, finish in shaping.pieces(chunk):
                    outputs[index].append(text)
                    if finish is not None:
                        finishes[index] = finish
                yield chunk
        finally:
            await chunks.aclose()  # type: ignore[attr-defined]
        await self._finish(plan, policy, ctx, req, ["".join(o) for o in outputs], finishes)

    # --- chat -----------------------------------------------------------------------------------

    async def chat(
        self, req: ChatCompletionRequest, ctx: RequestContext, policy: CachePolicy
    ) -> ChatCompletion:
        plan = self._plan("chat", req, ctx, policy)
        hit = await self._lookup(plan, policy, ctx, stream=False)
        if hit is not None:
            self._emit(plan, ctx, req, [c.text for c in hit.choices], cache_hit=True)
            return hit.chat(ctx.request_id)
        resp = await self.llm.chat(req, ctx, (plan.config, plan.seqs))
        outputs = [c.message.content or "" for c in resp.choices]
        await self._finish(plan, policy, ctx, req, outputs, [c.finish_reason for c in resp.choices])
        return resp

    async def chat_stream(
        self, req: ChatCompletionRequest, ctx: RequestContext, policy: CachePolicy
    ) -> AsyncIterator[ChatCompletionChunk | shaping.TextFrame]:
        plan = self._plan("chat", req, ctx, policy)
        include_usage = req.stream_options is not None and req.stream_options.include_usage
        hit = await self._lookup(plan, policy, ctx, stream=True)
        if hit is not None:
            self._emit(plan, ctx, req, [c.text for c in hit.choices], cache_hit=True)
            return hit.chat_chunks(ctx.request_id, include_usage)
        chunks = await self.llm.chat_stream(req, ctx, (plan.config, plan.seqs))
        if not self._needs_text(plan, policy):
            return chunks
        return self._tee(chunks, plan, policy, ctx, req)

    # --- completions ----------------------------------------------------------------------------

    async def completion(
        self, req: CompletionRequest, ctx: RequestContext, policy: CachePolicy
    ) -> Completion:
        plan = self._plan("completions", req, ctx, policy)
        hit = await self._lookup(plan, policy, ctx, stream=False)
        if hit is not None:
            self._emit(plan, ctx, req, [c.text for c in hit.choices], cache_hit=True)
            return hit.completion(ctx.request_id)
        resp = await self.llm.completion(req, ctx, (plan.config, plan.seqs))
        outputs = [c.text for c in resp.choices]
        await self._finish(plan, policy, ctx, req, outputs, [c.finish_reason for c in resp.choices])
        return resp

    async def completion_stream(
        self, req: CompletionRequest, ctx: RequestContext, policy: CachePolicy
    ) -> AsyncIterator[Completion | shaping.TextFrame]:
        plan = self._plan("completions", req, ctx, policy)
        include_usage = req.stream_options is not None and req.stream_options.include_usage
        hit = await self._lookup(plan, policy, ctx, stream=True)
        if hit is not None:
            self._emit(plan, ctx, req, [c.text for c in hit.choices], cache_hit=True)
            return hit.completion_chunks(ctx.request_id, include_usage)
        chunks = await self.llm.completion_stream(req, ctx, (plan.config, plan.seqs))
        if not self._needs_text(plan, policy):
            return chunks
        return self._tee(chunks, plan, policy, ctx, req)


def build_cache_store(settings: Settings, redis: SharedRedis | None) -> CacheStore | None:
    from llm_api.services.cache.store import MemoryCacheStore, RedisCacheStore

    if not settings.cache_enabled:
        return None
    if redis is not None:
        return RedisCacheStore(
            redis.client,
            settings.cache_ttl_seconds,
            settings.cache_timeout_ms / 1000,
            redis.health,
        )
    return MemoryCacheStore(settings.cache_max_bytes, settings.cache_ttl_seconds)
