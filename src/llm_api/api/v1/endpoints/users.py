"""The signed-in user's own account. Role and tier are not theirs to change (400)."""

from __future__ import annotations

from fastapi import APIRouter, Request

from llm_api.api.deps import AuthDep, CurrentUser, DbSession
from llm_api.api.scopes import requires_scope
from llm_api.core.exceptions import AuthenticationError
from llm_api.db.tables import User
from llm_api.schemas.accounts import UserInfo, UserUpdate, epoch
from llm_api.services import audit

router = APIRouter(prefix="/users", tags=["users"])


def user_info(user: User) -> UserInfo:
    return UserInfo(
        id=user.id,
        email=user.email,
        display_name=user.display_name,
        tier=user.tier,  # type: ignore[arg-type]
        role=user.role,  # type: ignore[arg-type]
        is_active=user.is_active,
        created_at=epoch(user.created_at),
    )


async def _me(principal_id: str | None, db: DbSession, auth: AuthDep) -> User:
    user = await auth.users.get(db, principal_id or "")
    if user is None:
        raise AuthenticationError()
    return user


@router.get("/me", response_model=UserInfo)
@requires_scope("account")
async def read_me(principal: CurrentUser, db: DbSession, auth: AuthDep) -> UserInfo:
    return user_info(await _me(principal.user_id, db, auth))


@router.patch("/me", response_model=UserInfo)
@requires_scope("account")
async def update_me(
    body: UserUpdate, principal: CurrentUser, db: DbSession, auth: AuthDep, request: Request
) -> UserInfo:
    user = await _me(principal.user_id, db, auth)
    was = audit.changes(user, ("display_name",))
    if "display_name" in body.model_fields_set:
        user.display_name = body.display_name
    await db.flush()
    before, after = audit.diff(was, audit.changes(user, ("display_name",)))
    if after:
        await audit.record(
            db, principal, "user.updated", user, before=before, after=after, request=request
        )
    return user_info(user)
