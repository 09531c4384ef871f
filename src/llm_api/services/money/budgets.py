"""Budgets at admission: which budgets a request is subject to, as the rate limiter's `budget`
limits, and what to do when a settlement crosses a soft limit.

The rules live in the database (table `budgets`, managed through /v1/budgets,
services/money/budget_admin.py) and are held in memory by every process (`BudgetBook`), reloaded
every `LLM_API_BUDGET_REFRESH_SECONDS`: admission needs no query. Spend is counted by the
limiter's store (Redis, shared by all processes; or memory when embedded) in the same atomic
script as the token limits, and recorded in the usage ledger.

With the rules, each reload also reads every budget's spend in its current period from the
ledger (one grouped query): a store that lost its counter (Redis without persistence restarted,
a key evicted, an embedded server restarted) re-seeds it from that floor instead of 0. The
ledger lags the counter (usage is written through a buffer, and the floor is as old as the last
reload), so the floor is a lower bound: a counter only starts from it when missing.

A request is subject to its key's budgets, and to its team's when its key is a team's service
key (`Principal.team_id`), else to its user's: a team's spend is the team's, not that of the
member who happened to create its key.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import structlog
from sqlalchemy import case, func, literal, select, union_all
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from llm_api.db.tables import Budget, UsageRecord
from llm_api.services.llm.types import RequestContext
from llm_api.services.money.periods import Period, ms_left, period_key, period_start
from llm_api.services.rate_limit.types import LimitSpec

log = structlog.get_logger(__name__)

SCOPE_WORDS = {"key": "API key", "user": "user", "team": "team"}
PERIOD_WORDS = {"day": "daily", "week": "weekly", "month": "monthly", "none": "total"}


@dataclass(frozen=True, slots=True)
class BudgetRule:
    id: str
    scope: str  # key | user | team
    subject_id: str
    period: Period
    hard_nanos: int
    soft_nanos: int | None

    @classmethod
    def of(cls, row: Budget) -> BudgetRule:
        return cls(
            row.id,
            row.scope,
            row.subject_id,
            row.period,  # type: ignore[arg-type]
            row.hard_limit_nanos,
            row.soft_limit_nanos,
        )

    @property
    def label(self) -> str:
        return f"{PERIOD_WORDS[self.period]} budget"


@dataclass(frozen=True, slots=True)
class BudgetCharge:
    """One budget a request is admitted against: its rule, its period, and the limit spec."""

    rule: BudgetRule
    period: str  # period_key
    spec: LimitSpec


# Told (budget, period, total spent) once a settlement takes a budget to its soft limit.
SoftLimitHook = Callable[[BudgetRule, str, int], Awaitable[None]]


_SUBJECT_COLUMNS = {
    "key": UsageRecord.key_id,
    "user": UsageRecord.user_id,
    "team": UsageRecord.team_id,
}
_DATED: tuple[Period, ...] = ("day", "week", "month")


async def ledger_floors(
    session: AsyncSession, rules: list[BudgetRule], now: datetime
) -> dict[tuple[str, str], int]:
    """Each budget's spend in its period holding `now`, from the ledger, by (budget id, period
    key): one query, each subject's sums since the start of the day, the week, the month and
    ever, grouped by subject (the (subject, day) indexes serve it)."""
    starts = {p: period_start(p, now) for p in _DATED}
    parts: list[Any] = []  # selects
    for scope, column in _SUBJECT_COLUMNS.items():
        mine = [r for r in rules if r.scope == scope]
        if not mine:
            continue
        sums = [
            func.sum(case((UsageRecord.day >= starts[p], UsageRecord.cost_nanos), else_=0))
            for p in _DATED
        ]
        stmt = (
            select(literal(scope), column, *sums, func.sum(UsageRecord.cost_nanos))
            .where(column.in_({r.subject_id for r in mine}))
            .group_by(column)
        )
        periods = {r.period for r in mine}
        if "none" not in periods:
            stmt = stmt.where(UsageRecord.day >= min(starts[p] for p in periods))  # type: ignore[type-var]
        parts.append(stmt)
    if not parts:
        return {}
    query: Any = parts[0]
    if len(parts) > 1:
        query = union_all(*parts)
    spent: dict[tuple[str, str], dict[Period, int]] = {}
    for row in (await session.execute(query)).all():
        scope, subject, *sums = tuple(row)
        values = [int(v or 0) for v in sums]
        spent[(scope, subject)] = dict(zip((*_DATED, "none"), values, strict=True))  # type: ignore[arg-type]
    return {
        (r.id, period_key(r.period, now)): spent.get((r.scope, r.subject_id), {}).get(r.period, 0)
        for r in rules
    }


class BudgetBook:
    """Every budget, in memory, by (scope, subject)."""

    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession] | None = None,
        refresh_s: float = 5.0,
        on_soft_limit: SoftLimitHook | None = None,
    ) -> None:
        self.sessions = sessions
        self.refresh_s = refresh_s
        self.on_soft_limit = on_soft_limit
        self._by_subject: dict[tuple[str, str], tuple[BudgetRule, ...]] = {}
        # (budget id, period key) -> the period's spend in the ledger at the last reload.
        self._floors: dict[tuple[str, str], int] = {}
        self._alerted: set[tuple[str, str]] = set()  # (budget, period) this process reported
        self._task: asyncio.Task[None] | None = None
        self._hooks: set[asyncio.Task[None]] = set()

    def set_rules(
        self, rules: list[BudgetRule], floors: dict[tuple[str, str], int] | None = None
    ) -> None:
        by: dict[tuple[str, str], list[BudgetRule]] = {}
        for rule in rules:
            by.setdefault((rule.scope, rule.subject_id), []).append(rule)
        self._by_subject = {k: tuple(v) for k, v in by.items()}
        self._floors = floors or {}

    @property
    def empty(self) -> bool:
        return not self._by_subject

    async def refresh(self) -> None:
        if self.sessions is None:
            return
        now = datetime.now(UTC)
        async with self.sessions() as session:
            rules = [BudgetRule.of(r) for r in (await session.scalars(select(Budget))).all()]
            floors = await ledger_floors(session, rules, now)
        self.set_rules(rules, floors)

    async def start(self) -> None:
        """Load now (a database that is down leaves the book empty until the next try), then
        reload in the background."""
        with contextlib.suppress(Exception):
            await self.refresh()
        self._task = asyncio.create_task(self._reload(), name="budget-book")

    async def _reload(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_s)
            try:
                await self.refresh()
            except Exception as exc:  # keep the rules we have
                log.warning("budget_refresh_failed", error=type(exc).__name__)

    async def aclose(self) -> None:
        if self._hooks:  # alerts being enqueued: a short wait (a lost one is found again by
            await asyncio.wait(self._hooks, timeout=2)  # the next settlement past the limit)
        tasks = [t for t in (self._task, *self._hooks) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # --- admission ------------------------------------------------------------------------------

    def charges(
        self, ctx: RequestContext, cost: int, now: datetime | None = None
    ) -> list[BudgetCharge]:
        """The budget limits of one request that may cost up to `cost` nano-dollars."""
        if not self._by_subject:
            return []
        now = now or datetime.now(UTC)
        out: list[BudgetCharge] = []
        owner = ("team", ctx.team_id) if ctx.team_id is not None else ("user", ctx.user_id)
        for scope, subject in (("key", ctx.key_id), owner):
            if subject is None:
                continue
            for rule in self._by_subject.get((scope, subject), ()):
                period = period_key(rule.period, now)
                spec = LimitSpec(
                    "budget", rule.label, scope, f"{subject}:{rule.id}:{period}", "budget",
                    "cost", rule.hard_nanos, ms_left(rule.period, now), cost,
                    self._floors.get((rule.id, period), 0),
                )  # fmt: skip
                out.append(BudgetCharge(rule, period, spec))
        return out

    # --- settlement -----------------------------------------------------------------------------

    def settled(self, charge: BudgetCharge, total: int) -> None:
        """A settlement left the budget's period at `total`: alert once per period when that
        reaches the soft limit (the outbox's unique key makes it once across processes too)."""
        soft = charge.rule.soft_nanos
        if soft is None or total < soft or self.on_soft_limit is None:
            return
        mark = (charge.rule.id, charge.period)
        if mark in self._alerted:
            return
        self._alerted.add(mark)
        if len(self._alerted) > 100_000:  # old periods' marks: the outbox still dedupes
            self._alerted = {mark}
        task = asyncio.get_running_loop().create_task(
            self._alert(charge, total), name="budget-soft-limit"
        )
        self._hooks.add(task)
        task.add_done_callback(self._hooks.discard)

    async def _alert(self, charge: BudgetCharge, total: int) -> None:
        assert self.on_soft_limit is not None
        try:
            await self.on_soft_limit(charge.rule, charge.period, total)
        except Exception:
            self._alerted.discard((charge.rule.id, charge.period))  # the next settlement retries
            log.exception("budget_alert_enqueue_failed", budget=charge.rule.id)
