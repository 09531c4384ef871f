"""Feeding the LLM metrics: an observer turning each CompletionRecord into histogram and counter
updates, and a per-worker sampler for the gauges (queue depth, memory)."""

from __future__ import annotations

import asyncio
import os
import resource
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, NamedTuple

from llm_api.core import metrics
from llm_api.core.state import AppState
from llm_api.services.llm.service import LLMService
from llm_api.services.llm.types import CompletionRecord

_OUTCOMES = ("stop", "length", "cancelled", "error")
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


class _ModelMetrics(NamedTuple):
    """One model's metric children: `.labels()` hashes its label values on every call (~1.5 µs
    each, seven per request), so they are looked up once per model."""

    prompt: Any
    generation: Any
    e2e: Any
    queue: Any
    ttft: Any
    itl: Any
    outcomes: dict[str, Any]


class MetricsObserver:
    """A completion pipeline subscriber; runs once per request, never per token."""

    def __init__(self) -> None:
        self._models: dict[str, _ModelMetrics] = {}  # registry ids only: bounded

    def _for(self, model: str) -> _ModelMetrics:
        found = self._models.get(model)
        if found is None:
            found = self._models[model] = _ModelMetrics(
                metrics.PROMPT_TOKENS.labels(model),
                metrics.GENERATION_TOKENS.labels(model),
                metrics.E2E_REQUEST_LATENCY.labels(model),
                metrics.REQUEST_QUEUE_TIME.labels(model),
                metrics.TIME_TO_FIRST_TOKEN.labels(model),
                metrics.INTER_TOKEN_LATENCY.labels(model),
                {o: metrics.REQUESTS.labels(model, o) for o in _OUTCOMES},
            )
        return found

    def __call__(self, record: CompletionRecord) -> None:
        model = record.model
        m = self._for(model)
        m.prompt.inc(record.prompt_tokens)
        m.generation.inc(record.completion_tokens)
        m.e2e.observe(record.latency_ms / 1000)
        m.queue.observe(record.queue_ms / 1000)
        if record.ttft_ms is not None:
            m.ttft.observe(record.ttft_ms / 1000)
            if record.completion_tokens > 1:
                gap = (record.latency_ms - record.ttft_ms) / (record.completion_tokens - 1)
                m.itl.observe(max(gap, 0.0) / 1000)
        if record.cancelled:
            outcome = "cancelled"
        elif record.status >= 400:
            outcome = "error"
        else:
            outcome = record.finish_reason if record.finish_reason in ("stop", "length") else "stop"
        m.outcomes[outcome].inc()
        if record.status == 502:
            metrics.UPSTREAM_ERRORS.labels(model, "error").inc()
        elif record.status == 504:
            metrics.UPSTREAM_ERRORS.labels(model, "timeout").inc()


def resident_memory_bytes() -> int:
    """Current RSS from /proc (Linux); peak RSS elsewhere."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


# (model, priority, tier) label sets of the queue-depth gauge set so far: one that empties
# is set to 0 rather than left at its last value.
_depth_labels: set[tuple[str, str, str]] = set()


def sample(llm: LLMService) -> None:
    depths: dict[tuple[str, str, str], int] = dict.fromkeys(_depth_labels, 0)
    for model_id, gate in llm.gates.items():
        metrics.REQUESTS_RUNNING.labels(model_id).set(gate.running)
        metrics.REQUESTS_WAITING.labels(model_id).set(gate.waiting)
        for (priority, tier), n in gate.depth().items():
            depths[(model_id, priority, tier)] = n
    for labels, n in depths.items():
        metrics.ADMISSION_QUEUE_DEPTH.labels(*labels).set(n)
    _depth_labels.update(depths)
    metrics.PROCESS_MEMORY.set(resident_memory_bytes())


async def sample_forever(llm: LLMService, interval: float = 1.0) -> None:
    """Gauges are sampled rather than updated inline: one cheap loop per worker instead of work
    on every admission, and in multiprocess mode each worker keeps its own series fresh."""
    while True:
        sample(llm)
        await asyncio.sleep(interval)


@asynccontextmanager
async def observability(state: AppState) -> AsyncIterator[None]:
    """Lifespan part: gauge sampler, SIGTERM drain handler. On the way out the on_drain hooks run
    (once), before the rest of the lifespan closes databases and models. (The per-request
    metrics are a subscriber of the completion pipeline, given in the lifespan.)"""
    sampler = asyncio.create_task(sample_forever(state.llm), name="metrics-sampler")
    state.drainer.install()
    try:
        yield
    finally:
        state.drainer.uninstall()
        state.draining = True
        sampler.cancel()
        await asyncio.gather(sampler, return_exceptions=True)
        await state.drainer.run_hooks()
