"""GET /v1/usage (one's own), GET /v1/admin/usage (everyone's) and the conversation-log
preference (GET/PUT /v1/conversation-log)."""

from __future__ import annotations

from fastapi import APIRouter, Query

from llm_api.api.deps import AdminUser, CurrentUser, DbSession, SettingsDep
from llm_api.api.scopes import requires_scope
from llm_api.schemas.usage import (
    ConversationLogPreference,
    ConversationLogStatus,
    IsoDay,
    UsageReport,
)
from llm_api.services.usage.reports import (
    conversation_log_status,
    set_conversation_log,
    usage_report,
)

router = APIRouter(tags=["usage"])

START = Query(None, description="First UTC day (YYYY-MM-DD); default: 29 days before `end`.")
END = Query(None, description="Last UTC day (YYYY-MM-DD), inclusive; default: today.")


@router.get("/usage", response_model=UsageReport)
@requires_scope("inference")
async def my_usage(
    user: CurrentUser, db: DbSession, start: IsoDay | None = START, end: IsoDay | None = END
) -> UsageReport:
    """The caller's usage by day and model."""
    return await usage_report(db, start, end, user_id=user.user_id, per_user=False)


@router.get("/admin/usage", response_model=UsageReport)
@requires_scope("admin")
async def all_usage(
    _: AdminUser,
    db: DbSession,
    start: IsoDay | None = START,
    end: IsoDay | None = END,
    user_id: str | None = Query(None, max_length=64, description="Only this user."),
) -> UsageReport:
    """Every user's usage by day, model and user (administrators only)."""
    return await usage_report(db, start, end, user_id=user_id, per_user=True)


@router.get("/conversation-log", response_model=ConversationLogStatus)
@requires_scope("account")
async def get_conversation_log(
    user: CurrentUser, db: DbSession, settings: SettingsDep
) -> ConversationLogStatus:
    assert user.user_id is not None
    return await conversation_log_status(db, user.user_id, settings.conversation_log)


@router.put("/conversation-log", response_model=ConversationLogStatus)
@requires_scope("account")
async def put_conversation_log(
    body: ConversationLogPreference, user: CurrentUser, db: DbSession, settings: SettingsDep
) -> ConversationLogStatus:
    """Opt out (`{"enabled": false}`, which also deletes what was stored) or back in."""
    assert user.user_id is not None
    return await set_conversation_log(db, user.user_id, body.enabled, settings.conversation_log)
