"""`llm-api db|users|keys|audit`: migrate the database, bootstrap accounts, check the audit log.

llm-api db upgrade
printf '%s' "$PASSWORD" | llm-api users create admin@example.com --admin --password-stdin
llm-api keys create admin@example.com      # the key is the last line of stdout
llm-api keys create admin@example.com --scope inference --scope keys   # default: inference
llm-api keys create dev@example.com --models 'smollm2-*' --expires 30d --allow-ip 10.0.0.0/8
llm-api audit verify                       # exit 1 and the first broken link if tampered with
"""

from __future__ import annotations

import asyncio
import re
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal, TypeVar

import typer

from llm_api.core.config import Settings
from llm_api.core.exceptions import APIError
from llm_api.db import migrate
from llm_api.db.engine import Database
from llm_api.services import audit
from llm_api.services.auth import key_controls
from llm_api.services.auth.scopes import ALL_SCOPES, DEFAULT_KEY_SCOPES

T = TypeVar("T")

db_app = typer.Typer(no_args_is_help=True, help="Database migrations (Alembic).")
users_app = typer.Typer(no_args_is_help=True, help="User accounts.")
keys_app = typer.Typer(no_args_is_help=True, help="API keys.")
audit_app = typer.Typer(no_args_is_help=True, help="The audit log (hash chain).")


def _fail(message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(1)


def _with_db(work: Callable[[Database, Settings], Awaitable[T]], *, migrate_sqlite: bool) -> T:
    settings = Settings()

    async def run() -> T:
        db = Database.from_settings(settings)
        try:
            if migrate_sqlite and db.is_sqlite:
                await migrate.upgrade(db.engine)
            return await work(db, settings)
        finally:
            await db.dispose()

    try:
        return asyncio.run(run())
    except APIError as exc:
        raise _fail(exc.message) from None


def _split(values: list[str] | None) -> list[str] | None:
    """Repeated and comma-separated option values as one list (None when none given)."""
    if not values:
        return None
    return [v.strip() for value in values for v in value.split(",") if v.strip()]


_DURATION = re.compile(r"^(\d{1,7})([smhd])$")
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _expiry(value: str | None) -> str | float | None:
    """`--expires`: a duration from now (30d, 12h, 90m, 45s), else as given (epoch or ISO)."""
    if value is None:
        return None
    match = _DURATION.fullmatch(value.strip())
    if match:
        return time.time() + int(match[1]) * _SECONDS[match[2]]
    return value


def _describe(controls: dict[str, Any]) -> str:
    parts = []
    if controls["models"]:
        parts.append(f" for models {','.join(controls['models'])}")
    if controls["expires_at"]:
        parts.append(f" expiring {controls['expires_at']:%Y-%m-%dT%H:%M:%SZ}")
    if controls["allowed_ips"]:
        parts.append(f" from {','.join(controls['allowed_ips'])}")
    return "".join(parts)


@db_app.command("upgrade")
def db_upgrade(revision: Annotated[str, typer.Argument()] = "head") -> None:
    """Apply migrations up to REVISION (default: the latest)."""

    async def work(db: Database, _: Settings) -> None:
        await migrate.upgrade(db.engine, revision)
        typer.echo(f"database at {await migrate.current_revision(db.engine)}")

    _with_db(work, migrate_sqlite=False)


@db_app.command("downgrade")
def db_downgrade(revision: Annotated[str, typer.Argument()] = "-1") -> None:
    """Revert migrations down to REVISION (default: one step; `base` empties the schema)."""

    async def work(db: Database, _: Settings) -> None:
        await migrate.downgrade(db.engine, revision)
        typer.echo(f"database at {await migrate.current_revision(db.engine) or 'base'}")

    _with_db(work, migrate_sqlite=False)


@users_app.command("create")
def users_create(
    email: str,
    admin: Annotated[bool, typer.Option("--admin", help="Make the user an administrator.")] = False,
    tier: Annotated[str, typer.Option(help="free or paid.")] = "free",
    password_stdin: Annotated[
        bool, typer.Option("--password-stdin", help="Read the password from stdin.")
    ] = False,
) -> None:
    """Create a user. Without --password-stdin the password is prompted for (hidden)."""
    if tier not in ("free", "paid"):
        raise _fail("--tier must be free or paid")
    if password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = typer.prompt("Password", hide_input=True, confirmation_prompt=True)
    role: Literal["user", "admin"] = "admin" if admin else "user"

    async def work(db: Database, settings: Settings) -> str:
        from llm_api.services.auth.principal import build_auth

        auth = build_auth(settings)
        async with db.sessions.begin() as session:
            user = await auth.users.create(
                session,
                email,
                password,
                role=role,
                tier="paid" if tier == "paid" else "free",
            )
            after = audit.changes(user, audit.USER_FIELDS)
            await audit.record(session, audit.CLI, "user.created", user, after=after)
            return f"created {user.role} {user.email} ({user.tier}) id={user.id}"

    typer.echo(_with_db(work, migrate_sqlite=True))


@keys_app.command("create")
def keys_create(
    email: str,
    name: Annotated[str | None, typer.Option(help="A label for the key.")] = None,
    scope: Annotated[
        list[str] | None,
        typer.Option(
            "--scope",
            help=f"What the key may do: {', '.join(ALL_SCOPES)} (repeat or comma-separate; "
            "default: inference only; admin only for administrators).",
        ),
    ] = None,
    models: Annotated[
        list[str] | None,
        typer.Option(
            "--models",
            help="Models the key may use: ids, aliases or wildcards like 'smollm2-*' (repeat "
            "or comma-separate; default: every model the user may use).",
        ),
    ] = None,
    expires: Annotated[
        str | None,
        typer.Option(
            "--expires",
            help="When the key stops working: epoch seconds, an ISO 8601 time, or a duration "
            "from now such as 90m, 12h, 30d.",
        ),
    ] = None,
    allow_ip: Annotated[
        list[str] | None,
        typer.Option("--allow-ip", help="Client addresses (CIDR) the key may be used from."),
    ] = None,
) -> None:
    """Create an API key for a user and print it (last line of stdout; shown only once)."""
    wanted = {s.strip() for value in scope or [] for s in value.split(",") if s.strip()}
    unknown = sorted(wanted - set(ALL_SCOPES))
    if unknown:
        raise _fail(f"unknown scope {', '.join(unknown)}; choose from {', '.join(ALL_SCOPES)}")
    requested = wanted or DEFAULT_KEY_SCOPES
    try:
        controls: dict[str, Any] = {
            "models": key_controls.parse_models(_split(models)),
            "expires_at": key_controls.parse_expiry(_expiry(expires)),
            "allowed_ips": key_controls.parse_networks(_split(allow_ip)),
        }
    except APIError as exc:
        raise _fail(exc.message) from None

    async def work(db: Database, settings: Settings) -> str:
        from llm_api.services.auth import api_keys
        from llm_api.services.auth.principal import build_auth

        auth = build_auth(settings)
        async with db.sessions.begin() as session:
            user = await auth.users.by_email(session, email)
            if user is None or not user.is_active:
                raise _fail(f"no active user {email!r}")
            if "admin" in requested and user.role != "admin":
                raise _fail(f"the admin scope is only for administrators; {email} is not one")
            key, raw = await api_keys.create_key(session, user.id, name, requested, **controls)
            after = {"name": key.name, "prefix": key.prefix, "scopes": key.scopes, "owner": user.id}
            await audit.record(session, audit.CLI, "key.created", key, after=after | controls)
            typer.echo(
                f"created key {key.id} for {user.email} with scopes {key.scopes.replace(' ', ',')}"
                f"{_describe(controls)}; store it now, it is not shown again:"
            )
            return raw

    typer.echo(_with_db(work, migrate_sqlite=True))


@audit_app.command("verify")
def audit_verify() -> None:
    """Recompute the audit log's hash chain end to end; exit 1 at the first broken link."""

    async def work(db: Database, _: Settings) -> audit.Verification:
        async with db.sessions() as session:
            return await audit.verify(session)

    result = _with_db(work, migrate_sqlite=False)
    if not result.ok:
        typer.echo(
            f"audit chain BROKEN at row {result.broken_seq}: {result.reason} "
            f"({result.checked} rows verified before it)",
            err=True,
        )
        raise typer.Exit(1)
    typer.echo(
        f"audit chain OK: {result.checked} rows verified (rows {result.anchor_seq + 1}.."
        f"{result.head_seq}; {result.anchor_seq} purged by retention before them)"
    )


@audit_app.command("purge")
def audit_purge(
    days: Annotated[
        int | None, typer.Option(help="Delete events older than this (default: the setting).")
    ] = None,
) -> None:
    """Apply the retention now (the server also does, hourly); the chain stays verifiable."""

    async def work(db: Database, settings: Settings) -> int:
        keep = settings.audit_retention_days if days is None else days
        if keep <= 0:
            raise _fail("retention is off (0 days): nothing to purge")
        async with db.sessions.begin() as session:
            return await audit.purge(session, datetime.now(UTC) - timedelta(days=keep))

    typer.echo(f"purged {_with_db(work, migrate_sqlite=False)} audit events")
