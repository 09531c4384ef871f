"""newest_first, the cursor pages of batches, fine-tuning jobs and events: newest first, ties
on the key broken by id, every row exactly once across pages."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

from llm_api.db.tables import Base, Batch
from llm_api.services.paging import newest_first


async def test_pages_walk_every_row_once_newest_first(tmp_path: Path) -> None:
    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'paging.db'}")
    async with engine.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)
    sessions = async_sessionmaker(engine, expire_on_commit=False)
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    # Three rows share one time: only the id orders them.
    times = {"b1": t0, "b2": t0 + timedelta(seconds=1), "b3": t0 + timedelta(seconds=1)}
    times |= {"b4": t0 + timedelta(seconds=1), "b5": t0 + timedelta(seconds=2)}
    async with sessions.begin() as s:
        for batch_id, created in times.items():
            s.add(
                Batch(id=batch_id, user_id="u", endpoint="e", input_file_id="f", created_at=created)
            )
        s.add(Batch(id="other", user_id="v", endpoint="e", input_file_id="f", created_at=t0))
    seen: list[str] = []
    pages: list[bool] = []
    after: Batch | None = None
    async with sessions() as s:
        while True:
            rows, has_more = await newest_first(
                s, select(Batch).where(Batch.user_id == "u"), Batch.created_at, Batch.id, after, 2
            )
            seen += [r.id for r in rows]
            pages.append(has_more)
            if not has_more:
                break
            after = rows[-1]
    await engine.dispose()
    assert seen == ["b5", "b4", "b3", "b2", "b1"]
    assert pages == [True, True, False]
