"""Routing strategies: which of the usable deployments gets the next request.

Each takes the candidates (already filtered by their circuit breakers and Retry-After) and
returns them in order of preference, so the router can fall through to the next when a
half-open breaker refuses its probe.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

from llm_api.services.llm.routing.config import Strategy
from llm_api.services.llm.routing.deployments import Deployment

Ranker = Callable[[Sequence[Deployment]], list[Deployment]]


def weighted_random(candidates: Sequence[Deployment]) -> list[Deployment]:
    """Sample without replacement, each draw proportional to weight (Efraimidis–Spirakis keys:
    u ** (1 / w), largest first)."""
    if len(candidates) == 1:
        return list(candidates)
    return sorted(
        candidates, key=lambda d: random.random() ** (1.0 / d.config.weight), reverse=True
    )


def least_inflight(candidates: Sequence[Deployment]) -> list[Deployment]:
    """Fewest requests in flight per unit of weight; ties broken at random."""
    return sorted(candidates, key=lambda d: (d.inflight / d.config.weight, random.random()))


def lowest_latency(candidates: Sequence[Deployment]) -> list[Deployment]:
    """Lowest recent time to first token (EWMA). Deployments without a sample yet go first, so
    that every replica gets measured; ties broken by in-flight count."""
    return sorted(
        candidates,
        key=lambda d: (d.ttft_ewma if d.ttft_ewma is not None else -1.0, d.inflight),
    )


STRATEGIES: dict[Strategy, Ranker] = {
    "weighted_random": weighted_random,
    "least_inflight": least_inflight,
    "lowest_latency": lowest_latency,
}
