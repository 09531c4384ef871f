"""A Backend that spreads one model id over several deployments (upstream replicas and/or a
local model), with retries before the first chunk, circuit breakers and optional health checks.

Retries happen only until the first chunk has come back: the service waits for that chunk before
it sends the client anything (`LLMService._started`), so a retry here is invisible to the client.
Backends yield only chunks with content (text, reasoning, a tool call's first piece, a refusal;
never an upstream's role-only opening chunk), so any first chunk means the answer has started.
Every attempt is given the same request, and its chunks are passed on as they are.
Once a chunk has been yielded, a failure propagates: a stream is never restarted mid-way. A
non-streaming request (`buffered`) sends nothing until its answer is whole, so its answer is
collected here first and a failure anywhere in it is retried like one before the first chunk.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import TypeVar

import aiohttp
import structlog

from llm_api.core.exceptions import (
    APIError,
    ContextLengthExceededError,
    RateLimitError,
    ServiceUnavailableError,
    UpstreamError,
)
from llm_api.services import tracing
from llm_api.services.llm.registry import ModelConfig
from llm_api.services.llm.routing.breaker import Breakers, State
from llm_api.services.llm.routing.deployments import Deployment
from llm_api.services.llm.routing.strategies import STRATEGIES
from llm_api.services.llm.types import Frame, GenerationRequest

log = structlog.get_logger(__name__)
T = TypeVar("T")

# Errors after which another attempt may succeed: the deployment failed, timed out, was
# overloaded or rate limited us. Anything else (400s) is the request's fault and is final.
RETRYABLE: tuple[type[APIError], ...] = (UpstreamError, RateLimitError, ServiceUnavailableError)


def is_retryable(exc: APIError) -> bool:
    return isinstance(exc, RETRYABLE) or exc.status_code in (502, 503, 504)


def retry_after(exc: APIError) -> float | None:
    value = exc.headers.get("Retry-After")
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


class RoutedBackend:
    def __init__(self, config: ModelConfig, deployments: list[Deployment], breakers: Breakers):
        self.config = config
        self.policy = config.routing
        self.deployments = deployments
        self.breakers = breakers
        self._names = [d.name for d in deployments]
        self._rank = STRATEGIES[self.policy.strategy]
        self._health_task: asyncio.Task[None] | None = None

    # --- lifecycle ------------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return any(d.backend.ready for d in self.deployments)

    async def start(self, warmup: bool = True) -> None:
        for d in self.deployments:
            if not d.local:  # local models are started by their own registry entry
                await d.backend.start(warmup=warmup)
        if self.policy.health_check_interval is not None:
            self._health_task = asyncio.create_task(
                self._health_loop(self.policy.health_check_interval),
                name=f"health-{self.config.id}",
            )

    async def aclose(self) -> None:
        if self._health_task is not None:
            self._health_task.cancel()
            await asyncio.gather(self._health_task, return_exceptions=True)
        for d in self.deployments:
            if not d.local:
                await d.backend.aclose()
        await self.breakers.aclose()

    async def prepare(self, request: GenerationRequest) -> None:
        """The deployment is chosen at generate time; local ones count tokens then."""

    # --- routing --------------------------------------------------------------------------------

    async def _choose(self, tried: set[str]) -> tuple[Deployment, State] | None:
        """The best usable deployment, untried ones first, and a breaker permit for it."""
        now = time.monotonic()
        states = await self.breakers.states(self._names)
        state_of = {d.name: s for d, s in zip(self.deployments, states, strict=True)}
        usable = [d for d in self.deployments if state_of[d.name] != "open" and not d.cooling(now)]
        fresh = [d for d in usable if d.name not in tried]
        again = [d for d in usable if d.name in tried]
        for dep in self._rank(fresh) + self._rank(again):
            if await self.breakers.acquire(dep.name, state_of[dep.name]):
                return dep, state_of[dep.name]
        return None

    def _cooling_wait(self) -> float | None:
        """Seconds until the first deployment that asked us to back off may be called again."""
        now = time.monotonic()
        waits = [d.retry_after_until - now for d in self.deployments if d.cooling(now)]
        return min(waits) if waits else None

    def _backoff(self, attempt: int) -> float:
        """Exponential backoff with equal jitter: half fixed, half random."""
        cap = min(self.policy.backoff_max, self.policy.backoff_base * 2.0 ** (attempt - 1))
        return cap / 2 + random.uniform(0, cap / 2)

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[Frame, None]:
        tried: set[str] = set()
        last: APIError | None = None
        generation = request.trace  # the generation span's context; None: not traced
        span: tracing.Span | None = None
        for attempt in range(self.policy.retries + 1):
            if attempt:
                await asyncio.sleep(self._backoff(attempt))
            choice = await self._choose(tried)
            if choice is None:
                wait = self._cooling_wait()
                if wait is None or wait > self.policy.max_retry_after:
                    break
                await asyncio.sleep(wait)  # honour the upstream's Retry-After
                choice = await self._choose(tried)
                if choice is None:
                    break
            dep, state = choice
            tried.add(dep.name)
            if generation is not None:  # each attempt its own span; the upstream continues it
                span = self._attempt_span(generation, dep, state, attempt)
                request.trace = tracing.context_of(span, generation)
            # An upstream's generator directly: _open's layer is for local models only.
            stream = self._open(dep, request) if dep.local else dep.backend.generate(request)
            dep.inflight += 1
            started = time.monotonic()
            verdict = False  # the breaker heard of this attempt
            try:
                try:
                    first = await anext(stream)
                    dep.observe_ttft(time.monotonic() - started)
                    rest = [chunk async for chunk in stream] if request.buffered else []
                except StopAsyncIteration:
                    raise UpstreamError("The upstream sent an empty response.") from None
                except APIError as exc:
                    if not is_retryable(exc):
                        raise
                    verdict = True
                    await self._failed(dep, exc)
                    last = exc
                    if span is not None:  # the next attempt (or fallback) takes over
                        tracing.fail(span, exc)
                        span.set_attribute("llm_api.retried", True)
                    log.info(
                        "route_retry",
                        model=self.config.id,
                        deployment=dep.name,
                        attempt=attempt,
                        error=exc.code,
                    )
                    continue
                yield first
                for chunk in rest:
                    yield chunk
                async for chunk in stream:
                    yield chunk
                verdict = True
                await self.breakers.success(dep.name, state)
                return
            except BaseException as exc:
                if span is not None:
                    _attempt_failed(span, exc)
                if not isinstance(exc, APIError):
                    raise
                if not verdict:
                    verdict = True
                    if is_retryable(exc):  # mid-stream failure: counted, never retried
                        await self._failed(dep, exc)
                    else:  # the deployment answered; the request was at fault
                        await self.breakers.success(dep.name, state)
                raise
            finally:
                dep.inflight -= 1
                if not verdict:  # cancelled by the client, or a bug: no verdict on the replica
                    await self.breakers.release(dep.name, state)
                await stream.aclose()
                if span is not None:
                    span.end()
                    request.trace = generation
        if last is not None:
            raise last
        raise ServiceUnavailableError(
            f"No healthy deployment of model `{self.config.id}` is available; retry shortly.",
            retry_after=max(1, int(self._cooling_wait() or 1)),
        )

    def _attempt_span(
        self, parent: tracing.Context, dep: Deployment, state: State, attempt: int
    ) -> tracing.Span:
        """One attempt on one deployment: which, the breaker's state when it was picked, and
        where the request went (an upstream's address, or the local model's id)."""
        attributes: dict[str, object] = {
            "llm_api.deployment": dep.name,
            "llm_api.attempt": attempt,
            "llm_api.breaker.state": state,
        }
        if dep.local:
            attributes["gen_ai.request.model"] = dep.config.model or ""
        else:
            attributes["gen_ai.request.model"] = dep.config.upstream_model or self.config.id
            attributes.update(tracing.server_attributes(dep.config.base_url))
        kind = tracing.SpanKind.INTERNAL if dep.local else tracing.SpanKind.CLIENT
        return tracing.start("upstream attempt", parent, kind, attributes)

    async def call(self, fn: Callable[[Deployment], Awaitable[T]]) -> T:
        """One non-streaming call (embeddings) on the best deployment, with the same picking,
        breakers, Retry-After cool-downs and capped, jittered retries as `generate`: the answer
        is whole before anything reaches the client, so any retryable failure is retried."""
        tried: set[str] = set()
        last: APIError | None = None
        for attempt in range(self.policy.retries + 1):
            if attempt:
                await asyncio.sleep(self._backoff(attempt))
            choice = await self._choose(tried)
            if choice is None:
                wait = self._cooling_wait()
                if wait is None or wait > self.policy.max_retry_after:
                    break
                await asyncio.sleep(wait)
                choice = await self._choose(tried)
                if choice is None:
                    break
            dep, state = choice
            tried.add(dep.name)
            dep.inflight += 1
            started = time.monotonic()
            verdict = False
            try:
                result = await fn(dep)
                dep.observe_ttft(time.monotonic() - started)
                verdict = True
                await self.breakers.success(dep.name, state)
                return result
            except APIError as exc:
                verdict = True
                if not is_retryable(exc):  # the deployment answered; the request was at fault
                    await self.breakers.success(dep.name, state)
                    raise
                await self._failed(dep, exc)
                last = exc
                log.info(
                    "route_retry",
                    model=self.config.id,
                    deployment=dep.name,
                    attempt=attempt,
                    error=exc.code,
                )
            finally:
                dep.inflight -= 1
                if not verdict:  # cancelled, or a bug: no verdict on the replica
                    await self.breakers.release(dep.name, state)
        if last is not None:
            raise last
        raise ServiceUnavailableError(
            f"No healthy deployment of model `{self.config.id}` is available; retry shortly.",
            retry_after=max(1, int(self._cooling_wait() or 1)),
        )

    async def _failed(self, dep: Deployment, exc: APIError) -> None:
        if isinstance(exc, RateLimitError):  # alive but busy: back off, do not trip the breaker
            delay = retry_after(exc) or 1.0
            dep.retry_after_until = time.monotonic() + delay
            return
        await self.breakers.failure(dep.name)

    async def _open(
        self, dep: Deployment, request: GenerationRequest
    ) -> AsyncGenerator[Frame, None]:
        if dep.local:
            await dep.backend.prepare(request)
            self._fit_context(dep, request)
        async for chunk in dep.backend.generate(request):
            yield chunk

    @staticmethod
    def _fit_context(dep: Deployment, request: GenerationRequest) -> None:
        """What the service does for local models: the prompt must fit the local context."""
        if request.prompt_tokens is None:
            return
        ctx_len = dep.backend.config.context_length
        room = ctx_len - request.prompt_tokens
        p = request.params
        if room < 1 or (request.explicit_max_tokens and p.max_tokens > room):
            raise ContextLengthExceededError(
                f"This model's maximum context length is {ctx_len} tokens. However, you "
                f"requested {request.prompt_tokens + p.max_tokens} tokens.",
                param="messages",
            )
        p.max_tokens = min(p.max_tokens, room)

    # --- active health checks -------------------------------------------------------------------

    async def _health_loop(self, interval: float) -> None:
        upstreams = [d for d in self.deployments if not d.local and d.config.base_url]
        timeout = aiohttp.ClientTimeout(total=max(d.config.connect_timeout for d in upstreams))
        async with aiohttp.ClientSession(timeout=timeout, trust_env=False) as session:
            while True:
                await asyncio.gather(*(self._check(session, d) for d in upstreams))
                await asyncio.sleep(interval)

    async def _check(self, session: aiohttp.ClientSession, dep: Deployment) -> None:
        healthy = False
        with contextlib.suppress(aiohttp.ClientError, TimeoutError):
            key = os.environ.get(dep.config.api_key_env or "")
            headers = {"Authorization": f"Bearer {key}"} if key else None
            # No redirects: the key would follow the `Location` (openai_upstream does the same).
            url = f"{dep.config.base_url}/models"
            async with session.get(url, headers=headers, allow_redirects=False) as resp:
                healthy = resp.status < 300 or 400 <= resp.status < 500
        [state] = await self.breakers.states([dep.name])
        if not healthy:
            log.warning("health_check_failed", model=self.config.id, deployment=dep.name)
            await self.breakers.failure(dep.name)
        elif state != "closed":
            await self.breakers.success(dep.name, state)


def _attempt_failed(span: tracing.Span, exc: BaseException) -> None:
    if isinstance(exc, asyncio.CancelledError | GeneratorExit):
        span.set_attribute("llm_api.cancelled", True)
        span.set_status(tracing.Status(tracing.StatusCode.ERROR, "cancelled"))
    else:
        tracing.fail(span, exc)
