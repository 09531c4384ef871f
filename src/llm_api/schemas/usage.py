"""Wire types of the usage reports and the conversation-log preference."""

from __future__ import annotations

import re
from datetime import date
from datetime import date as Day  # the bucket's `date` field shadows the type
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict

_ISO_DAY = re.compile(r"\d{4}-\d{2}-\d{2}")


def _iso_day(value: Any) -> Any:
    """Only `YYYY-MM-DD`: pydantic's lax date parsing would read `0` or `1700000000` as Unix
    times (`end=0` became 1970-01-01 and an empty report instead of an error)."""
    if isinstance(value, str) and not _ISO_DAY.fullmatch(value):
        raise ValueError("Expected a UTC day as YYYY-MM-DD.")
    return value


IsoDay = Annotated[date, BeforeValidator(_iso_day)]
"""A query parameter naming a UTC day."""


class UsageSummary(BaseModel):
    requests: int
    errors: int
    cache_hits: int
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    # Exact USD as a decimal string (the ledger counts nano-dollars; no float sums).
    cost_usd: str = "0"


# What a report may group by (`group_by`): UTC day, model, API key, team, user (admins).
GroupBy = Literal["day", "model", "key", "team", "user"]


class UsageBucket(UsageSummary):
    """The usage of one group: by default one model on one UTC day (and, in the admin report,
    one user); `group_by` picks the fields, the others are null."""

    date: Day | None = None
    model: str | None = None
    user_id: str | None = None
    key_id: str | None = None
    team_id: str | None = None


class UsageReport(BaseModel):
    object: Literal["usage.report"] = "usage.report"
    start: date
    end: date
    data: list[UsageBucket]
    totals: UsageSummary


class ConversationLogPreference(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    enabled: bool


class ConversationLogStatus(BaseModel):
    enabled: bool  # the user's own preference
    server_enabled: bool  # whether the server logs conversations at all
    stored: int  # conversations stored for this user now
