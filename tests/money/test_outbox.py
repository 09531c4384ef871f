"""The webhook outbox survives a restart: an alert that could not be delivered (the receiver
was down) stays in the database, and the next app instance sends it, with retries and backoff
in between."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import orjson
import yaml
from asgi_lifespan import LifespanManager
from sqlalchemy import select

from llm_api.db.tables import BudgetAlert
from llm_api.main import create_app
from llm_api.services.money.budgets import BudgetRule
from llm_api.services.money.webhooks import verify
from tests.conftest import free_port
from tests.conftest import test_settings as settings_for
from tests.money.conftest import WEBHOOK_SECRET, webhook_receiver


def settings(tmp: Path, port: int) -> Any:
    # No local model to load: an upstream that is never called, so the app starts at once.
    models = tmp / "models.yaml"
    models.write_text(
        yaml.safe_dump(
            {"models": [{"id": "up", "backend": "openai", "base_url": "http://127.0.0.1:9/v1"}]}
        )
    )
    return settings_for(
        tmp,
        models_file=models,
        budget_webhook_url=f"http://127.0.0.1:{port}/hook",
        budget_webhook_secret=WEBHOOK_SECRET,
        budget_webhook_backoff_seconds=0.05,
    )


async def alerts(app: Any) -> list[BudgetAlert]:
    async with app.state.llm_api.db.sessions() as session:
        return list(await session.scalars(select(BudgetAlert)))


async def test_a_pending_alert_is_sent_by_the_next_instance(tmp_path: Path) -> None:
    port = free_port()
    rule = BudgetRule("b-restart", "team", "t1", "month", 10**9, 10**8)
    first = create_app(settings(tmp_path, port))
    async with LifespanManager(first):
        outbox = first.state.llm_api.money.alerts
        await outbox.enqueue(rule, "2026-12-01", 2 * 10**8)
        await outbox.enqueue(rule, "2026-12-01", 3 * 10**8)  # the same crossing: no new row
        async with asyncio.timeout(20):  # the receiver is down: tried, failed, kept
            while not (rows := await alerts(first)) or rows[0].attempts < 2:
                await asyncio.sleep(0.05)
        (row,) = rows
        assert row.sent_at is None and row.failed_at is None
        assert row.last_error is not None
    async with webhook_receiver(port=port) as receiver:
        second = create_app(settings(tmp_path, port))  # same data dir: same database
        async with LifespanManager(second):
            await receiver.wait_for(1)
            async with asyncio.timeout(20):
                while (await alerts(second))[0].sent_at is None:
                    await asyncio.sleep(0.05)
            await second.state.llm_api.money.alerts.deliver_due()
        (headers, body), *more = receiver.posts
    assert not more
    assert verify(WEBHOOK_SECRET, headers["x-llm-api-signature"], body)
    event = orjson.loads(body)
    assert event["budget"]["id"] == "b-restart" and event["spent_usd"] == "0.2"
    assert headers["x-llm-api-event-id"] == row.id
