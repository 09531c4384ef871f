"""The response cache as the completion pipeline's first stage (services/llm/pipeline.py).

A request reaches it validated once (its engine requests built); a hit is replayed as the
frames a live answer would be — text, tool calls, reasoning, logprobs, upstream extras and usage
details, all of it (services/cache/entry.py) — and the encoders make a stream or a whole response
of them, as for any answer; a miss runs the rest of the pipeline once and its frames are teed.

Only deterministic requests are cached: effective temperature 0 or an explicit seed. A response
is stored once it is whole: a stream only after its last frame went out, and only when every
choice finished with `stop`, `length` or `tool_calls` (an answer cut at `max_tokens` or the
context window is the same, repeatable answer to the same request). Errors and cancelled or
incomplete responses raise or lack a finish, and are never stored. Each finished response also
goes to the `response_hooks` given at construction (the conversation log).
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, Callable, Sequence
from contextlib import aclosing
from dataclasses import dataclass

import structlog
from pydantic import ValidationError

from llm_api.core import metrics
from llm_api.core.config import Settings
from llm_api.schemas.common import SamplingFields
from llm_api.services import tracing
from llm_api.services.cache.entry import CachedResponse
from llm_api.services.cache.keys import cache_key, model_version
from llm_api.services.cache.store import CacheStore
from llm_api.services.llm import shaping
from llm_api.services.llm.stages import AdmissionStage, Call, Outcome
from llm_api.services.llm.types import Frame, RequestContext
from llm_api.services.redis_pool import SharedRedis

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


class CacheStage:
    """The pipeline's first stage: answers a hit from the store (still admitted and recorded
    by the admission stage, as a replay), or runs the rest of the pipeline once and tees its
    frames, storing the answer when it ended whole. Requests that can be neither read nor
    stored, with no response hook, pass through with no layer in between."""

    def __init__(
        self,
        next_stage: AdmissionStage,
        store: CacheStore | None,
        settings: Settings,
        response_hooks: Sequence[ResponseHook] = (),
    ) -> None:
        self.next = next_stage
        self.store = store
        self.shared = settings.cache_shared
        self.response_hooks = tuple(response_hooks)
        self._versions: dict[str, str] = {}

    async def aclose(self) -> None:
        if self.store is not None:
            await self.store.aclose()

    def key(self, call: Call) -> str | None:
        """The request's cache key, if it may be cached: only deterministic requests are."""
        params = call.seqs[0].params
        deterministic = params.temperature == 0 or params.seed is not None
        if (
            self.store is None
            or call.body is None
            or not deterministic
            or not (call.cache_read or call.cache_write)
        ):
            return None
        config = call.model
        if config.id not in self._versions:
            self._versions[config.id] = model_version(config)
        return cache_key(
            endpoint=call.endpoint,
            model=config.id,
            version=self._versions[config.id],
            tenant="*" if self.shared else f"user:{call.ctx.user_id}",
            body=call.body.model_dump(mode="json", by_alias=True),
        )

    def run(self, call: Call, out: Outcome) -> AsyncGenerator[Frame, None]:
        key = self.key(call)
        if key is None and not self.response_hooks:
            return self.next.run(call, out)
        return self._run(call, out, key)

    async def _run(self, call: Call, out: Outcome, key: str | None) -> AsyncGenerator[Frame, None]:
        if key is None or not call.cache_read:
            entry = None
        elif call.ctx.trace is not None:
            entry = await self._traced_lookup(key, call)
        else:
            entry = await self._lookup(key)
        if entry is not None:
            metrics.CACHE_HITS.labels(cache="response").inc()
            out.cache, out.model = "hit", entry.model
            out.prompt_tokens, out.completion_tokens = entry.prompt_tokens, entry.completion_tokens
            out.finish_reason = entry.choices[-1].finish_reason if entry.choices else None
            out.ttft_ms = (time.perf_counter() - out.started) * 1000
            tokens = entry.prompt_tokens + entry.completion_tokens
            async for frame in self.next.replay(call, out, entry.replay(), tokens):
                yield frame
            self._emit(call, entry.model, [c.text for c in entry.choices], cache_hit=True)
            return
        # Pass the live answer through, assembling it; act only if it ends normally (a
        # cancelled or failed one raises out of the loop and is neither stored nor logged).
        choices, usage = shaping.collector(len(call.seqs), call.n)
        async with aclosing(self.next.run(call, out)) as frames:
            async for frame in frames:
                choices[frame.index].add(frame)
                if frame.finish_reason is not None:
                    usage.add(frame)
                yield frame
        whole = all(c.finish_reason in _STORED_FINISHES for c in choices)
        if key is not None and call.cache_write and whole and self.store is not None:
            answer = shaping.Answer(choices, usage, out.model)
            stored = CachedResponse.of(answer, out.prompt_tokens, out.completion_tokens)
            await self.store.set(key, stored.model_dump_json().encode())
        self._emit(call, out.model, [c.text for c in choices], cache_hit=False)

    async def _traced_lookup(self, key: str, call: Call) -> CachedResponse | None:
        """The lookup in a span: hit or miss (never the key: it is a hash of the prompt)."""
        span = tracing.start("cache lookup", call.ctx.trace)
        try:
            entry = await self._lookup(key)
            span.set_attribute("llm_api.cache.hit", entry is not None)
            return entry
        except BaseException as exc:
            tracing.fail(span, exc)
            raise
        finally:
            span.end()

    async def _lookup(self, key: str) -> CachedResponse | None:
        assert self.store is not None
        raw = await self.store.get(key)
        if raw is None:
            metrics.CACHE_MISSES.labels(cache="response").inc()
            return None
        try:
            return CachedResponse.model_validate_json(raw)
        except ValidationError:
            log.warning("cache_entry_invalid", key=key)
            return None

    def _emit(self, call: Call, model: str, outputs: list[str], cache_hit: bool) -> None:
        if not self.response_hooks or call.body is None:
            return
        event = ResponseEvent(call.ctx, call.endpoint, model, call.body, outputs, cache_hit)
        for hook in self.response_hooks:
            try:
                hook(event)
            except Exception:  # a hook must never fail the response it observes
                log.exception("response_hook_failed")


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
