"""The admin dashboard's live summary: load per model from the LLMService admission gates, and
token throughput from the Prometheus metrics (services/observability.py feeds them).

The rate is the slope of the generation-token counter between polls: each call records a sample
and the rate is taken against the oldest sample still inside the window. Reading the counter by
name from the registry keeps this module independent of how the metrics are declared.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable
from dataclasses import asdict

from prometheus_client import REGISTRY, CollectorRegistry

from llm_api.schemas.dashboard import ModelLoad, ServerSummary, TenantQueue
from llm_api.services.llm.service import LLMService

GENERATION_TOKENS = "llm_api:generation_tokens"
PROMPT_TOKENS = "llm_api:prompt_tokens"


def counter_total(name: str, registry: CollectorRegistry = REGISTRY) -> float:
    """Sum of a counter over all its label sets (0 when it is not registered)."""
    total = 0.0
    for family in registry.collect():
        if family.name != name:
            continue
        for sample in family.samples:
            if sample.name == f"{name}_total":
                total += sample.value
    return total


class SummaryService:
    def __init__(
        self,
        llm: LLMService,
        *,
        window_seconds: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        registry: CollectorRegistry = REGISTRY,
    ) -> None:
        self.llm = llm
        self.window = window_seconds
        self._clock = clock
        self._registry = registry
        self._samples: collections.deque[tuple[float, float]] = collections.deque()

    def _rate(self, now: float, tokens: float) -> tuple[float, float]:
        """Record (now, tokens); return (tokens/s, seconds covered) over the window."""
        self._samples.append((now, tokens))
        while len(self._samples) > 2 and now - self._samples[1][0] >= self.window:
            self._samples.popleft()  # keep one sample at or beyond the window's start
        first_t, first_tokens = self._samples[0]
        span = now - first_t
        if span <= 0:
            return 0.0, 0.0
        return max(tokens - first_tokens, 0.0) / span, span

    def summary(self, *, draining: bool = False) -> ServerSummary:
        models = [
            ModelLoad(
                id=gate.name,
                running=gate.running,
                waiting=gate.waiting,
                slots=gate.slots,
                max_waiting=gate.max_waiting,
                tenants=[TenantQueue(**asdict(t)) for t in gate.tenants()],
            )
            for gate in self.llm.gates.values()
        ]
        completion = counter_total(GENERATION_TOKENS, self._registry)
        rate, span = self._rate(self._clock(), completion)
        return ServerSummary(
            models=models,
            requests_running=sum(m.running for m in models),
            requests_waiting=sum(m.waiting for m in models),
            tokens_per_second=round(rate, 2),
            completion_tokens_total=int(completion),
            prompt_tokens_total=int(counter_total(PROMPT_TOKENS, self._registry)),
            window_seconds=round(span, 2),
            uptime_seconds=int(time.time()) - self.llm.started_at,
            draining=draining,
        )
