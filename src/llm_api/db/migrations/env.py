"""Alembic environment. llm_api.db.migrate hands us an open connection (sync facade over the
async engine, via run_sync); SQLite needs batch mode for ALTER TABLE."""

from __future__ import annotations

from alembic import context
from sqlalchemy.engine import Connection

from llm_api.db.tables import Base

target_metadata = Base.metadata


def run_migrations(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations with `llm-api db upgrade` (llm_api.db.migrate)")
run_migrations(connection)
