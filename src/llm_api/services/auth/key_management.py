"""Making and changing API keys with their controls: a user's own keys and a team's keys.

Who manages a key: its creator while it is a personal key; the team's owners and admins while
it is a team key (the creator too only as long as they are one). Anyone else gets a 404.
Every change is followed by `Authenticator.forget` in the route, so it applies at once.
Never commits: the caller's session owns the transaction.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from llm_api.core.exceptions import InvalidRequestError, NotFoundError
from llm_api.core.rate_limits import TierLimits
from llm_api.db.tables import ApiKey, User
from llm_api.schemas.accounts import ApiKeyControls, ApiKeyCreate
from llm_api.services import teams
from llm_api.services.auth import api_keys, key_controls, scopes
from llm_api.services.auth.principal import Principal
from llm_api.services.rate_limit.policy import LimitPolicy


def _no_key() -> NotFoundError:
    return NotFoundError("No such API key.", param="key_id")


def _controls(body: ApiKeyControls, ceiling: TierLimits, fields: set[str]) -> dict[str, Any]:
    """The stored form of the controls named in `fields`, validated (400 naming the field)."""
    values: dict[str, Any] = {}
    if "name" in fields:
        values["name"] = body.name
    if "models" in fields:
        values["models"] = key_controls.parse_models(body.models)
    if "allowed_ips" in fields:
        values["allowed_ips"] = key_controls.parse_networks(body.allowed_ips)
    if "expires_at" in fields:
        values["expires_at"] = key_controls.parse_expiry(body.expires_at)
    if "limits" in fields:
        values["limits"] = key_controls.check_limits(body.limits, ceiling)
    if "priority" in fields:
        values["priority"] = body.priority
    return values


async def create(
    db: AsyncSession,
    creator: Principal,
    body: ApiKeyCreate,
    policy: LimitPolicy,
    max_keys: int,
) -> tuple[ApiKey, str]:
    """A new key for `creator` (or their team, with `team_id`), within what they hold: scopes
    (403), their tier's limits (400), the per-user or per-team key count (400)."""
    assert creator.user_id is not None
    requested = set(body.scopes) if body.scopes else scopes.DEFAULT_KEY_SCOPES
    scopes.check_grant(requested, creator.scopes)  # a key never mints a broader one
    if body.team_id is not None:
        await teams.managed(db, body.team_id, creator.user_id)
        count = await teams.count_keys(db, body.team_id)
        where = "per team"
    else:
        count = await api_keys.count_active(db, creator.user_id)
        where = "per user"
    if count >= max_keys:
        raise InvalidRequestError(f"At most {max_keys} active keys {where}; revoke one first.")
    ceiling = policy.user_limits(creator.user_id, creator.tier)
    values = _controls(body, ceiling, set(body.model_fields_set) - {"scopes", "team_id"})
    values.pop("name", None)
    key, raw = await api_keys.create_key(
        db, creator.user_id, body.name, requested, team_id=body.team_id, **values
    )
    return key, raw


async def manageable(db: AsyncSession, key_id: str, user_id: str) -> ApiKey:
    """An active key the user may change: theirs (personal) or their managed team's; else 404."""
    key = (
        await db.execute(select(ApiKey).where(ApiKey.id == key_id, ApiKey.revoked_at.is_(None)))
    ).scalar_one_or_none()
    if key is None:
        raise _no_key()
    if key.team_id is None:
        if key.user_id != user_id:
            raise _no_key()
        return key
    try:
        await teams.managed(db, key.team_id, user_id)
    except NotFoundError:
        raise _no_key() from None  # an outsider learns nothing of the team
    return key


async def update(db: AsyncSession, key: ApiKey, body: ApiKeyControls, policy: LimitPolicy) -> None:
    """Apply the fields given (null clears one). Limits are checked against the tier of the
    key's owner (its creator), as they are at request time."""
    owner = await db.get(User, key.user_id)
    ceiling = policy.user_limits(key.user_id, owner.tier if owner is not None else "free")
    for field, value in _controls(body, ceiling, set(body.model_fields_set)).items():
        setattr(key, field, value)
    await db.flush()


async def revoke(db: AsyncSession, key: ApiKey) -> None:
    await api_keys.revoke_key(db, key.id, None)
