"""GET /v1/usage (one's own), GET /v1/admin/usage (everyone's) and the conversation-log
preference (GET/PUT /v1/conversation-log)."""

from __future__ import annotations

from fastapi import APIRouter, Query

from llm_api.api.deps import AdminUser, CurrentUser, DbSession, SettingsDep
from llm_api.api.scopes import requires_scope
from llm_api.core.exceptions import InvalidRequestError, NotFoundError
from llm_api.schemas.usage import (
    ConversationLogPreference,
    ConversationLogStatus,
    IsoDay,
    UsageReport,
)
from llm_api.services.money.budget_admin import is_team_member
from llm_api.services.usage.reports import (
    conversation_log_status,
    set_conversation_log,
    usage_report,
)

router = APIRouter(tags=["usage"])

START = Query(None, description="First UTC day (YYYY-MM-DD); default: 29 days before `end`.")
END = Query(None, description="Last UTC day (YYYY-MM-DD), inclusive; default: today.")
GROUP_BY = Query(
    None,
    description="Group by any of day, model, key, team (and user, admins), repeated or "
    "comma-separated; default: day and model (and user for admins).",
)


def _groups(raw: list[str] | None, default: tuple[str, ...], allowed: frozenset[str]) -> list[str]:
    if not raw:
        return list(default)
    names = [g.strip() for item in raw for g in item.split(",") if g.strip()]
    bad = [g for g in names if g not in allowed]
    if bad or len(names) > len(allowed):
        raise InvalidRequestError(
            f"`group_by` takes {', '.join(sorted(allowed))}; not {', '.join(bad) or 'repeats'}.",
            param="group_by",
        )
    return names


OWN_GROUPS = frozenset({"day", "model", "key", "team"})
ALL_GROUPS = OWN_GROUPS | {"user"}


@router.get("/usage", response_model=UsageReport)
@requires_scope("inference")
async def my_usage(
    user: CurrentUser,
    db: DbSession,
    start: IsoDay | None = START,
    end: IsoDay | None = END,
    group_by: list[str] | None = GROUP_BY,
    team_id: str | None = Query(
        None, max_length=32, description="A team's usage (its members only) instead of yours."
    ),
) -> UsageReport:
    """The caller's usage (or a team's, to its members), with its cost, by day and model or
    as `group_by` asks."""
    groups = _groups(group_by, ("day", "model"), OWN_GROUPS)
    if team_id is not None:
        if not user.is_admin and not await is_team_member(db, team_id, user.user_id):
            raise NotFoundError("No such team.", param="team_id")
        return await usage_report(db, start, end, team_id=team_id, group_by=groups)
    return await usage_report(db, start, end, user_id=user.user_id, group_by=groups)


@router.get("/admin/usage", response_model=UsageReport)
@requires_scope("admin")
async def all_usage(
    _: AdminUser,
    db: DbSession,
    start: IsoDay | None = START,
    end: IsoDay | None = END,
    user_id: str | None = Query(None, max_length=64, description="Only this user."),
    team_id: str | None = Query(None, max_length=32, description="Only this team."),
    group_by: list[str] | None = GROUP_BY,
) -> UsageReport:
    """Every user's usage and cost by day, model and user, or as `group_by` asks
    (administrators only)."""
    groups = _groups(group_by, ("day", "model", "user"), ALL_GROUPS)
    return await usage_report(db, start, end, user_id=user_id, team_id=team_id, group_by=groups)


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
