"""Accounts at start-up: open the database, migrate it when we own it, and tell the operator
what they must do (migrate PostgreSQL, create the first user, notice that auth is off)."""

from __future__ import annotations

import asyncio
import fcntl
import os
from typing import IO

import structlog
from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError

from llm_api.core.config import Settings
from llm_api.db import migrate
from llm_api.db.engine import Database
from llm_api.db.tables import User
from llm_api.services import audit
from llm_api.services.auth.principal import AuthServices, build_auth

log = structlog.get_logger(__name__)

FIRST_USER_HINT = (
    "No users yet. Create the first admin and an API key:  "
    "llm-api users create you@example.com --admin  &&  llm-api keys create you@example.com"
)


async def start_accounts(settings: Settings) -> tuple[Database, AuthServices]:
    db = Database.from_settings(settings)
    if db.is_sqlite or settings.db_auto_migrate:
        lock = await asyncio.to_thread(_sqlite_migration_lock, db) if db.is_sqlite else None
        try:
            await migrate.upgrade(db.engine)
        finally:
            if lock is not None:
                lock.close()
    if not settings.auth_enabled:
        log.warning(
            "AUTHENTICATION IS DISABLED (LLM_API_AUTH_ENABLED=false): direct loopback callers "
            "(no proxy headers) are served without credentials, on the anonymous tier. Never "
            "expose this server.",
            host=settings.host,
        )
    try:
        current = await migrate.current_revision(db.engine)
        if current != migrate.head_revision():
            log.error(
                "database_not_migrated",
                current=current,
                head=migrate.head_revision(),
                hint="run `llm-api db upgrade`",
            )
        else:
            async with db.sessions() as session:
                users = (await session.execute(select(func.count()).select_from(User))).scalar()
            if not users:
                log.warning("no_users", hint=FIRST_USER_HINT)
            # The effective settings, secrets masked: who started what, with which options.
            await audit.record_now(
                db.sessions, audit.SYSTEM, "server.started", after=audit.settings_snapshot(settings)
            )
    except (SQLAlchemyError, OSError) as exc:
        # Keep serving /health; authenticated routes answer 503 until the database is back.
        log.error("database_unreachable", error=type(exc).__name__)
    return db, build_auth(settings)


def _sqlite_migration_lock(db: Database) -> IO[str] | None:
    """Gunicorn workers start together and each upgrades the embedded SQLite file: an exclusive
    lock file beside the database lets one migrate while the others wait."""
    path = db.engine.url.database
    if not path or path == ":memory:":
        return None
    lock = os.open(f"{path}.migrate.lock", os.O_WRONLY | os.O_CREAT, 0o600)
    handle = os.fdopen(lock, "w")  # held until closed by the caller
    fcntl.flock(handle, fcntl.LOCK_EX)
    return handle
