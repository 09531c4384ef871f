"""Budgets at admission: which budgets a request is subject to, as the rate limiter's `budget`
limits, and what to do when a settlement crosses a soft limit.

The rules live in the database (table `budgets`, managed through /v1/budgets,
services/money/budget_admin.py) and are held in memory by every process (`BudgetBook`), reloaded
every `LLM_API_BUDGET_REFRESH_SECONDS`: admission needs no query. Spend is counted by the
limiter's store (Redis, shared by all processes; or memory when embedded) in the same atomic
script as the token limits, and recorded in the usage ledger.

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

import structlog
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from llm_api.db.tables import Budget
from llm_api.services.llm.types import RequestContext
from llm_api.services.money.periods import Period, ms_left, period_key
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
        self._alerted: set[tuple[str, str]] = set()  # (budget, period) this process reported
        self._task: asyncio.Task[None] | None = None
        self._hooks: set[asyncio.Task[None]] = set()

    def set_rules(self, rules: list[BudgetRule]) -> None:
        by: dict[tuple[str, str], list[BudgetRule]] = {}
        for rule in rules:
            by.setdefault((rule.scope, rule.subject_id), []).append(rule)
        self._by_subject = {k: tuple(v) for k, v in by.items()}

    @property
    def empty(self) -> bool:
        return not self._by_subject

    async def refresh(self) -> None:
        if self.sessions is None:
            return
        async with self.sessions() as session:
            rows = (await session.scalars(select(Budget))).all()
        self.set_rules([BudgetRule.of(r) for r in rows])

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
