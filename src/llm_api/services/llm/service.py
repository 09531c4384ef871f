"""The LLM service: picks the model (tier, kind) for a wire request and has its protocol module
(api/v1/*/protocol.py) make the engine requests, admits them through each model's gate, and
runs the backend (retries and fallbacks included), yielding the pipeline's frames. The serving
modules (api/v1/*/serving.py) make OpenAI chunks or whole responses of them.

Streaming and non-streaming are two consumers of the same frame iterator.
"""

from __future__ import annotations

import asyncio
import inspect
import sys
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass, field, replace

import structlog

from llm_api.api.v1.chat import protocol as chat_protocol
from llm_api.api.v1.completions import protocol as completions_protocol
from llm_api.core.config import Settings
from llm_api.core.exceptions import (
    APIError,
    ContextLengthExceededError,
    InvalidRequestError,
    ModelNotFoundError,
    PaymentRequiredError,
    RateLimitError,
    ServiceUnavailableError,
)
from llm_api.schemas.chat import ChatCompletionRequest
from llm_api.schemas.completions import CompletionRequest
from llm_api.services.llm import shaping
from llm_api.services.llm.admission import AdmissionGate
from llm_api.services.llm.backends.base import Backend
from llm_api.services.llm.capabilities import check_capabilities
from llm_api.services.llm.fingerprint import fingerprints
from llm_api.services.llm.registry import ModelConfig, Registry
from llm_api.services.llm.shaping import Answer
from llm_api.services.llm.types import (
    CompletionRecord,
    Frame,
    GenerationRequest,
    RequestContext,
)

Observer = Callable[[CompletionRecord], Awaitable[None] | None]
# A request already turned into engine requests (chat_requests / completion_requests), so a
# caller that validated first (the cache layer) does not build them twice.
Planned = tuple[ModelConfig, list[GenerationRequest]]
# Called before any preparation (tokenizing, compiling a grammar) with the tokens to reserve
# (estimated prompt + max_tokens); raises to refuse (the rate limiter's 429). Settled through the
# observers, whatever happens after it: a request that then fails still counted.
AdmissionHook = Callable[[RequestContext, int], Awaitable[None]]
log = structlog.get_logger(__name__)


@dataclass(slots=True)
class _Run:
    """Book-keeping for one request while it streams."""

    ctx: RequestContext
    model: ModelConfig
    endpoint: str
    stream: bool
    started: float = field(default_factory=time.perf_counter)
    admitted: float | None = None  # the current attempt got its model's slot
    first_token: float | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None
    limited: bool = False  # passed the admission hooks (rate limits): the request gets a record


class LLMService:
    def __init__(self, settings: Settings, registry: Registry, backends: dict[str, Backend]):
        self.settings = settings
        self.registry = registry
        self.backends = backends
        self.gates = {
            m.id: AdmissionGate(m.id, m.concurrency, m.max_queue) for m in registry.models
        }
        self.observers: list[Observer] = []
        self.admission_hooks: list[AdmissionHook] = []
        self.started_at = int(time.time())
        self.fingerprints = fingerprints(registry)  # `system_fingerprint` per local model
        # Set by the drainer (core/drain.py) when it cuts in-flight work at the drain deadline:
        # a cancellation after that is the server's, recorded as 503, not a client's 499.
        self.drain_cut = asyncio.Event()

    # --- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        for backend in self.backends.values():
            await backend.start(warmup=self.settings.warmup)

    async def aclose(self) -> None:
        for backend in self.backends.values():
            await backend.aclose()

    @property
    def ready(self) -> bool:
        return all(b.ready for b in self.backends.values())

    # --- models ---------------------------------------------------------------------------------

    def get_model(self, model_id: str) -> ModelConfig:
        config = self.registry.get(model_id)
        if config is None:
            raise ModelNotFoundError(model_id)
        return config

    def get_model_for(self, model_id: str, ctx: RequestContext) -> ModelConfig:
        """The model, if the caller's tier may use it (a paid model answers free users 402)."""
        config = self.get_model(model_id)
        if not _entitled(config, ctx):
            raise PaymentRequiredError("Paid subscription required", param="model")
        return config

    def _generative(self, model_id: str, ctx: RequestContext) -> ModelConfig:
        """A model for chat or text completion: an embedding model cannot generate."""
        config = self.get_model_for(model_id, ctx)
        if config.kind == "embedding":
            raise InvalidRequestError(
                f"The model `{model_id}` is an embedding model; use it with /v1/embeddings.",
                param="model",
            )
        return config

    def _candidates(self, config: ModelConfig, ctx: RequestContext) -> list[ModelConfig]:
        """The model asked for, then its fallbacks that the caller may use: a fallback passes the
        same tier check as a direct request, so a free model's paid fallback never answers a
        free user (it is skipped, and the free model's own error stands)."""
        fallbacks = (self.get_model(f) for f in config.fallbacks)
        return [config, *(f for f in fallbacks if _entitled(f, ctx))]

    def _backend(self, config: ModelConfig) -> Backend:
        backend = self.backends[config.id]
        if not backend.ready:
            raise ServiceUnavailableError(f"Model `{config.id}` is loading; retry shortly.")
        return backend

    # --- requests -----------------------------------------------------------------------------

    def chat_requests(
        self, req: ChatCompletionRequest, ctx: RequestContext
    ) -> tuple[ModelConfig, list[GenerationRequest]]:
        """The model (tier and kind checked here) and its engine requests (the protocol's)."""
        config = self._generative(req.model, ctx)
        check_capabilities(req, config)
        return config, chat_protocol.chat_requests(req, config, self.settings, ctx.request_id)

    def completion_requests(
        self, req: CompletionRequest, ctx: RequestContext
    ) -> tuple[ModelConfig, list[GenerationRequest]]:
        config = self._generative(req.model, ctx)
        check_capabilities(req, config)
        seqs = completions_protocol.completion_requests(req, config, self.settings, ctx.request_id)
        return config, seqs

    async def _prepare(self, backend: Backend, seqs: list[GenerationRequest]) -> None:
        for seq in seqs:
            await backend.prepare(seq)
            if seq.prompt_tokens is None:
                continue  # upstreams check their own context window
            ctx_len = backend.config.context_length
            room = ctx_len - seq.prompt_tokens
            if room < 1 or (seq.explicit_max_tokens and seq.params.max_tokens > room):
                raise ContextLengthExceededError(
                    f"This model's maximum context length is {ctx_len} tokens. However, you "
                    f"requested {seq.prompt_tokens + seq.params.max_tokens} tokens "
                    f"({seq.prompt_tokens} in the messages, {seq.params.max_tokens} in the "
                    "completion). Please reduce the length of the messages or completion.",
                    param="messages",
                )
            seq.params.max_tokens = min(seq.params.max_tokens, room)

    # --- running --------------------------------------------------------------------------------

    async def run(
        self,
        config: ModelConfig,
        seqs: list[GenerationRequest],
        ctx: RequestContext,
        *,
        endpoint: str,
        stream: bool,
        n: int = 1,
    ) -> AsyncGenerator[Frame, None]:
        """Admit, validate, generate. Yields frames, `index` set to their choice. Tells the
        observers what the request cost whatever happens after admission (success, error,
        cancellation), once.

        Admission (the hooks: rate, token and concurrency limits) comes before any preparation,
        so tokenizing an over-long prompt or compiling a grammar is never free: a request that
        fails after it has still counted against the caller's request limits (OpenAI counts
        failed requests too), and its reserved tokens come back (no model processed them).

        When the model fails before its first chunk (an upstream error or timeout, 429, 503,
        context too long) and lists `fallbacks`, those the caller may use are tried in order.
        Nothing has reached the client then: streams wait for the first chunk (`_started`), and
        a non-streaming answer is held until whole, so a failure anywhere in it falls back too."""
        candidates = self._candidates(config, ctx)
        for seq in seqs:
            seq.buffered = not stream
        pristine = [_copy(s) for s in seqs] if len(candidates) > 1 else seqs
        run = _Run(ctx=ctx, model=config, endpoint=endpoint, stream=stream)
        ctx.model = config.id
        status, cancelled = 200, False
        try:
            reservation = _reservation(seqs, _window(candidates))
            for hook in self.admission_hooks:
                await hook(ctx, reservation)
            run.limited = True
            for i, model in enumerate(candidates):
                attempt_seqs = seqs if i == 0 else [_copy(s, model.id) for s in pristine]
                run.model, ctx.model, seqs = model, model.id, attempt_seqs
                chunks = self._attempt(model, attempt_seqs, ctx, run)
                try:
                    first = await anext(chunks, None)
                    # Non-streaming: the rest too, before anything goes out (see above).
                    held = [] if stream or first is None else [c async for c in chunks]
                except APIError as exc:
                    await chunks.aclose()
                    if i + 1 == len(candidates) or not _falls_back(exc):
                        raise
                    log.warning(
                        "model_fallback", model=model.id, to=candidates[i + 1].id, error=exc.code
                    )
                    continue
                try:
                    if first is not None:
                        yield first
                    for item in held:
                        yield item
                    async for item in chunks:
                        yield item
                finally:
                    await chunks.aclose()
                return
        except (asyncio.CancelledError, GeneratorExit):
            # The drain's cut, or the client going away (which is what cancels us otherwise).
            status, cancelled = (503, False) if self.drain_cut.is_set() else (499, True)
            raise
        except APIError as exc:
            status = exc.status_code
            raise
        except Exception:
            status = 500
            raise
        finally:
            # Prompt tokens count once a model took the request (its slot): a prompt refused in
            # preparation (too long, a bad grammar) was tokenized but never processed.
            counted = run.admitted is not None
            run.prompt_tokens = sum(s.prompt_tokens or 0 for s in seqs[::n]) if counted else 0
            ctx.prompt_tokens, ctx.completion_tokens = run.prompt_tokens, run.completion_tokens
            # Every admitted request is recorded (and so settles its limits), failed or not;
            # requests the rate limiter refused are not: a client hammering 429s must not turn
            # into a database write per refusal.
            if run.limited:
                await self._notify(run, status, cancelled)

    async def _attempt(
        self, config: ModelConfig, seqs: list[GenerationRequest], ctx: RequestContext, run: _Run
    ) -> AsyncGenerator[Frame, None]:
        """One model: prepare, take its slot, generate, keeping `run`'s counts (a new attempt's
        replace a failed one's: the record describes the answer the client got)."""
        run.admitted = run.first_token = run.finish_reason = ctx.ttft_ms = None
        run.completion_tokens = 0
        backend = self._backend(config)
        await self._prepare(backend, seqs)  # errors here are plain 4xx, raised before streaming
        tokens = [0] * len(seqs)  # per choice; authoritative once its finish chunk arrives

        def count(index: int, chunk: Frame) -> None:
            if run.first_token is None and (chunk.text or chunk.tool_calls or chunk.reasoning):
                run.first_token = time.perf_counter()
                ctx.ttft_ms = (run.first_token - run.started) * 1000
            tokens[index] += chunk.tokens
            if chunk.finish_reason is not None:
                run.finish_reason = chunk.finish_reason
                if chunk.completion_tokens is not None:
                    tokens[index] = chunk.completion_tokens
                if chunk.prompt_tokens is not None:
                    seqs[index].prompt_tokens = chunk.prompt_tokens
            run.completion_tokens = sum(tokens)

        async with self.gates[config.id].slot():
            run.admitted = time.perf_counter()
            if len(seqs) == 1:  # the common case, without _choices' generator in between
                async with aclosing(backend.generate(seqs[0])) as chunks:
                    async for chunk in chunks:
                        count(0, chunk)
                        yield chunk
                return
            async for chunk in _choices(backend, seqs):
                count(chunk.index, chunk)
                yield chunk

    async def _notify(self, run: _Run, status: int, cancelled: bool) -> None:
        now = time.perf_counter()
        record = CompletionRecord(
            request_id=run.ctx.request_id,
            model=run.model.id,
            endpoint=run.endpoint,
            user_id=run.ctx.user_id,
            key_id=run.ctx.key_id,
            batch_id=run.ctx.batch_id,
            prompt_tokens=run.prompt_tokens,
            completion_tokens=run.completion_tokens,
            finish_reason=run.finish_reason,
            status=status,
            cache_hit=False,
            cancelled=cancelled,
            ttft_ms=(run.first_token - run.started) * 1000 if run.first_token else None,
            latency_ms=(now - run.started) * 1000,
            queue_ms=((run.admitted or now) - run.started) * 1000,
            stream=run.stream,
        )
        for observer in self.observers:
            result = observer(record)
            if inspect.isawaitable(result):
                await result

    # --- answers ------------------------------------------------------------------------------
    # What the serving layer (api/v1/*/serving.py) encodes: a stream of frames, started (its
    # first frame in, so errors are still plain HTTP errors), or a whole `Answer`. The model that
    # answered (after any fallback) is `ctx.model`.

    async def chat_stream(
        self, req: ChatCompletionRequest, ctx: RequestContext, planned: Planned | None = None
    ) -> AsyncGenerator[Frame, None]:
        config, seqs = planned or self.chat_requests(req, ctx)
        return await self._started(config, seqs, ctx, "chat", req.n)

    async def _started(
        self,
        config: ModelConfig,
        seqs: list[GenerationRequest],
        ctx: RequestContext,
        endpoint: str,
        n: int,
    ) -> AsyncGenerator[Frame, None]:
        """Start a stream and wait for its first frame, so that validation, admission and
        upstream errors surface as plain HTTP errors before any byte is sent."""
        chunks = self.run(config, seqs, ctx, endpoint=endpoint, stream=True, n=n)
        first = await anext(chunks, None)

        async def resumed() -> AsyncGenerator[Frame, None]:
            try:
                if first is not None:
                    yield first
                async for item in chunks:
                    yield item
            finally:
                await chunks.aclose()

        return resumed()

    async def chat(
        self, req: ChatCompletionRequest, ctx: RequestContext, planned: Planned | None = None
    ) -> Answer:
        config, seqs = planned or self.chat_requests(req, ctx)
        return await self._answer(config, seqs, ctx, "chat", req.n)

    async def completion_stream(
        self, req: CompletionRequest, ctx: RequestContext, planned: Planned | None = None
    ) -> AsyncGenerator[Frame, None]:
        config, seqs = planned or self.completion_requests(req, ctx)
        return await self._started(config, seqs, ctx, "completions", req.n)

    async def completion(
        self, req: CompletionRequest, ctx: RequestContext, planned: Planned | None = None
    ) -> Answer:
        config, seqs = planned or self.completion_requests(req, ctx)
        return await self._answer(config, seqs, ctx, "completions", req.n)

    async def _answer(
        self,
        config: ModelConfig,
        seqs: list[GenerationRequest],
        ctx: RequestContext,
        endpoint: str,
        n: int,
    ) -> Answer:
        frames = self.run(config, seqs, ctx, endpoint=endpoint, stream=False, n=n)
        answer = await shaping.collect(frames, len(seqs), n)
        answer.model = ctx.model or config.id
        return answer


async def _choices(backend: Backend, seqs: list[GenerationRequest]) -> AsyncGenerator[Frame, None]:
    """Every choice of one request (n > 1) at once, frames given their choice's index, in
    arrival order: the batched engine decodes n choices in the same steps (n× faster than one
    after another), and upstream choices run as concurrent requests. A failing choice fails the
    request and cancels the others; so does the consumer going away."""
    # Unbounded, but bounded in practice: at most max_tokens chunks per choice.
    queue: asyncio.Queue[tuple[int, Frame | None] | BaseException] = asyncio.Queue()

    async def pump(index: int, seq: GenerationRequest) -> None:
        try:
            async with aclosing(backend.generate(seq)) as chunks:
                async for chunk in chunks:
                    queue.put_nowait((index, chunk))
            queue.put_nowait((index, None))
        except Exception as exc:  # re-raised in the consumer, in order
            queue.put_nowait(exc)

    tasks = [asyncio.create_task(pump(i, seq)) for i, seq in enumerate(seqs)]
    try:
        running = len(tasks)
        while running:
            item = await queue.get()
            if isinstance(item, BaseException):
                raise item
            index, piece = item
            if piece is None:
                running -= 1
            else:
                piece.index = index
                yield piece
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _copy(seq: GenerationRequest, model: str | None = None) -> GenerationRequest:
    """A fresh sequence for another attempt: params as the client asked, no engine state."""
    return replace(
        seq,
        model=model or seq.model,
        params=replace(seq.params, stop=list(seq.params.stop)),
        prompt_tokens=None,
        engine_state={},
    )


def _reservation(seqs: list[GenerationRequest], window: int | None) -> int:
    """Tokens a request may use: each distinct prompt once (n choices share it) plus every
    sequence's max_tokens. Reserved before tokenizing, so prompts are estimated from their
    characters as OpenAI does (1 token per 3 characters), and settled to the real usage
    afterwards. Where every candidate model's context window is enforced here (`window`, local
    models), no prompt or completion can be larger than it: an absurd max_tokens is then the
    400 it deserves (context too long), not a 429 for a request larger than the limit."""
    cap = window or sys.maxsize
    prompts: dict[int, int] = {}
    for seq in seqs:
        source = seq.messages if seq.messages is not None else seq.prompt
        chars = sum(len(m.content) for m in seq.messages or []) + len(seq.prompt or "")
        prompts[id(source)] = min(chars // 3 + 1, cap)
    return sum(prompts.values()) + sum(min(seq.params.max_tokens, cap) for seq in seqs)


def _window(candidates: list[ModelConfig]) -> int | None:
    """The largest context window among the candidates, if this service enforces each one."""
    if all(c.backend == "llama_cpp" for c in candidates):
        return max(c.context_length for c in candidates)
    return None


def _entitled(config: ModelConfig, ctx: RequestContext) -> bool:
    """Whether the caller's tier may use the model: paid models are for paid callers."""
    return config.tier != "paid" or ctx.tier == "paid"


def _falls_back(exc: APIError) -> bool:
    """Worth another model: it failed, timed out, is overloaded or rate limited, or the context
    was too long for it. Other 4xx are the request's fault and would fail anywhere."""
    return exc.status_code >= 500 or isinstance(exc, (RateLimitError, ContextLengthExceededError))
