"""Cursor pagination, newest first, as OpenAI's list endpoints page (`after`, `limit`,
`has_more`): the batches', fine-tuning jobs' and their events' lists."""

from __future__ import annotations

from typing import Any, TypeVar

from sqlalchemy import Select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import InstrumentedAttribute

T = TypeVar("T")


async def newest_first(
    session: AsyncSession,
    query: Select[T],
    key: InstrumentedAttribute[Any],
    id_col: InstrumentedAttribute[str],
    after: T | None,
    limit: int,
) -> tuple[list[T], bool]:
    """Up to `limit` rows of `query` ordered by (`key`, `id_col`) descending, those after the
    cursor row `after` (the last of the previous page), and whether more follow. The id breaks
    ties, so rows with the same key are neither skipped nor repeated across pages."""
    if after is not None:
        anchor_key, anchor_id = getattr(after, key.key), getattr(after, id_col.key)
        query = query.where((key < anchor_key) | ((key == anchor_key) & (id_col < anchor_id)))
    rows = list(await session.scalars(query.order_by(key.desc(), id_col.desc()).limit(limit + 1)))
    return rows[:limit], len(rows) > limit
