"""The money services of one process, started and closed by the lifespan: the budget book
(the rules, reloaded in the background) and the soft-limit webhook outbox's sender."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from llm_api.core.config import Settings
from llm_api.services.money.budgets import BudgetBook
from llm_api.services.money.webhooks import AlertOutbox


@dataclass(slots=True)
class Money:
    budgets: BudgetBook
    alerts: AlertOutbox

    async def aclose(self) -> None:
        await self.budgets.aclose()
        await self.alerts.aclose()


async def start_money(settings: Settings, sessions: async_sessionmaker[AsyncSession]) -> Money:
    alerts = AlertOutbox(sessions, settings)
    budgets = BudgetBook(sessions, settings.budget_refresh_seconds, alerts.enqueue)
    await budgets.start()
    alerts.start()  # sends what a previous process left in the outbox, too
    return Money(budgets, alerts)
