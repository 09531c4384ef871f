"""Wire types of the usage reports and the conversation-log preference."""

from __future__ import annotations

from datetime import date
from typing import Literal

from pydantic import BaseModel, ConfigDict


class UsageSummary(BaseModel):
    requests: int
    errors: int
    cache_hits: int
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class UsageBucket(UsageSummary):
    """One model's usage on one UTC day (and, in the admin report, by one user)."""

    date: date
    model: str
    user_id: str | None = None


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
