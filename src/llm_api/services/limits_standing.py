"""A caller's current rate-limit standing, for the account page: each limit that applies to
their account (and to the key they use, when it has its own), and what is left of it now.

Read without spending anything: window limits are asked with a cost of 0, which both stores
(the Redis script and the memory store) answer without adding an entry, while trimming expired
ones as any admission does. Concurrency limits are read from the memory store's lease table;
the Redis store has no read-only call for them, so their `remaining` is null there.
"""

from __future__ import annotations

from dataclasses import replace

from llm_api.core.ids import new_request_id
from llm_api.schemas.dashboard import LimitsStanding, LimitStanding
from llm_api.services.llm.types import RequestContext
from llm_api.services.rate_limit.limiter import RateLimiter
from llm_api.services.rate_limit.memory_store import MemoryStore
from llm_api.services.rate_limit.redis_store import StoreUnavailable
from llm_api.services.rate_limit.types import LimitSpec

OWN_SCOPES = ("user", "key")  # per-IP caps are shared with others behind the same address


async def standing(limiter: RateLimiter | None, ctx: RequestContext) -> LimitsStanding:
    if limiter is None:
        return LimitsStanding(tier=ctx.tier, enabled=False, limits=[])
    probe = replace(ctx, client_ip=None)  # the caller's own limits only
    specs = [s for s in limiter.policy.for_completion(probe, 0) if s.scope in OWN_SCOPES]
    if not limiter.enabled:
        return LimitsStanding(
            tier=ctx.tier, enabled=False, limits=[_row(s, None, None) for s in specs]
        )
    windows = [replace(s, cost=0) for s in specs if s.kind == "window"]
    left: dict[str, tuple[int | None, float | None]] = {}
    if windows:
        try:
            decision = await limiter.store.admit(f"standing-{new_request_id()}", windows)
            for spec, state in zip(windows, decision.states, strict=True):
                full = state.remaining >= spec.limit
                left[spec.key] = (state.remaining, None if full else _reset(spec, state.reset_ms))
        except StoreUnavailable:
            pass  # shown as unknown; the limits themselves still apply
    store = limiter.store
    for spec in specs:
        if spec.kind == "concurrency" and isinstance(store, MemoryStore):
            left[spec.key] = (max(spec.limit - store.in_flight(spec), 0), None)
    return LimitsStanding(
        tier=ctx.tier,
        enabled=True,
        limits=[_row(s, *left.get(s.key, (None, None))) for s in specs],
    )


def _reset(spec: LimitSpec, reset_ms: int) -> float | None:
    # With nothing refused, the stores report the window length: the longest it can take.
    return round(min(reset_ms, spec.period_ms) / 1000, 3) if reset_ms else None


def _row(spec: LimitSpec, remaining: int | None, reset: float | None) -> LimitStanding:
    return LimitStanding(
        name=spec.name,
        description=spec.label,
        scope=spec.scope,
        limit=spec.limit,
        remaining=remaining,
        reset_seconds=reset,
    )
