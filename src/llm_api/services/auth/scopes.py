"""API key scopes, Stripe-style restricted keys: a key may do only what it was created for.

- `inference`: completions, chat, the simple API, models, files, batches and one's own usage
  and rate-limit standing. What a script needs, and the default for every new key (and every
  key that existed before scopes: migration 0004 makes them inference-only).
- `keys`: list, create and revoke one's own API keys.
- `account`: one's profile, conversation-log preference and logout.
- `teams`: create teams, manage their members (as their owner or admin) and see the teams one
  belongs to, their keys and usage. Making or changing a team's keys needs `keys` too.
- `admin`: the /v1/admin routes; only an administrator's key may carry it, and it counts only
  while the owner is still an administrator.

A password login (JWT access token) holds every scope its role allows. A key never gets a scope
its creator lacks, so a leaked key cannot mint a broader one. Which scope each /v1 route needs
is declared on the route (`api/scopes.py`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

from llm_api.core.exceptions import PermissionDeniedError

Scope = Literal["inference", "keys", "account", "teams", "admin"]
ALL_SCOPES: tuple[Scope, ...] = ("inference", "keys", "account", "teams", "admin")
DEFAULT_KEY_SCOPES: frozenset[str] = frozenset({"inference"})
_USER_SCOPES = frozenset(ALL_SCOPES) - {"admin"}


def allowed_for(role: str) -> frozenset[str]:
    """Every scope a user of `role` can hold (what a password login gets)."""
    return frozenset(ALL_SCOPES) if role == "admin" else _USER_SCOPES


def ordered(scopes: Iterable[str]) -> list[Scope]:
    """Known scopes in their canonical order (stable listings and storage)."""
    held = set(scopes)
    return [s for s in ALL_SCOPES if s in held]


def serialize(scopes: Iterable[str]) -> str:
    """Stored as one space-separated string (OAuth 2.0's `scope` format)."""
    return " ".join(ordered(scopes))


def parse(stored: str | None) -> frozenset[str]:
    """The known scopes of a stored value; anything unknown grants nothing."""
    return frozenset(ordered((stored or "").split()))


def check_grant(requested: Iterable[str], held: frozenset[str]) -> None:
    """Refuse to give a new key a scope its creator does not hold (403 naming them)."""
    missing = ordered(set(requested) - held)
    if missing:
        raise PermissionDeniedError(
            f"You cannot grant scopes you do not hold: {', '.join(missing)}.",
            param="scopes",
            code="scope_not_grantable",
        )
