"""OpenAI's rate-limit headers (`x-ratelimit-*`, also on 200s) and the 429 error."""

from __future__ import annotations

import math

from llm_api.core.exceptions import RateLimitError
from llm_api.services.rate_limit.types import Decision, LimitSpec

SCOPE_NAMES = {
    "user": "user",
    "key": "API key",
    "ip": "client IP",
    "client": "client IP",
    "account": "account",
}


def duration(ms: int) -> str:
    """OpenAI's reset format: `12ms`, `1s`, `6m0s`, `1h2m3s`."""
    if ms < 1000:
        return f"{max(0, ms)}ms"
    seconds = math.ceil(ms / 1000)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


def rate_limit_headers(specs: list[LimitSpec], decision: Decision) -> dict[str, str]:
    """For requests and for tokens, report the limit with the least room left (per-minute and
    per-day limits alike: whichever will refuse first is what a client must pace by)."""
    headers: dict[str, str] = {}
    for metric in ("requests", "tokens"):
        best: tuple[float, int, int, int] | None = None
        for spec, state in zip(specs, decision.states, strict=True):
            if spec.metric != metric:
                continue
            candidate = (state.remaining / spec.limit, spec.limit, state.remaining, state.reset_ms)
            if best is None or candidate[0] < best[0]:
                best = candidate
        if best is not None:
            _, limit, remaining, reset_ms = best
            headers[f"x-ratelimit-limit-{metric}"] = str(limit)
            headers[f"x-ratelimit-remaining-{metric}"] = str(remaining)
            headers[f"x-ratelimit-reset-{metric}"] = duration(reset_ms)
    return headers


def rejection(spec: LimitSpec, decision: Decision, headers: dict[str, str]) -> RateLimitError:
    """The 429: names the limit, and tells when to retry (never sooner than the real wait)."""
    state = decision.states[decision.rejected or 0]
    wait_ms = max(decision.retry_ms, 1)
    retry_after = max(1, math.ceil(wait_ms / 1000))
    who = SCOPE_NAMES.get(spec.scope, spec.scope)
    if spec.kind == "concurrency":
        detail = f"Limit {spec.limit}, in flight {spec.limit - state.remaining}."
    else:
        used = spec.limit - state.remaining
        requested = spec.cost
        detail = f"Limit {spec.limit}, Used {used}, Requested {requested}."
        if requested > spec.limit:
            detail += " This request alone is larger than the limit; reduce max_tokens or input."
    message = (
        f"Rate limit reached for {spec.label} on this {who}: {detail} "
        f"Please try again in {duration(wait_ms)}."
    )
    return RateLimitError(
        message,
        headers={**headers, "Retry-After": str(retry_after), "retry-after-ms": str(wait_ms)},
    )
