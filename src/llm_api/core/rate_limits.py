"""Rate-limit configuration types: the limits of one tier, and the built-in defaults.

Kept in core/ (pydantic only) so that `Settings` can hold them; the limiter itself lives in
services/rate_limit/. `None` means "no limit" for that dimension.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class TierLimits(BaseModel):
    model_config = ConfigDict(extra="forbid")

    requests_per_minute: int | None = Field(None, ge=1, description="Requests in any 60 s.")
    tokens_per_minute: int | None = Field(
        None, ge=1, description="prompt + max_tokens reserved, settled to real use; any 60 s."
    )
    concurrent_requests: int | None = Field(None, ge=1, description="Requests in flight.")
    tokens_per_day: int | None = Field(None, ge=1, description="Tokens in any 24 h.")

    def merged(self, override: TierLimits) -> TierLimits:
        """This tier with the fields that `override` sets explicitly replaced."""
        return self.model_copy(update={f: getattr(override, f) for f in override.model_fields_set})


# Comfortable for one person in the playground or `make serve` (a chat turn is a few hundred
# tokens), while one free account cannot monopolise a CPU-bound server. `ip` caps everything
# that arrives from one client address, over all the keys and accounts used from it (the
# guide's "single IP, many keys" pitfall). `anonymous` is the keyless local caller of
# LLM_API_AUTH_ENABLED=false (per client address; never paid models).
DEFAULT_TIERS: dict[str, TierLimits] = {
    "free": TierLimits(
        requests_per_minute=60,
        tokens_per_minute=40_000,
        concurrent_requests=4,
        tokens_per_day=1_000_000,
    ),
    "paid": TierLimits(
        requests_per_minute=600,
        tokens_per_minute=400_000,
        concurrent_requests=16,
        tokens_per_day=20_000_000,
    ),
    "anonymous": TierLimits(
        requests_per_minute=60,
        tokens_per_minute=40_000,
        concurrent_requests=4,
        tokens_per_day=1_000_000,
    ),
    "ip": TierLimits(
        requests_per_minute=300,
        tokens_per_minute=200_000,
        concurrent_requests=32,
        tokens_per_day=None,
    ),
}


def merge_tiers(given: dict[str, TierLimits]) -> dict[str, TierLimits]:
    """Built-in tiers, with the fields set in `given` replacing theirs (new tiers allowed)."""
    merged = dict(DEFAULT_TIERS)
    for name, tier in given.items():
        merged[name] = merged.get(name, TierLimits()).merged(tier)
    return merged
