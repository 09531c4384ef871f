"""Alembic migrations upgrade and downgrade cleanly on SQLite and PostgreSQL, and the migrated
schema matches the ORM tables exactly (no autogenerate diff)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect
from sqlalchemy.engine import Connection

from llm_api.db import migrate
from llm_api.db.engine import Database
from llm_api.db.tables import Base
from tests.conftest import postgres_database, require_service
from tests.conftest import test_settings as settings_for


@pytest.fixture(params=["sqlite", "postgres"])
async def database(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Database]:
    if request.param == "sqlite":
        db = Database.from_settings(settings_for(tmp_path))
        yield db
        await db.dispose()
        return
    require_service("PostgreSQL", "127.0.0.1", 5432)
    async with postgres_database() as url:
        db = Database.from_settings(settings_for(tmp_path), url)
        yield db
        await db.dispose()


def _diff(conn: Connection) -> list[Any]:
    return list(compare_metadata(MigrationContext.configure(conn), Base.metadata))


def _tables(conn: Connection) -> set[str]:
    return set(inspect(conn).get_table_names())


async def test_upgrade_downgrade_upgrade(database: Database) -> None:
    engine = database.engine
    await migrate.upgrade(engine)
    assert await migrate.current_revision(engine) == migrate.head_revision()
    async with engine.connect() as conn:
        assert await conn.run_sync(_diff) == []
        assert {"users", "api_keys", "refresh_tokens"} <= await conn.run_sync(_tables)
    await migrate.downgrade(engine, "base")
    assert await migrate.current_revision(engine) is None
    async with engine.connect() as conn:
        assert await conn.run_sync(_tables) <= {"alembic_version"}
    await migrate.upgrade(engine)
    assert await migrate.current_revision(engine) == migrate.head_revision()


async def test_each_step_downgrades_and_upgrades(database: Database) -> None:
    engine = database.engine
    await migrate.upgrade(engine)
    steps = 0
    while await migrate.current_revision(engine) is not None:
        await migrate.downgrade(engine, "-1")
        steps += 1
    assert steps >= 1
    for _ in range(steps):
        await migrate.upgrade(engine, "+1")
    assert await migrate.current_revision(engine) == migrate.head_revision()
