"""A user's own API keys: create (shown once, with its scopes), list, revoke. Another user's key
is a 404. Every route needs the `keys` scope (a password login holds it)."""

from __future__ import annotations

from fastapi import APIRouter, Request

from llm_api.api.deps import AuthDep, CurrentUser, DbSession, SettingsDep
from llm_api.api.rate_limits import limit_route
from llm_api.api.scopes import requires_scope
from llm_api.core.exceptions import InvalidRequestError, NotFoundError
from llm_api.db.tables import ApiKey
from llm_api.schemas.accounts import (
    ApiKeyCreate,
    ApiKeyCreated,
    ApiKeyInfo,
    ApiKeyList,
    DeletedApiKey,
    epoch,
)
from llm_api.services import audit
from llm_api.services.auth import api_keys, scopes

router = APIRouter(prefix="/keys", tags=["keys"])


def key_info(key: ApiKey) -> ApiKeyInfo:
    return ApiKeyInfo(
        id=key.id,
        name=key.name,
        prefix=key.prefix,
        scopes=scopes.ordered(scopes.parse(key.scopes)),
        created_at=epoch(key.created_at),
    )


@router.post("", response_model=ApiKeyCreated, status_code=201)
@requires_scope("keys")
async def create_key(
    user: CurrentUser,
    db: DbSession,
    settings: SettingsDep,
    request: Request,
    body: ApiKeyCreate | None = None,
) -> ApiKeyCreated:
    assert user.user_id is not None
    requested = set(body.scopes) if body and body.scopes else scopes.DEFAULT_KEY_SCOPES
    scopes.check_grant(requested, user.scopes)  # a key never mints a broader one
    await limit_route(request, "key_creation", user.user_id)  # per account and per client IP
    if await api_keys.count_active(db, user.user_id) >= settings.max_keys_per_user:
        raise InvalidRequestError(
            f"At most {settings.max_keys_per_user} active keys per user; revoke one first."
        )
    key, raw = await api_keys.create_key(db, user.user_id, body.name if body else None, requested)
    after = {"name": key.name, "prefix": key.prefix, "scopes": key.scopes, "owner": key.user_id}
    await audit.record(db, user, "key.created", key, after=after, request=request)
    return ApiKeyCreated(**key_info(key).model_dump(), key=raw)


@router.get("", response_model=ApiKeyList)
@requires_scope("keys")
async def list_keys(user: CurrentUser, db: DbSession) -> ApiKeyList:
    assert user.user_id is not None
    return ApiKeyList(data=[key_info(k) for k in await api_keys.list_keys(db, user.user_id)])


@router.delete("/{key_id}", response_model=DeletedApiKey)
@requires_scope("keys")
async def revoke_key(
    key_id: str, user: CurrentUser, db: DbSession, auth: AuthDep, request: Request
) -> DeletedApiKey:
    if not await api_keys.revoke_key(db, key_id, user.user_id):
        raise NotFoundError("No such API key.", param="key_id")
    await audit.record(
        db,
        user,
        "key.revoked",
        audit.Target("key", key_id),
        after={"revoked": True},
        request=request,
    )
    auth.authenticator.forget(db)  # no cached verification of the key outlives the commit
    return DeletedApiKey(id=key_id)
