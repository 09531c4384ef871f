"""Budget periods: UTC calendar days, ISO weeks (from Monday), months, or none (for ever)."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from typing import Literal

Period = Literal["day", "week", "month", "none"]
PERIODS: tuple[Period, ...] = ("day", "week", "month", "none")
# A budget without a period keeps its keys this long after each use (no key lives without a
# TTL); its spend is also in the ledger.
NONE_PERIOD_MS = 400 * 86_400_000


def period_start(period: Period, now: datetime) -> date | None:
    """The first day of the period holding `now` (None: no period)."""
    today = now.astimezone(UTC).date()
    if period == "day":
        return today
    if period == "week":
        return today - timedelta(days=today.weekday())
    if period == "month":
        return today.replace(day=1)
    return None


def period_end(period: Period, now: datetime) -> datetime | None:
    """When the period holding `now` ends (the next one starts); None: never."""
    start = period_start(period, now)
    if start is None:
        return None
    if period == "day":
        nxt = start + timedelta(days=1)
    elif period == "week":
        nxt = start + timedelta(days=7)
    else:
        nxt = (start.replace(day=28) + timedelta(days=4)).replace(day=1)
    return datetime(nxt.year, nxt.month, nxt.day, tzinfo=UTC)


def period_key(period: Period, now: datetime) -> str:
    """The period's name in keys and alerts: its first day, or "none"."""
    start = period_start(period, now)
    return start.isoformat() if start is not None else "none"


def ms_left(period: Period, now: datetime) -> int:
    end = period_end(period, now)
    if end is None:
        return NONE_PERIOD_MS
    return max(1, int((end - now).total_seconds() * 1000))
