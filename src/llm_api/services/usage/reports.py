"""Usage reports and the conversation-log preference, for the HTTP routes."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, date, datetime, timedelta
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from llm_api.core.exceptions import InvalidRequestError
from llm_api.schemas.usage import ConversationLogStatus, UsageBucket, UsageReport, UsageSummary
from llm_api.services.money.prices import usd_text
from llm_api.services.usage import repository as repo

DEFAULT_DAYS = 30
MAX_DAYS = 366


def date_range(start: date | None, end: date | None) -> tuple[date, date]:
    """Inclusive UTC days; defaults to the last 30 days. Reversed or over-long ranges are 400s."""
    end = end or datetime.now(UTC).date()
    if start is None:
        if end - date.min < timedelta(days=DEFAULT_DAYS - 1):  # before year 1: no such dates
            raise InvalidRequestError("`end` is too early.", param="end")
        start = end - timedelta(days=DEFAULT_DAYS - 1)
    if start > end:
        raise InvalidRequestError("`start` must not be after `end`.", param="start")
    if (end - start).days >= MAX_DAYS:
        raise InvalidRequestError(f"The range may span at most {MAX_DAYS} days.", param="start")
    return start, end


def _summary(s: repo.UsageSums) -> UsageSummary:
    return UsageSummary(
        requests=s.requests,
        errors=s.errors,
        cache_hits=s.cache_hits,
        prompt_tokens=s.prompt_tokens,
        completion_tokens=s.completion_tokens,
        total_tokens=s.prompt_tokens + s.completion_tokens,
        cost_usd=usd_text(s.cost_nanos),
    )


def _bucket(values: dict[str, Any], sums: repo.UsageSums) -> UsageBucket:
    return UsageBucket(
        date=values.get("day"),
        model=values.get("model"),
        user_id=values.get("user"),
        key_id=values.get("key"),
        team_id=values.get("team"),
        **_summary(sums).model_dump(),
    )


async def usage_report(
    session: AsyncSession,
    start: date | None,
    end: date | None,
    *,
    user_id: str | None = None,
    team_id: str | None = None,
    group_by: Sequence[str] = ("day", "model"),
) -> UsageReport:
    """Buckets and totals both come from SQL aggregates over the same rows, so the totals equal
    the sum of the records exactly (cost included: integer nano-dollars)."""
    first, last = date_range(start, end)
    who = repo.UsageFilter(user_id=user_id, team_id=team_id)
    groups = list(dict.fromkeys(group_by))  # each once, in the order asked
    buckets = await repo.usage_groups(session, first, last, who, groups)
    totals = await repo.usage_totals(session, first, last, who)
    data = [_bucket(values, sums) for values, sums in buckets]
    return UsageReport(start=first, end=last, data=data, totals=_summary(totals))


async def conversation_log_status(
    session: AsyncSession, user_id: str, server_enabled: bool
) -> ConversationLogStatus:
    return ConversationLogStatus(
        enabled=not await repo.is_opted_out(session, user_id),
        server_enabled=server_enabled,
        stored=await repo.conversation_count(session, user_id),
    )


async def set_conversation_log(
    session: AsyncSession, user_id: str, enabled: bool, server_enabled: bool
) -> ConversationLogStatus:
    await repo.set_opt_out(session, user_id, opted_out=not enabled)
    await session.flush()
    return await conversation_log_status(session, user_id, server_enabled)
