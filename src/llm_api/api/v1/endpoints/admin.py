"""Administration under /v1/admin: list, create, deactivate users (which cancels their
unfinished batches), change tiers and roles, revoke any key. Every route depends on AdminUser
(403 for everyone else)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request

from llm_api.api.deps import AuthDep, DbSession
from llm_api.api.scopes import requires_scope
from llm_api.api.security import get_admin
from llm_api.api.v1.endpoints.users import user_info
from llm_api.core.exceptions import InvalidRequestError, NotFoundError
from llm_api.db.tables import User
from llm_api.schemas.accounts import (
    AdminUserCreate,
    AdminUserUpdate,
    DeletedApiKey,
    UserInfo,
    UserList,
)
from llm_api.services import audit
from llm_api.services.auth import api_keys
from llm_api.services.auth.principal import Principal
from llm_api.services.batches.service import cancel_user_batches
from llm_api.services.fine_tuning.service import cancel_user_jobs

router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[Depends(get_admin)])
Admin = Annotated[Principal, Depends(get_admin)]


@router.get("/users", response_model=UserList)
@requires_scope("admin")
async def list_users(
    db: DbSession,
    auth: AuthDep,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
    offset: Annotated[int, Query(ge=0, le=1_000_000_000)] = 0,  # SQL OFFSET is a 64-bit int
) -> UserList:
    return UserList(data=[user_info(u) for u in await auth.users.list(db, limit, offset)])


@router.post("/users", response_model=UserInfo, status_code=201)
@requires_scope("admin")
async def create_user(
    body: AdminUserCreate, admin: Admin, db: DbSession, auth: AuthDep, request: Request
) -> UserInfo:
    user = await auth.users.create(db, body.email, body.password, role=body.role, tier=body.tier)
    after = audit.changes(user, audit.USER_FIELDS)
    await audit.record(db, admin, "user.created", user, after=after, request=request)
    return user_info(user)


async def _user(db: DbSession, user_id: str) -> User:
    user = await db.get(User, user_id)
    if user is None:
        raise NotFoundError("No such user.", param="user_id")
    return user


@router.get("/users/{user_id}", response_model=UserInfo)
@requires_scope("admin")
async def get_user(user_id: str, db: DbSession) -> UserInfo:
    return user_info(await _user(db, user_id))


@router.patch("/users/{user_id}", response_model=UserInfo)
@requires_scope("admin")
async def update_user(
    user_id: str,
    body: AdminUserUpdate,
    admin: Admin,
    db: DbSession,
    auth: AuthDep,
    request: Request,
) -> UserInfo:
    user = await _user(db, user_id)
    if user.id == admin.user_id and (body.is_active is False or body.role == "user"):
        raise InvalidRequestError("Administrators cannot deactivate or demote themselves.")
    was = audit.changes(user, audit.USER_FIELDS)
    if body.tier is not None:
        user.tier = body.tier
    if body.role is not None:
        user.role = body.role
    if body.is_active is not None:
        if user.is_active and not body.is_active:
            await cancel_user_batches(db, user.id)  # no more work runs for them
            await cancel_user_jobs(db, user.id)
        user.is_active = body.is_active
    await db.flush()
    before, after = audit.diff(was, audit.changes(user, audit.USER_FIELDS))
    if after:
        action = (
            "user.deactivated"
            if after.get("is_active") is False
            else "user.reactivated"
            if after.get("is_active") is True
            else "user.updated"
        )
        await audit.record(db, admin, action, user, before=before, after=after, request=request)
    auth.authenticator.forget(db)  # cached API keys carry the old tier, role and status
    return user_info(user)


@router.delete("/keys/{key_id}", response_model=DeletedApiKey)
@requires_scope("admin")
async def revoke_any_key(
    key_id: str, admin: Admin, db: DbSession, auth: AuthDep, request: Request
) -> DeletedApiKey:
    if not await api_keys.revoke_key(db, key_id, None):
        raise NotFoundError("No such API key.", param="key_id")
    await audit.record(
        db,
        admin,
        "key.revoked",
        audit.Target("key", key_id),
        after={"revoked": True},
        request=request,
    )
    auth.authenticator.forget(db)
    return DeletedApiKey(id=key_id)
