"""API keys: create (shown once, with its scopes and controls), list, change, revoke. One's own
keys, and a team's keys for its owners and admins (`team_id`); any other key is a 404. Every
route needs the `keys` scope (a password login holds it)."""

from __future__ import annotations

from fastapi import APIRouter, Request

from llm_api.api.deps import AuthDep, CurrentUser, DbSession, SettingsDep, StateDep
from llm_api.api.rate_limits import limit_route
from llm_api.api.scopes import requires_scope
from llm_api.db.tables import ApiKey, as_utc
from llm_api.schemas.accounts import (
    ApiKeyCreate,
    ApiKeyCreated,
    ApiKeyInfo,
    ApiKeyList,
    ApiKeyUpdate,
    DeletedApiKey,
    epoch,
)
from llm_api.services import audit
from llm_api.services.auth import api_keys, key_management, scopes

router = APIRouter(prefix="/keys", tags=["keys"])


def key_info(key: ApiKey) -> ApiKeyInfo:
    return ApiKeyInfo(
        id=key.id,
        name=key.name,
        prefix=key.prefix,
        scopes=scopes.ordered(scopes.parse(key.scopes)),
        created_at=epoch(key.created_at),
        team_id=key.team_id,
        expires_at=int(as_utc(key.expires_at).timestamp()) if key.expires_at else None,
        models=key.models,
        allowed_ips=key.allowed_ips,
        limits=key.limits,
        priority=key.priority,
    )


def audited(key: ApiKey) -> dict[str, object]:
    """What the audit log keeps of a key: everything shown about it, never the key."""
    return key_info(key).model_dump(exclude={"object", "created_at"}) | {"owner": key.user_id}


@router.post("", response_model=ApiKeyCreated, status_code=201)
@requires_scope("keys")
async def create_key(
    user: CurrentUser,
    db: DbSession,
    settings: SettingsDep,
    state: StateDep,
    request: Request,
    body: ApiKeyCreate | None = None,
) -> ApiKeyCreated:
    """A new key (for a team with `team_id`); the key itself is in this response only."""
    await limit_route(request, "key_creation", user.user_id)  # per account and per client IP
    key, raw = await key_management.create(
        db, user, body or ApiKeyCreate(), state.rate_limiter.policy, settings.max_keys_per_user
    )
    await audit.record(db, user, "key.created", key, after=audited(key), request=request)
    return ApiKeyCreated(**key_info(key).model_dump(), key=raw)


@router.get("", response_model=ApiKeyList)
@requires_scope("keys")
async def list_keys(user: CurrentUser, db: DbSession) -> ApiKeyList:
    """One's personal keys (a team's keys: GET /v1/teams/{id}/keys)."""
    assert user.user_id is not None
    return ApiKeyList(data=[key_info(k) for k in await api_keys.list_keys(db, user.user_id)])


@router.patch("/{key_id}", response_model=ApiKeyInfo)
@requires_scope("keys")
async def update_key(
    key_id: str,
    body: ApiKeyUpdate,
    user: CurrentUser,
    db: DbSession,
    auth: AuthDep,
    state: StateDep,
    request: Request,
) -> ApiKeyInfo:
    """Change a key's name or controls; takes effect on the next request."""
    assert user.user_id is not None
    key = await key_management.manageable(db, key_id, user.user_id)
    before = audited(key)
    await key_management.update(db, key, body, state.rate_limiter.policy)
    old, new = audit.diff(before, audited(key))
    await audit.record(db, user, "key.updated", key, before=old, after=new, request=request)
    auth.authenticator.forget(db)  # no cached verification keeps the old controls
    return key_info(key)


@router.delete("/{key_id}", response_model=DeletedApiKey)
@requires_scope("keys")
async def revoke_key(
    key_id: str, user: CurrentUser, db: DbSession, auth: AuthDep, request: Request
) -> DeletedApiKey:
    assert user.user_id is not None
    key = await key_management.manageable(db, key_id, user.user_id)
    await key_management.revoke(db, key)
    await audit.record(db, user, "key.revoked", key, after={"revoked": True}, request=request)
    auth.authenticator.forget(db)  # no cached verification of the key outlives the commit
    return DeletedApiKey(id=key_id)
