"""What a request brings to its model's admission gate (services/llm/admission.py): its
priority class (the `x-llm-api-priority` header may lower it, never raise it) and its fair-queuing
ticket — tenant, the tier's weight, and the tokens it is expected to cost."""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass

from prometheus_client import Histogram

from llm_api.core import metrics
from llm_api.core.config import Settings
from llm_api.core.exceptions import InvalidRequestError
from llm_api.services.llm.admission import PRIORITIES, FairPolicy, Ticket
from llm_api.services.llm.registry import ModelConfig
from llm_api.services.llm.types import GenerationRequest, RequestContext

PRIORITY_HEADER = "x-llm-api-priority"


def requested_priority(header: str | None, ceiling: str = "interactive") -> str:
    """The class a request runs in: the header's, but never above `ceiling` (what the key
    allows); a value that is no class is a 400 rather than silently ignored."""
    if header is None:
        return ceiling
    value = header.strip().lower()
    if value not in PRIORITIES:
        raise InvalidRequestError(
            f"`{PRIORITY_HEADER}` must be one of {', '.join(PRIORITIES)}.", param=PRIORITY_HEADER
        )
    return PRIORITIES[max(PRIORITIES.index(value), PRIORITIES.index(ceiling))]


def fair_policy(settings: Settings) -> FairPolicy:
    return FairPolicy(fair=settings.fair_queuing, aging_seconds=settings.fair_aging_seconds)


def reserved_slots(settings: Settings, model: ModelConfig) -> int:
    """Sequences a model keeps on top of its `slots` for tenants below their share: only a
    local batched engine, which we size for them; an upstream's concurrency cap is the
    operator's statement of what it can take, so nothing is added to it."""
    batched = model.backend == "llama_cpp" and model.engine == "batched" and model.kind == "chat"
    return settings.fair_reserved_slots if settings.fair_queuing and batched else 0


@dataclass(frozen=True, slots=True)
class Tickets:
    """Makes each request's ticket from the settings (weights per tier, expected output)."""

    weights: dict[str, float]
    expected_output: int
    tiers: frozenset[str]  # labelled by name in the metrics; any other tier is "other"

    @classmethod
    def from_settings(cls, settings: Settings) -> Tickets:
        tiers = frozenset(settings.fair_weights) | frozenset(settings.rate_limit_tiers)
        return cls(dict(settings.fair_weights), settings.fair_expected_output_tokens, tiers)

    def ticket(
        self, ctx: RequestContext, seqs: Iterable[GenerationRequest], cost: int = 0
    ) -> Ticket:
        """`seqs`' prompts plus expected outputs, and `cost` more tokens (embedding inputs)."""
        for seq in seqs:
            out = seq.params.max_tokens
            if not seq.explicit_max_tokens:
                out = min(out, self.expected_output)
            cost += prompt_cost(seq) + out
        return Ticket(
            tenant=ctx.tenant,
            weight=self.weights.get(ctx.tier, 1.0),
            cost=max(cost, 1),
            priority=PRIORITIES.index(ctx.priority) if ctx.priority in PRIORITIES else 0,
            tier=ctx.tier if ctx.tier in self.tiers else "other",
        )


def prompt_cost(seq: GenerationRequest) -> int:
    """The prompt's tokens: counted by a local model's prepare, else estimated from its
    characters (1 token per 3, as the rate limiter's reservation does)."""
    if seq.prompt_tokens is not None:
        return seq.prompt_tokens
    chars = sum(len(m.content) for m in seq.messages or []) + len(seq.prompt or "")
    return chars // 3 + 1


def observe_admission(model: str, ticket: Ticket) -> None:
    """The queue wait of an admitted request, by bounded labels (priority class and tier)."""
    _wait_histogram(model, ticket.priority, ticket.tier).observe(ticket.waited)


@functools.cache  # bounded: models × priority classes × configured tiers (+ "other")
def _wait_histogram(model: str, priority: int, tier: str) -> Histogram:
    # Once per label set: prometheus_client's labels() validates and takes a lock every call,
    # a measurable share of a proxied request's CPU (bench.gateway_instructions).
    return metrics.ADMISSION_WAIT.labels(model, PRIORITIES[priority], tier)
