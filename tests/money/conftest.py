"""Fixtures for the money tests: the built-in models with prices (a models file), an app on
them, and a real HTTP receiver for the budget webhooks."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from aiohttp import web
from sqlalchemy import select

from llm_api.db.tables import UsageRecord
from llm_api.services.llm.registry import builtin_registry
from tests.conftest import Account, create_account, running_app, test_settings

# USD per million tokens: dear enough that a few short requests spend a budget of cents.
CHAT_PRICES = {"input": "100", "cached_input": "50", "output": "400"}
EMBED_PRICES = {"input": "20"}


def nanos_per_token(usd_per_million: str) -> int:
    return int(Decimal(usd_per_million) * 1000)


def priced_models_file(directory: Path) -> Path:
    """The built-in registry (SmolLM2 and MiniLM) with prices."""
    data = builtin_registry().model_dump(mode="json", exclude_defaults=True)
    data["models"][0]["pricing"] = CHAT_PRICES
    data["models"][1]["pricing"] = EMBED_PRICES
    path = directory / "priced-models.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def priced_settings(tmp: Path, **overrides: Any) -> Any:
    values: dict[str, Any] = {
        "models_file": priced_models_file(tmp),
        "llama_threads": 1,
        "usage_flush_interval_seconds": 0.2,
        "budget_webhook_backoff_seconds": 0.05,
    }
    values.update(overrides)
    return test_settings(tmp, **values)


@dataclass
class Priced:
    app: Any
    account: Account
    http: httpx.AsyncClient
    receiver: Receiver | None = None

    @property
    def state(self) -> Any:
        return self.app.state.llm_api

    async def flush(self) -> None:
        assert await self.state.usage.flusher.flush_once(), "flush failed"

    async def records(self, **where: Any) -> list[UsageRecord]:
        async with self.state.db.sessions() as session:
            query = select(UsageRecord).filter_by(**where)
            return list(await session.scalars(query))


WEBHOOK_SECRET = "whsec-test-" + "s" * 24


@contextlib.asynccontextmanager
async def priced_app(tmp: Path, **overrides: Any) -> AsyncIterator[Priced]:
    async with running_app(priced_settings(tmp, **overrides)) as app:
        account = await create_account(app)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as http:
            yield Priced(app, account, http)


@pytest.fixture(scope="package")
async def priced(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Priced]:
    """One app on the priced models for the package (the model loads once), its soft-limit
    webhooks going to a real receiver."""
    async with (
        webhook_receiver() as receiver,
        priced_app(
            tmp_path_factory.mktemp("money"),
            budget_webhook_url=receiver.url,
            budget_webhook_secret=WEBHOOK_SECRET,
        ) as running,
    ):
        running.receiver = receiver
        yield running


@dataclass
class Receiver:
    """A webhook endpoint on a free port: records every post; answers `statuses` in turn
    (then 200)."""

    statuses: list[int] = field(default_factory=list)
    posts: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    port: int = 0
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    async def handle(self, request: web.Request) -> web.Response:
        headers = {k.lower(): v for k, v in request.headers.items()}
        self.posts.append((headers, await request.read()))
        self.arrived.set()
        status = self.statuses.pop(0) if self.statuses else 200
        return web.Response(status=status)

    async def wait_for(self, n: int, timeout: float = 20.0) -> None:
        async with asyncio.timeout(timeout):
            while len(self.posts) < n:
                self.arrived.clear()
                await self.arrived.wait()


@contextlib.asynccontextmanager
async def webhook_receiver(
    port: int = 0, statuses: list[int] | None = None
) -> AsyncIterator[Receiver]:
    receiver = Receiver(statuses=list(statuses or []))
    app = web.Application()
    app.router.add_post("/hook", receiver.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    receiver.port = runner.addresses[0][1]
    try:
        yield receiver
    finally:
        await runner.cleanup()
