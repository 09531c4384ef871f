"""Per-key controls: a model allow-list, an expiry, a client-IP allow-list and the key's own
rate limits (never above its owner's tier).

They are read with the key (one row, no extra query), carried on the `Principal` (and so in the
API key cache) and checked where the principal is resolved (expiry, IP: api/security.py) and
where the model is resolved (allow-list: services/llm/service.py), once for every API family.
A key without controls (None everywhere) is restricted only by its owner's tier and scopes.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from fnmatch import fnmatchcase
from typing import Any

from llm_api.core.exceptions import AuthenticationError, InvalidRequestError, PermissionDeniedError
from llm_api.core.rate_limits import TierLimits
from llm_api.db.tables import ApiKey, as_utc

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

MAX_MODEL_PATTERNS = 100
MAX_NETWORKS = 100
LIMIT_FIELDS = tuple(TierLimits.model_fields)


class KeyExpiredError(AuthenticationError):
    """401 for a key past its `expires_at`. Never echoes the key (LiteLLM #18731 did)."""

    code = "key_expired"

    def __init__(self) -> None:
        super().__init__("This API key has expired; create a new one.")


@dataclass(frozen=True, slots=True)
class KeyControls:
    models: tuple[str, ...] | None = None  # exact ids, aliases or fnmatch wildcards
    networks: tuple[Network, ...] | None = None
    expires_at: float | None = None  # epoch seconds
    limits: TierLimits | None = None  # the key's own, within its owner's tier
    priority: str = "interactive"  # the highest class its requests run in (fair queuing)

    @classmethod
    def of(cls, key: ApiKey) -> KeyControls | None:
        """The controls stored on a key row; None when it has none (the common case)."""
        # An empty list allows nothing (deny by default); None (absent) restricts nothing.
        if (
            key.models is None
            and key.allowed_ips is None
            and not key.expires_at
            and not key.limits
            and not key.priority
        ):
            return None
        return cls(
            models=tuple(key.models) if key.models is not None else None,
            networks=tuple(ipaddress.ip_network(n, strict=False) for n in key.allowed_ips)
            if key.allowed_ips is not None
            else None,
            expires_at=as_utc(key.expires_at).timestamp() if key.expires_at else None,
            limits=TierLimits.model_validate(key.limits) if key.limits else None,
            priority=key.priority or "interactive",
        )

    def expired(self, now: float | None = None) -> bool:
        return self.expires_at is not None and (now or time.time()) >= self.expires_at

    def allows_ip(self, host: str | None) -> bool:
        if self.networks is None:
            return True
        try:
            ip = ipaddress.ip_address(host or "")
        except ValueError:
            return False  # no usable address (a test client's name): not on any list
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in net for net in self.networks)

    def allows_model(self, names: Iterable[str]) -> bool:
        """Whether any name of a model (the id asked for, the model's id and its aliases)
        matches an entry of the allow-list."""
        if self.models is None:
            return True
        return any(fnmatchcase(name, p) for name in names for p in self.models)


def check_principal_key(controls: KeyControls | None, client_ip: str | None) -> None:
    """The checks made on every request with a key: expiry (401 key_expired), then the
    client-IP allow-list (403 ip_not_allowed; docs/security.md says why not 401)."""
    if controls is None:
        return
    if controls.expired():
        raise KeyExpiredError()
    if not controls.allows_ip(client_ip):
        raise PermissionDeniedError(
            "This API key may not be used from this client address.", code="ip_not_allowed"
        )


def model_not_allowed(model: str) -> PermissionDeniedError:
    """403 naming only the model asked for: never which models the key may use."""
    return PermissionDeniedError(
        f"This API key may not use the model `{model}`.", param="model", code="model_not_allowed"
    )


# --- validation of what a caller sets (POST /v1/keys, PATCH, the CLI) -----------------------


def parse_models(values: list[str] | None) -> list[str] | None:
    if values is None:
        return None
    cleaned = [v.strip() for v in values]
    if any(not v or len(v) > 256 for v in cleaned):
        raise InvalidRequestError(
            "Each entry of `models` must be a model id, alias or wildcard (1-256 characters).",
            param="models",
        )
    if len(cleaned) > MAX_MODEL_PATTERNS:
        raise InvalidRequestError(
            f"`models` may list at most {MAX_MODEL_PATTERNS} entries.", param="models"
        )
    return list(dict.fromkeys(cleaned))


def parse_networks(values: list[str] | None) -> list[str] | None:
    """CIDRs (or single addresses) normalised, e.g. `10.0.0.7/8` → `10.0.0.0/8`."""
    if values is None:
        return None
    if len(values) > MAX_NETWORKS:
        raise InvalidRequestError(
            f"`allowed_ips` may list at most {MAX_NETWORKS} entries.", param="allowed_ips"
        )
    networks = []
    for value in values:
        try:
            networks.append(str(ipaddress.ip_network(value.strip(), strict=False)))
        except ValueError:
            raise InvalidRequestError(
                f"`allowed_ips` entry {value[:64]!r} is not an IP address or CIDR block.",
                param="allowed_ips",
            ) from None
    return list(dict.fromkeys(networks))


def parse_expiry(value: Any, now: datetime | None = None) -> datetime | None:
    """Epoch seconds or an ISO 8601 time (UTC unless it says otherwise); must be in the future."""
    if value is None:
        return None
    try:
        if isinstance(value, bool):
            raise ValueError
        if isinstance(value, int | float):
            when = datetime.fromtimestamp(value, UTC)
        elif isinstance(value, str) and value.strip().lstrip("-").isdigit():
            when = datetime.fromtimestamp(int(value.strip()), UTC)
        elif isinstance(value, str):
            when = as_utc(datetime.fromisoformat(value.strip().replace("Z", "+00:00")))
        elif isinstance(value, datetime):
            when = as_utc(value)
        else:
            raise ValueError
    except (ValueError, OverflowError, OSError):
        raise InvalidRequestError(
            "`expires_at` must be epoch seconds or an ISO 8601 time.", param="expires_at"
        ) from None
    if when <= (now or datetime.now(UTC)):
        raise InvalidRequestError("`expires_at` must be in the future.", param="expires_at")
    return when


def check_limits(limits: TierLimits | None, ceiling: TierLimits) -> dict[str, int] | None:
    """A key's own limits, refused (400 naming the limit) where one is above the owner's
    tier; only the fields given are stored."""
    if limits is None:
        return None
    stored: dict[str, int] = {}
    for field in LIMIT_FIELDS:
        value = getattr(limits, field)
        if value is None:
            continue
        cap = getattr(ceiling, field)
        if cap is not None and value > cap:
            raise InvalidRequestError(
                f"`limits.{field}` ({value}) is above your tier's limit ({cap}).",
                param=f"limits.{field}",
                code="limit_above_tier",
            )
        stored[field] = value
    return stored or None


def tightest(base: TierLimits, own: TierLimits) -> TierLimits:
    """Each limit at the lower of `base` (the tier with any override) and the key's own:
    enforced at request time, so a tier lowered after the key was made still binds."""
    values = {}
    for field in LIMIT_FIELDS:
        a, b = getattr(base, field), getattr(own, field)
        values[field] = b if a is None else (a if b is None else min(a, b))
    return TierLimits(**values)
