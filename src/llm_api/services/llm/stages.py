"""The run stages of the completion pipeline, composed in services/llm/pipeline.py:

    cache → admission (rate limits + accounting) → fallbacks → backend (route, prepare, gate, n)

Each stage is a small class holding the next stage (or what it needs), built once in the
lifespan. `run(call, out)` returns an async iterator of `Frame`s (each carrying its choice
`index`) and fills `out`, the request's `Outcome`, as it goes: the answering model, token
counts, TTFT, cache status and rate-limit headers, for the route and the access log. Nothing is
written into the `RequestContext` (who asked), and nothing is attached from other modules.
"""

from __future__ import annotations

import asyncio
import inspect
import sys
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, aclosing
from dataclasses import dataclass, field, replace
from typing import Protocol, TypeVar

import structlog

from llm_api.core.exceptions import (
    APIError,
    ContextLengthExceededError,
    RateLimitError,
    ServiceUnavailableError,
)
from llm_api.schemas.common import SamplingFields
from llm_api.services import tracing
from llm_api.services.llm.admission import AdmissionGate
from llm_api.services.llm.backends.base import Backend
from llm_api.services.llm.priority import Tickets, observe_admission, prompt_cost
from llm_api.services.llm.registry import ModelConfig
from llm_api.services.llm.streams import first_then_rest
from llm_api.services.llm.types import CompletionRecord, Frame, GenerationRequest, RequestContext

log = structlog.get_logger(__name__)
T = TypeVar("T")

# Told what each request cost, once, in the order given (the rate limiter's settlement first).
Subscriber = Callable[[CompletionRecord], Awaitable[None] | None]
# The rate limiter's admission: called before any preparation with the tokens and the money
# (nano-dollars, services/money/prices.py) to reserve; raises to refuse (429); returns the
# x-ratelimit-* (and budget) headers the response carries.
Admit = Callable[[RequestContext, int, int], Awaitable[dict[str, str]]]


@dataclass(slots=True)
class Call:
    """One validated request: who asked, the engine requests, and how it is to be answered."""

    ctx: RequestContext
    endpoint: str  # chat | completions | responses
    model: ModelConfig  # the model asked for; `candidates` adds its allowed fallbacks
    candidates: list[ModelConfig]
    seqs: list[GenerationRequest]  # prompt-major: n choices of each prompt
    stream: bool
    n: int = 1
    # The wire request (cache key, conversation log) and whether the client allows the cache
    # to be read and written (Cache-Control).
    body: SamplingFields | None = None
    cache_read: bool = True
    cache_write: bool = True


@dataclass(slots=True)
class Outcome:
    """What the pipeline tells its caller about one request: final once its frames ended.

    The route turns it into headers (x-cache, x-ratelimit-*) and hands it to the access log."""

    model: str  # the model that answered (after any fallback)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    ttft_ms: float | None = None
    cache: str = "miss"  # hit | miss
    headers: dict[str, str] = field(default_factory=dict)  # x-ratelimit-*
    finish_reason: str | None = None
    # What the request cost (nano-dollars); final with the token counts. The usage bodies'
    # `cost` and the accounting record read this one number, so they always agree.
    cost_nanos: int = 0
    # Book-keeping of the current attempt, for the accounting record.
    started: float = field(default_factory=time.perf_counter)
    admitted: float | None = None  # the model's slot was taken
    seqs: list[GenerationRequest] = field(default_factory=list)


class Stage(Protocol):
    def run(self, call: Call, out: Outcome) -> AsyncGenerator[Frame, None]: ...


class Accounting:
    """Hands one `CompletionRecord` per request to the subscribers given here, in order."""

    def __init__(self, subscribers: Sequence[Subscriber]) -> None:
        self.subscribers = tuple(subscribers)

    async def record(self, record: CompletionRecord) -> None:
        for subscriber in self.subscribers:
            result = subscriber(record)
            if inspect.isawaitable(result):
                await result


class AdmissionStage:
    """Rate limits before any work, and the request's accounting record after it.

    Admission comes before any preparation, so tokenizing an over-long prompt or compiling a
    grammar is never free: a request that fails after it still counted against the caller's
    request limits (OpenAI counts failed requests too), and its reserved tokens come back
    (no model processed them). Every admitted request is recorded once, failed, cancelled or
    not; refused ones are not (a client hammering 429s is no database write per refusal)."""

    def __init__(
        self,
        next_stage: Stage,
        admit: Admit | None,
        accounting: Accounting,
        drain_cut: asyncio.Event,
    ) -> None:
        self.next = next_stage
        self.admit = admit
        self.accounting = accounting
        # Set by the drainer when it cuts in-flight work at the drain deadline: a cancellation
        # after that is the server's (503), not a client's (499).
        self.drain_cut = drain_cut

    async def check(self, ctx: RequestContext, tokens: int, out: Outcome, cost: int = 0) -> None:
        """The limiter's admission alone (embeddings share it): 429 when refused. `cost`:
        the most the request may cost (nano-dollars), reserved against its budgets."""
        if self.admit is not None:
            if ctx.trace is not None:
                await self._traced_check(self.admit, ctx, tokens, cost, out)
                return
            out.headers = await self.admit(ctx, tokens, cost)

    @staticmethod
    async def _traced_check(
        admit: Admit, ctx: RequestContext, tokens: int, cost: int, out: Outcome
    ) -> None:
        """The limiter's decision in a span: allowed or refused, the tokens reserved."""
        span = tracing.start(
            "rate_limit", ctx.trace, attributes={"llm_api.rate_limit.reserved_tokens": tokens}
        )
        try:
            out.headers = await admit(ctx, tokens, cost)
            span.set_attribute("llm_api.rate_limit.decision", "allowed")
        except BaseException as exc:
            refused = isinstance(exc, RateLimitError)
            span.set_attribute("llm_api.rate_limit.decision", "refused" if refused else "error")
            tracing.fail(span, exc)
            raise
        finally:
            span.end()

    async def run(self, call: Call, out: Outcome) -> AsyncGenerator[Frame, None]:
        status, cancelled, admitted = 200, False, False
        try:
            tokens, cost = _reservation(call.seqs, call.candidates)
            await self.check(call.ctx, tokens, out, cost)
            admitted = True
            async with aclosing(self.next.run(call, out)) as frames:
                async for frame in frames:
                    yield frame
        except BaseException as exc:
            status, cancelled = ended(exc, self.drain_cut, out.headers)
            raise
        finally:
            # Prompt tokens count once a model took the request (its slot): a prompt refused in
            # preparation (too long, a bad grammar) was tokenized but never processed.
            if out.admitted is not None:
                out.prompt_tokens = sum(s.prompt_tokens or 0 for s in out.seqs[:: call.n])
            else:
                out.prompt_tokens = 0
            out.cost_nanos = _cost(call, out, status)
            if admitted:
                await self.accounting.record(_record(call, out, status, cancelled))

    async def replay(
        self, call: Call, out: Outcome, frames: list[Frame], tokens: int
    ) -> AsyncGenerator[Frame, None]:
        """A cached answer: a hit is still a request, counted against the caller's limits like
        any other (requests, concurrency, the tokens it delivers) and recorded as a hit."""
        await self.check(call.ctx, tokens, out)  # a hit costs nothing (docs/usage.md)
        out.admitted = out.started
        out.cost_nanos = 0
        await self.accounting.record(_record(call, out, 200, False, cache_hit=True))
        for frame in frames:
            yield frame


class FallbackStage:
    """The model asked for, then its fallbacks the caller may use, while nothing has reached
    the client: a stream until its first frame, a non-streaming answer until whole (it is held,
    so a failure anywhere in it falls back too). Only failures worth another model fall back
    (`falls_back`); the last candidate's error stands."""

    def __init__(self, next_stage: Stage) -> None:
        self.next = next_stage

    def run(self, call: Call, out: Outcome) -> AsyncGenerator[Frame, None]:
        if len(call.candidates) == 1 and call.stream:
            return self.next.run(call, out)  # nothing to fall back to: no layer in between
        return self._run(call, out)

    async def _run(self, call: Call, out: Outcome) -> AsyncGenerator[Frame, None]:
        pristine = [_copy(s) for s in call.seqs] if len(call.candidates) > 1 else call.seqs

        async def attempt(model: ModelConfig) -> AsyncGenerator[Frame, None] | list[Frame]:
            this = call
            if model is not call.model:
                this = replace(call, model=model, seqs=[_copy(s, model.id) for s in pristine])
            frames = await first_then_rest(self.next.run(this, out))
            if call.stream:
                return frames
            return [f async for f in frames]  # held until whole, see above

        answer = await first_success(call.candidates, attempt)
        if isinstance(answer, list):
            for frame in answer:
                yield frame
            return
        async with aclosing(answer):
            async for frame in answer:
                yield frame


async def first_success(
    candidates: Sequence[ModelConfig], attempt: Callable[[ModelConfig], Awaitable[T]]
) -> T:
    """`attempt` with each candidate in turn until one succeeds; only failures worth another
    model (`falls_back`) move on, and the last candidate's error stands. Shared by completions
    (the fallback stage) and embeddings."""
    for i, model in enumerate(candidates):
        try:
            return await attempt(model)
        except APIError as exc:
            if i + 1 == len(candidates) or not falls_back(exc):
                raise
            log.warning("model_fallback", model=model.id, to=candidates[i + 1].id, error=exc.code)
    raise AssertionError("no candidates")  # a call always has its own model


class BackendStage:
    """One model: its backend (an upstream router is one too), preparation (tokenize, context
    check, grammar), its admission gate's slot, then every choice. Keeps `out`'s counts; a new
    attempt's replace a failed one's (the record describes the answer the client got)."""

    def __init__(
        self,
        backends: dict[str, Backend],
        gates: dict[str, AdmissionGate],
        tickets: Tickets | None = None,
    ) -> None:
        self.backends = backends
        self.gates = gates
        # Each request's fair-queuing ticket (tenant, weight, expected tokens, priority).
        self.tickets = tickets or Tickets({}, 256, frozenset())

    def run(self, call: Call, out: Outcome) -> AsyncGenerator[Frame, None]:
        if call.ctx.trace is None:  # tracing off: nothing but this check
            return self._run(call, out, None)
        return self._traced(call, out)

    async def _traced(self, call: Call, out: Outcome) -> AsyncGenerator[Frame, None]:
        """`_run` in the generation's span (GenAI conventions): the request as the model got
        it, time to first token as an event, usage and finish reasons at the end; an upstream
        request continues this span's trace (`GenerationRequest.trace`)."""
        model, seqs = call.model, call.seqs
        params = seqs[0].params
        span = tracing.start(
            f"{tracing.OPERATIONS.get(call.endpoint, 'chat')} {model.id}",
            call.ctx.trace,
            tracing.SpanKind.INTERNAL if model.backend == "llama_cpp" else tracing.SpanKind.CLIENT,
            tracing.generation_attributes(
                call.endpoint,
                model.id,
                model.backend,
                model.base_url,
                params.max_tokens,
                params.temperature,
                params.top_p,
                params.seed,
                call.n,
            ),
        )
        here = tracing.context_of(span, call.ctx.trace)
        for seq in seqs:
            seq.trace = here
        capture = tracing.CAPTURE_CONTENT
        if capture:
            span.set_attribute(
                "gen_ai.input.messages", tracing.messages_json(seqs[0].messages, seqs[0].prompt)
            )
        finishes: list[str | None] = [None] * len(seqs)
        texts: list[str] = [""] * len(seqs) if capture else []
        first = True
        try:
            async with aclosing(self._run(call, out, span)) as frames:
                async for frame in frames:
                    if first and frame.text:
                        first = False
                        span.add_event("first_token", {"llm_api.ttft_ms": out.ttft_ms or 0})
                    if frame.finish_reason is not None:
                        finishes[frame.index] = frame.finish_reason
                    if capture and frame.text:
                        texts[frame.index] += frame.text
                    yield frame
        except (asyncio.CancelledError, GeneratorExit):
            span.set_attribute("llm_api.cancelled", True)
            span.set_status(tracing.Status(tracing.StatusCode.ERROR, "cancelled"))
            raise
        except BaseException as exc:
            tracing.fail(span, exc)
            raise
        finally:
            span.set_attribute("gen_ai.response.model", out.model)
            span.set_attribute(
                "gen_ai.usage.input_tokens", sum(s.prompt_tokens or 0 for s in seqs[:: call.n])
            )
            span.set_attribute("gen_ai.usage.output_tokens", out.completion_tokens)
            if out.cached_tokens:
                span.set_attribute("gen_ai.usage.cache_read.input_tokens", out.cached_tokens)
            if any(f is not None for f in finishes):
                span.set_attribute("gen_ai.response.finish_reasons", [f or "" for f in finishes])
            if out.ttft_ms is not None:
                span.set_attribute("llm_api.ttft_ms", out.ttft_ms)
            if capture:
                span.set_attribute("gen_ai.output.messages", tracing.output_json(texts, finishes))
            span.end()

    async def _run(
        self, call: Call, out: Outcome, span: tracing.Span | None
    ) -> AsyncGenerator[Frame, None]:
        model, seqs = call.model, call.seqs
        out.model, out.seqs = model.id, seqs
        out.admitted = out.finish_reason = out.ttft_ms = None
        out.completion_tokens = out.cached_tokens = 0
        for seq in seqs:
            seq.buffered = not call.stream
        backend = self.backends[model.id]
        if not backend.ready:
            raise ServiceUnavailableError(f"Model `{model.id}` is loading; retry shortly.")
        await _prepare(backend, seqs)  # errors here are plain 4xx, raised before streaming
        tokens = [0] * len(seqs)  # per choice; authoritative once its finish frame arrives

        def count(frame: Frame) -> None:
            index = frame.index
            if frame.text and out.ttft_ms is None:
                out.ttft_ms = (time.perf_counter() - out.started) * 1000
            tokens[index] += frame.tokens
            if frame.finish_reason is not None:
                out.finish_reason = frame.finish_reason
                if frame.completion_tokens is not None:
                    tokens[index] = frame.completion_tokens
                if frame.prompt_tokens is not None:
                    seqs[index].prompt_tokens = frame.prompt_tokens
                if frame.cached_tokens and index % call.n == 0:  # a shared prompt counts once
                    out.cached_tokens += frame.cached_tokens
            out.completion_tokens = sum(tokens)

        gate = self.gates[model.id]
        ticket = self.tickets.ticket(call.ctx, seqs)
        slot: AbstractAsyncContextManager[object] = gate.slot(ticket)
        if span is not None:  # the wait for the model's slot as a span of its own
            waiting = {"llm_api.queue.waiting": gate.waiting, "llm_api.queue.running": gate.running}
            slot = tracing.TracedWait(slot, tracing.context_of(span), waiting)
        async with slot:
            out.admitted = time.perf_counter()
            observe_admission(model.id, ticket)
            for seq in seqs:
                seq.prefill_rank, seq.prefill_standing = ticket.rank, ticket.standing
            try:
                if len(seqs) == 1:  # the common case, without _choices' generator in between
                    async with aclosing(backend.generate(seqs[0])) as frames:
                        async for frame in frames:
                            count(frame)
                            yield frame
                    return
                async for frame in _choices(backend, seqs):
                    count(frame)
                    yield frame
            finally:  # what it really cost corrects the tenant's fair-queuing clock
                ticket.used = sum(prompt_cost(s) for s in seqs) + out.completion_tokens


async def _prepare(backend: Backend, seqs: list[GenerationRequest]) -> None:
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


async def _choices(backend: Backend, seqs: list[GenerationRequest]) -> AsyncGenerator[Frame, None]:
    """Every choice of one request (n > 1) at once, frames tagged with their choice index in
    arrival order: the batched engine decodes n choices in the same steps (n× faster than one
    after another), and upstream choices run as concurrent requests. A failing choice fails the
    request and cancels the others; so does the consumer going away."""
    # Unbounded, but bounded in practice: at most max_tokens frames per choice.
    queue: asyncio.Queue[Frame | None | BaseException] = asyncio.Queue()

    async def pump(index: int, seq: GenerationRequest) -> None:
        try:
            async with aclosing(backend.generate(seq)) as frames:
                async for frame in frames:
                    frame.index = index
                    queue.put_nowait(frame)
            queue.put_nowait(None)
        except Exception as exc:  # re-raised in the consumer, in order
            queue.put_nowait(exc)

    tasks = [asyncio.create_task(pump(i, seq)) for i, seq in enumerate(seqs)]
    try:
        running = len(tasks)
        while running:
            item = await queue.get()
            if isinstance(item, BaseException):
                raise item
            if item is None:
                running -= 1
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def ended(
    exc: BaseException, drain_cut: asyncio.Event, headers: dict[str, str]
) -> tuple[int, bool]:
    """(status, cancelled) of an admitted request that ended with `exc`, for its record: a
    cancellation is the drain's cut (503) once the drainer set `drain_cut`, else the client
    going away (499); an API error keeps its status and answers with the request's rate-limit
    headers; anything else is a 500."""
    if isinstance(exc, asyncio.CancelledError | GeneratorExit):
        return (503, False) if drain_cut.is_set() else (499, True)
    if isinstance(exc, APIError):
        carry_headers(exc, headers)
        return exc.status_code, False
    return 500, False


def carry_headers(exc: APIError, headers: dict[str, str]) -> None:
    """An error after admission still answers with the request's rate-limit headers (it
    counted against them)."""
    for name, value in headers.items():
        exc.headers.setdefault(name, value)


def _record(
    call: Call, out: Outcome, status: int, cancelled: bool, *, cache_hit: bool = False
) -> CompletionRecord:
    now = time.perf_counter()
    ctx = call.ctx
    return CompletionRecord(
        request_id=ctx.request_id,
        model=out.model,
        endpoint=call.endpoint,
        user_id=ctx.user_id,
        key_id=ctx.key_id,
        batch_id=ctx.batch_id,
        prompt_tokens=out.prompt_tokens,
        completion_tokens=out.completion_tokens,
        finish_reason=out.finish_reason,
        status=status,
        cache_hit=cache_hit,
        cancelled=cancelled,
        ttft_ms=out.ttft_ms,
        latency_ms=(out.ttft_ms if cache_hit and out.ttft_ms else (now - out.started) * 1000),
        queue_ms=((out.admitted or now) - out.started) * 1000 if not cache_hit else 0.0,
        stream=call.stream,
        cost_nanos=out.cost_nanos,
        team_id=ctx.team_id,
    )


def _cost(call: Call, out: Outcome, status: int) -> int:
    """What the answering model's prices make of the tokens used. A failure of ours before
    any output costs nothing (the limiter settles it to 0 tokens too)."""
    if status >= 500 and out.completion_tokens == 0:
        return 0
    model = next((c for c in call.candidates if c.id == out.model), call.model)
    return model.pricing.cost(out.prompt_tokens, out.cached_tokens, out.completion_tokens)


def _copy(seq: GenerationRequest, model: str | None = None) -> GenerationRequest:
    """A fresh sequence for another attempt: params as the client asked, no engine state."""
    return replace(
        seq,
        model=model or seq.model,
        params=replace(seq.params, stop=list(seq.params.stop)),
        prompt_tokens=None,
        engine_state={},
    )


def _reservation(seqs: list[GenerationRequest], candidates: list[ModelConfig]) -> tuple[int, int]:
    """(tokens, nano-dollars) a request may use: each distinct prompt once (n choices share
    it) plus every sequence's max_tokens. Reserved before tokenizing, so prompts are estimated
    from their characters as OpenAI does (1 token per 3 characters), and settled to the real
    usage afterwards. Where every candidate model's context window is enforced here (`window`,
    local models), no prompt or completion can be larger than it: an absurd max_tokens is then
    the 400 it deserves (context too long), not a 429 for a request larger than the limit.

    Money is reserved from an upper bound instead, so that a budget is never overrun by an
    estimate: a byte-level tokenizer never makes more tokens than the UTF-8 bytes it reads,
    plus an allowance per message and per prompt for the chat template (MONEY_*), at the
    dearest candidate's prices."""
    cap = window = _window(candidates) or sys.maxsize
    prompts: dict[int, tuple[int, int]] = {}
    for seq in seqs:
        source = seq.messages if seq.messages is not None else seq.prompt
        chars = sum(len(m.content) for m in seq.messages or []) + len(seq.prompt or "")
        bound = _prompt_bound(seq)
        prompts[id(source)] = (min(chars // 3 + 1, cap), min(bound, window))
    completion = sum(min(seq.params.max_tokens, cap) for seq in seqs)
    tokens = sum(t for t, _ in prompts.values()) + completion
    priced = [c.pricing.per_token() for c in candidates]
    input_price = max(max(p[0], p[1]) for p in priced)
    output_price = max(p[2] for p in priced)
    cost = sum(b for _, b in prompts.values()) * input_price + completion * output_price
    return tokens, cost


# The chat template's tokens around each message and the whole prompt, beyond its text.
MONEY_TOKENS_PER_MESSAGE = 16
MONEY_TOKENS_PER_PROMPT = 64


def _prompt_bound(seq: GenerationRequest) -> int:
    """At least as many tokens as the prompt can have (see _reservation)."""
    size = len((seq.prompt or "").encode())
    for m in seq.messages or ():
        size += len(m.content.encode()) + MONEY_TOKENS_PER_MESSAGE
        for c in m.tool_calls or ():
            size += len(c.arguments.encode()) + len(c.name.encode()) + MONEY_TOKENS_PER_MESSAGE
    for t in seq.tools or ():
        size += len(str(t.parameters).encode()) + len((t.description or "").encode()) + 64
    return size + MONEY_TOKENS_PER_PROMPT


def _window(candidates: list[ModelConfig]) -> int | None:
    """The largest context window among the candidates, if this service enforces each one."""
    if all(c.backend == "llama_cpp" for c in candidates):
        return max(c.context_length for c in candidates)
    return None


def falls_back(exc: APIError) -> bool:
    """Worth another model: it failed, timed out, is overloaded or rate limited, or the context
    was too long for it. Other 4xx are the request's fault and would fail anywhere."""
    return exc.status_code >= 500 or isinstance(exc, (RateLimitError, ContextLengthExceededError))
