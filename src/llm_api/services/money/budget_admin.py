"""Budgets through the API: create, list, change and delete, each checked against who asks.

Administrators manage every budget. Users manage their own (scope `user`) and their keys'
(scope `key`). A team's owners and admins manage its budgets, and its members may read them.
Anyone else gets 404, as if the budget did not exist. After a change the caller's process
reloads its budget book at once; the others within LLM_API_BUDGET_REFRESH_SECONDS.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import func, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from llm_api.core.exceptions import ConflictError, InvalidRequestError, NotFoundError
from llm_api.db.tables import ApiKey, Budget, TeamMember, UsageRecord
from llm_api.schemas.budgets import BudgetCreate, BudgetOut, BudgetUpdate
from llm_api.services import teams
from llm_api.services.auth.principal import Principal
from llm_api.services.money.periods import period_end, period_start
from llm_api.services.money.prices import nanos_of, usd_text

TEAM_MANAGERS = ("owner", "admin")


def _not_found() -> NotFoundError:
    return NotFoundError("No such budget.", param="budget_id")


async def is_team_member(session: AsyncSession, team_id: str, user_id: str | None) -> bool:
    return await teams.role_of(session, team_id, user_id) is not None


async def _may(
    session: AsyncSession, who: Principal, scope: str, subject_id: str, write: bool
) -> bool:
    if who.is_admin:
        return True
    if scope == "user":
        return subject_id == who.user_id
    if scope == "key":
        key = await session.get(ApiKey, subject_id)
        return key is not None and key.user_id == who.user_id
    role = await teams.role_of(session, subject_id, who.user_id)
    return role in TEAM_MANAGERS if write else role is not None


async def _spent(session: AsyncSession, row: Budget, now: datetime) -> int:
    column = {"key": UsageRecord.key_id, "user": UsageRecord.user_id, "team": UsageRecord.team_id}
    stmt = select(func.coalesce(func.sum(UsageRecord.cost_nanos), 0)).where(
        column[row.scope] == row.subject_id
    )
    start = period_start(row.period, now)  # type: ignore[arg-type]
    if start is not None:
        stmt = stmt.where(UsageRecord.day >= start)
    return int(await session.scalar(stmt) or 0)


async def view(session: AsyncSession, row: Budget) -> BudgetOut:
    now = datetime.now(UTC)
    period = row.period
    return BudgetOut(
        id=row.id,
        scope=row.scope,
        subject_id=row.subject_id,
        period=period,
        hard_limit_usd=usd_text(row.hard_limit_nanos),
        soft_limit_usd=None if row.soft_limit_nanos is None else usd_text(row.soft_limit_nanos),
        period_start=period_start(period, now),  # type: ignore[arg-type]
        resets_at=period_end(period, now),  # type: ignore[arg-type]
        spent_usd=usd_text(await _spent(session, row, now)),
        created_at=row.created_at,
    )


async def create(session: AsyncSession, who: Principal, body: BudgetCreate) -> Budget:
    if not await _may(session, who, body.scope, body.subject_id, write=True):
        raise NotFoundError(f"No such {body.scope}.", param="subject_id")
    row = Budget(
        scope=body.scope,
        subject_id=body.subject_id,
        period=body.period,
        hard_limit_nanos=nanos_of(body.hard_limit_usd),
        soft_limit_nanos=None if body.soft_limit_usd is None else nanos_of(body.soft_limit_usd),
        created_by=who.user_id,
    )
    session.add(row)
    try:
        await session.flush()
    except IntegrityError:
        raise ConflictError(
            f"This {body.scope} already has a {body.period} budget; change that one."
        ) from None
    return row


async def get(session: AsyncSession, who: Principal, budget_id: str, write: bool) -> Budget:
    row = await session.get(Budget, budget_id)
    if row is None or not await _may(session, who, row.scope, row.subject_id, write):
        raise _not_found()
    return row


async def update(
    session: AsyncSession, who: Principal, budget_id: str, body: BudgetUpdate
) -> Budget:
    row = await get(session, who, budget_id, write=True)
    fields = body.model_fields_set
    if "hard_limit_usd" in fields and body.hard_limit_usd is not None:
        row.hard_limit_nanos = nanos_of(body.hard_limit_usd)
    if "soft_limit_usd" in fields:
        soft = body.soft_limit_usd
        row.soft_limit_nanos = None if soft is None else nanos_of(soft)
    if row.soft_limit_nanos is not None and row.soft_limit_nanos > row.hard_limit_nanos:
        raise InvalidRequestError(
            "soft_limit_usd must not exceed hard_limit_usd.", param="soft_limit_usd"
        )
    await session.flush()
    return row


async def delete(session: AsyncSession, who: Principal, budget_id: str) -> None:
    row = await get(session, who, budget_id, write=True)
    await session.delete(row)
    await session.flush()


async def visible(session: AsyncSession, who: Principal) -> list[Budget]:
    """Every budget the caller may read."""
    stmt = select(Budget).order_by(Budget.created_at)
    if not who.is_admin:
        keys = select(ApiKey.id).where(ApiKey.user_id == who.user_id)
        joined = select(TeamMember.team_id).where(TeamMember.user_id == who.user_id)
        stmt = stmt.where(
            or_(
                (Budget.scope == "user") & (Budget.subject_id == who.user_id),
                (Budget.scope == "key") & Budget.subject_id.in_(keys),
                (Budget.scope == "team") & Budget.subject_id.in_(joined),
            )
        )
    return list((await session.scalars(stmt)).all())
