"""Which limits a request is subject to.

Per tier (`free`, `paid`, ... from `LLM_API_RATE_LIMIT_TIERS` over the built-in defaults) and
per user or API key from the overrides file (`LLM_API_RATE_LIMIT_OVERRIDES_FILE`, YAML):

    users:
      <user id>: {requests_per_minute: 600, tokens_per_day: 5000000}
    keys:
      <key id>: {concurrent_requests: 1}

Overrides live in a file, not the database, so the hot path needs no query; a restart (or a
rolling deploy) applies changes.

A completion is checked against: its user's limits (across all of the user's keys); its key's
limits when the key has an override of its own or limits of its own (POST /v1/keys `limits`,
each at most the tier's: the lower of the two binds; otherwise they equal the user's and could
never bind first, so they are skipped); and the `ip` aggregate over everything from its client IP.
Without a user (auth disabled) the tier's limits apply to the client IP instead.

Per-IP limits count an IPv6 client by its /64 (`ip_subject`).
"""

from __future__ import annotations

import functools
import ipaddress
from pathlib import Path

import yaml
from limits import parse as parse_limit
from pydantic import BaseModel, ConfigDict, Field

from llm_api.core.config import Settings
from llm_api.core.rate_limits import TierLimits
from llm_api.services.auth.key_controls import tightest
from llm_api.services.llm.types import RequestContext
from llm_api.services.rate_limit.types import LimitSpec

MINUTE_MS = 60_000
DAY_MS = 86_400_000


class RateLimitOverrides(BaseModel):
    model_config = ConfigDict(extra="forbid")

    users: dict[str, TierLimits] = Field(default_factory=dict)
    keys: dict[str, TierLimits] = Field(default_factory=dict)

    @classmethod
    def load(cls, path: Path | None) -> RateLimitOverrides:
        if path is None:
            return cls()
        return cls.model_validate(yaml.safe_load(path.read_text()) or {})


@functools.lru_cache(maxsize=4096)
def ip_subject(address: str) -> str:
    """Who a per-IP limit counts: an IPv4 address as it is, an IPv6 address by its /64. One
    host (or home, or VM) is given a whole /64 and can pick any address in it, so counting
    single IPv6 addresses would give it 2**64 quotas (GitLab Pages' and AdGuard Home's limiters
    group IPv6 by prefix the same way). An IPv4-mapped IPv6 address counts as its IPv4
    address."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address  # not an IP (a test client's name): as it is
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((int(ip) >> 64 << 64, 64)))
    return str(ip)


def _item(text: str) -> tuple[int, int]:
    """Parse `10/minute` into (10, 60000): the `limits` library's notation and parser."""
    item = parse_limit(text)
    return int(item.amount), int(item.get_expiry() * 1000)


class LimitPolicy:
    def __init__(
        self,
        tiers: dict[str, TierLimits],
        overrides: RateLimitOverrides,
        lease_ms: int,
        key_creation: str,
    ) -> None:
        self.tiers = tiers
        self.overrides = overrides
        self.lease_ms = lease_ms
        self.minute_ms = MINUTE_MS  # the "per minute" window (tests stretch it on slow machines)
        # Login is throttled on its own terms (services/rate_limit/login.py).
        self.routes: dict[str, tuple[tuple[int, int] | None, tuple[int, int]]] = {
            "key_creation": (_item(key_creation), _item(key_creation)),
        }

    @classmethod
    def from_settings(cls, settings: Settings) -> LimitPolicy:
        return cls(
            settings.rate_limit_tiers,
            RateLimitOverrides.load(settings.rate_limit_overrides_file),
            settings.rate_limit_lease_seconds * 1000,
            settings.rate_limit_key_creation,
        )

    def tier(self, name: str) -> TierLimits:
        return self.tiers.get(name) or self.tiers["free"]

    def _specs(self, limits: TierLimits, scope: str, subject: str, tokens: int) -> list[LimitSpec]:
        specs: list[LimitSpec] = []
        if limits.requests_per_minute:
            specs.append(
                LimitSpec(
                    "rpm", "requests per minute (RPM)", scope, subject, "window", "requests",
                    limits.requests_per_minute, self.minute_ms,
                )
            )  # fmt: skip
        if limits.tokens_per_minute:
            specs.append(
                LimitSpec(
                    "tpm", "tokens per minute (TPM)", scope, subject, "window", "tokens",
                    limits.tokens_per_minute, self.minute_ms, tokens,
                )
            )  # fmt: skip
        if limits.tokens_per_day:
            specs.append(
                LimitSpec(
                    "tpd", "tokens per day (TPD)", scope, subject, "window", "tokens",
                    limits.tokens_per_day, DAY_MS, tokens,
                )
            )  # fmt: skip
        if limits.concurrent_requests:
            specs.append(
                LimitSpec(
                    "concurrency", "concurrent requests", scope, subject, "concurrency",
                    "concurrency", limits.concurrent_requests, self.lease_ms,
                )
            )  # fmt: skip
        return specs

    def user_limits(self, user_id: str, tier: str) -> TierLimits:
        """A user's limits: their tier's, with their override from the file."""
        return self.tier(tier).merged(self.overrides.users.get(user_id, TierLimits()))

    def for_completion(self, ctx: RequestContext, tokens: int) -> list[LimitSpec]:
        """The limits of one completion that reserves `tokens` (prompt + max_tokens)."""
        tier = self.tier(ctx.tier)
        specs: list[LimitSpec] = []
        if ctx.user_id is not None:
            user = tier.merged(self.overrides.users.get(ctx.user_id, TierLimits()))
            specs += self._specs(user, "user", ctx.user_id, tokens)
        if ctx.key_id is not None:
            override = self.overrides.keys.get(ctx.key_id)
            own = ctx.controls.limits if ctx.controls is not None else None
            if override is not None or own is not None or ctx.user_id is None:
                key = tier.merged(override or TierLimits())
                if own is not None:  # the key's own limits, never above the tier's
                    key = tightest(key, own)
                specs += self._specs(key, "key", ctx.key_id, tokens)
        if ctx.client_ip is not None:
            ip = ip_subject(ctx.client_ip)
            if ctx.user_id is None and ctx.key_id is None:
                specs += self._specs(tier, "client", ip, tokens)
            specs += self._specs(self.tiers["ip"], "ip", ip, tokens)
        return specs

    def for_route(self, route: str, client_ip: str | None, account: str | None) -> list[LimitSpec]:
        """Limits of a route without a model (key creation): per IP and per account."""
        per_ip, per_account = self.routes[route]
        label = route.replace("_", " ") + " attempts"
        specs: list[LimitSpec] = []
        if per_ip is not None and client_ip is not None:
            ip = ip_subject(client_ip)
            specs.append(LimitSpec(route, label, "ip", ip, "window", "requests", *per_ip))
        if account is not None:
            specs.append(
                LimitSpec(route, label, "account", account, "window", "requests", *per_account)
            )
        return specs
