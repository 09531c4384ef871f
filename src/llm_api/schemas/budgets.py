"""Wire types of /v1/budgets. Amounts are USD, as decimal numbers or strings (at most 9
decimal places), and come back as strings so no float rounds them."""

from __future__ import annotations

from datetime import date, datetime
from decimal import Decimal
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from llm_api.services.money.periods import Period

MAX_USD = Decimal(1_000_000)  # the limiter's stores count nano-dollars exactly up to 1e15
Usd = Decimal


class BudgetCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    scope: Literal["key", "user", "team"]
    subject_id: str = Field(
        min_length=1, max_length=32, description="The key's, user's or team's id."
    )
    period: Period = "month"
    hard_limit_usd: Usd = Field(gt=0, le=MAX_USD, decimal_places=9)
    soft_limit_usd: Usd | None = Field(None, gt=0, le=MAX_USD, decimal_places=9)

    @model_validator(mode="after")
    def _soft_below_hard(self) -> BudgetCreate:
        if self.soft_limit_usd is not None and self.soft_limit_usd > self.hard_limit_usd:
            raise ValueError("soft_limit_usd must not exceed hard_limit_usd")
        return self


class BudgetUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    hard_limit_usd: Usd | None = Field(None, gt=0, le=MAX_USD, decimal_places=9)
    soft_limit_usd: Usd | None = Field(
        None, gt=0, le=MAX_USD, decimal_places=9, description="null removes it."
    )


class BudgetOut(BaseModel):
    object: Literal["budget"] = "budget"
    id: str
    scope: str
    subject_id: str
    period: str
    hard_limit_usd: str
    soft_limit_usd: str | None
    period_start: date | None = Field(description="First UTC day of the current period.")
    resets_at: datetime | None = Field(description="When the current period ends.")
    spent_usd: str = Field(description="Spent in the current period, from the usage ledger.")
    created_at: datetime


class BudgetList(BaseModel):
    object: Literal["list"] = "list"
    data: list[BudgetOut]
