"""Fixtures of the accounts tests: one app per database (SQLite always; the real PostgreSQL
when reachable, required in CI), each with a free and a paid model and four accounts."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from llm_api.services.llm.registry import builtin_registry
from tests.conftest import (
    Account,
    create_account,
    postgres_database,
    require_service,
    running_app,
    test_settings,
)

PAID_MODEL = "smollm2-paid"
FREE_ALIAS = "tiny-chat"  # another name of the free model (key allow-lists match it)
CANARY_PASSWORD = "canary-Pa55word-7f3a9c1e"  # must never appear in logs, bodies or the DB


def write_registry(path: Path) -> Path:
    """The built-in SmolLM2 (free) plus the same GGUF registered as a paid-tier model."""
    free = builtin_registry().models[0].model_dump(mode="json", exclude_none=True)
    free["context_length"] = 2048
    paid = {**free, "id": PAID_MODEL, "tier": "paid"}
    free["aliases"] = [FREE_ALIAS]
    path.write_text(yaml.safe_dump({"models": [free, paid]}))
    return path


@dataclass
class AuthEnv:
    """One running app, an unauthenticated client, and its accounts."""

    kind: str
    app: Any
    http: httpx.AsyncClient  # sends no credentials unless a test passes headers
    user: Account
    other: Account
    admin: Account
    paid: Account
    log_dir: Path


@pytest.fixture(scope="session", params=["sqlite", "postgres"])
async def env(request: pytest.FixtureRequest, session_tmp: Path) -> AsyncIterator[AuthEnv]:
    kind: str = request.param
    tmp = session_tmp / f"auth-{kind}"
    tmp.mkdir(parents=True, exist_ok=True)
    registry = write_registry(tmp / "models.yaml")
    async with _database(kind) as url:
        settings = test_settings(
            tmp, models_file=registry, warmup=False, database_url=url, db_auto_migrate=True
        )
        async with running_app(settings) as app:
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
                yield AuthEnv(
                    kind=kind,
                    app=app,
                    http=c,
                    user=await create_account(app, password=CANARY_PASSWORD),
                    other=await create_account(app),
                    admin=await create_account(app, role="admin"),
                    paid=await create_account(app, tier="paid"),
                    log_dir=tmp,
                )


class _NoDatabase:
    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, *exc: object) -> None:
        return None


def _database(kind: str) -> Any:
    if kind == "sqlite":
        return _NoDatabase()  # database_url=None: the SQLite file in the data dir
    require_service("PostgreSQL", "127.0.0.1", 5432)
    return postgres_database()
