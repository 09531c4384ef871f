"""OpenAI's rate-limit headers (`x-ratelimit-*`, also on 200s) and the 429 error."""

from __future__ import annotations

import math

from llm_api.core.exceptions import InsufficientQuotaError, RateLimitError
from llm_api.services.money.prices import usd_text
from llm_api.services.rate_limit.types import Decision, LimitSpec

BUDGET_REMAINING = "x-llm-api-budget-remaining"
BUDGET_WARNING = "x-llm-api-budget-warning"

SCOPE_NAMES = {
    "user": "user",
    "key": "API key",
    "ip": "client IP",
    "client": "client IP",
    "account": "account",
    "team": "team",
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


def money(nanos: int) -> str:
    """USD as a header or a message writes it: `12.5`, `0.000123`."""
    return usd_text(max(nanos, 0))


def budget_headers(
    specs: list[LimitSpec], decision: Decision, softs: list[int | None]
) -> dict[str, str]:
    """`x-llm-api-budget-remaining`: USD left in the tightest of the request's budgets after
    its reservation; `x-llm-api-budget-warning` once any of them has reached its soft limit.
    `softs`: the soft limit of each budget spec, in order."""
    remaining: int | None = None
    warned: list[str] = []
    budgets = [(s, st) for s, st in zip(specs, decision.states, strict=True) if s.kind == "budget"]
    for (spec, state), soft in zip(budgets, softs, strict=True):
        if remaining is None or state.remaining < remaining:
            remaining = state.remaining
        spent = spec.limit - state.remaining - spec.cost  # before this request
        if soft is not None and spent >= soft:
            who = SCOPE_NAMES.get(spec.scope, spec.scope)
            warned.append(f"soft limit of the {who}'s {spec.label} reached (${money(soft)})")
    headers: dict[str, str] = {}
    if remaining is not None:
        headers[BUDGET_REMAINING] = money(remaining)
    if warned:
        headers[BUDGET_WARNING] = "; ".join(warned)
    return headers


def budget_rejection(
    spec: LimitSpec, decision: Decision, headers: dict[str, str]
) -> InsufficientQuotaError:
    """The 429 `insufficient_quota` of a spent budget: which budget, what is left, what the
    request needed, and when the period starts again."""
    state = decision.states[decision.rejected or 0]
    who = SCOPE_NAMES.get(spec.scope, spec.scope)
    left = state.remaining
    message = (
        f"This {who}'s {spec.label} of ${money(spec.limit)} is exhausted: ${money(left)} left, "
        f"and this request may cost up to ${money(spec.cost)} (its prompt at the input price "
        "plus max_tokens at the output price). Lower max_tokens, or raise the budget"
    )
    headers = {**headers, "x-should-retry": "false"}
    if spec.period_ms < 300 * 86_400_000:  # a calendar period: it starts again
        message += f"; it resets in {duration(spec.period_ms)}."
        headers["Retry-After"] = str(max(1, math.ceil(spec.period_ms / 1000)))
    else:
        message += "."
    return InsufficientQuotaError(message, headers=headers)


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
