"""GET /v1/users/me/limits: the account page's rate-limit standing, read without spending, on
the memory store and on the real Redis."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from llm_api.core.rate_limits import DEFAULT_TIERS
from tests.conftest import (
    MODEL,
    Account,
    create_account,
    require_service,
    running_app,
)
from tests.conftest import test_settings as make_settings

pytestmark = pytest.mark.model
FREE = DEFAULT_TIERS["free"]


@pytest.fixture(scope="module", params=["memory", "redis"])
async def limited(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Any]:
    """An app that enforces the default limits, with the limiter on one store or the other."""
    extra: dict[str, Any] = {"rate_limit_enabled": True, "warmup": False}
    if request.param == "redis":
        require_service("Redis", "127.0.0.1", 6379)
        extra["redis_url"] = "redis://127.0.0.1:6379/0"
        extra["rate_limit_key_prefix"] = f"llm-api-test:{uuid.uuid4().hex[:8]}"
    tmp: Path = tmp_path_factory.mktemp(f"limits-{request.param}")
    async with running_app(make_settings(tmp, **extra)) as application:
        yield application


def by_name(body: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {row["name"]: row for row in body["limits"]}


async def test_standing_counts_use_and_spends_nothing(limited: Any) -> None:
    account = await create_account(limited)
    transport = httpx.ASGITransport(app=limited)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
        fresh = await http.get("/v1/users/me/limits", headers=account.headers)
        assert fresh.status_code == 200, fresh.text
        body = fresh.json()
        assert body["tier"] == "free" and body["enabled"] is True
        rows = by_name(body)
        assert set(rows) == {"rpm", "tpm", "tpd", "concurrency"}
        assert all(r["scope"] == "user" for r in rows.values())
        assert rows["rpm"]["limit"] == rows["rpm"]["remaining"] == FREE.requests_per_minute
        assert rows["tpm"]["remaining"] == FREE.tokens_per_minute
        assert rows["rpm"]["reset_seconds"] is None  # nothing used: nothing to wait for

        completion = await http.post(
            "/v1/chat/completions",
            headers=account.headers,
            json={
                "model": MODEL,
                "messages": [{"role": "user", "content": "Hi"}],
                "max_tokens": 8,
            },
        )
        assert completion.status_code == 200, completion.text
        total = completion.json()["usage"]["total_tokens"]

        for _ in range(3):  # asking again and again spends nothing
            rows = by_name((await http.get("/v1/users/me/limits", headers=account.headers)).json())
            assert rows["rpm"]["remaining"] == FREE.requests_per_minute - 1
            # The reservation (prompt + max_tokens) was settled to the real usage.
            assert rows["tpm"]["remaining"] == FREE.tokens_per_minute - total
            assert rows["tpd"]["remaining"] == FREE.tokens_per_day - total
            assert 0 < rows["rpm"]["reset_seconds"] <= 60
        if limited.state.llm_api.settings.redis_url is None:
            assert rows["concurrency"]["remaining"] == FREE.concurrent_requests
        else:
            assert rows["concurrency"]["remaining"] is None  # no read-only lease count


async def test_standing_needs_an_account(
    app: Any, http: httpx.AsyncClient, account: Account
) -> None:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as anonymous:
        assert (await anonymous.get("/v1/users/me/limits")).status_code == 401
    # The shared app runs without limits: listed, but nothing is counted.
    body = (await http.get("/v1/users/me/limits", headers=account.headers)).json()
    assert body["enabled"] is False
    assert {r["name"] for r in body["limits"]} == {"rpm", "tpm", "tpd", "concurrency"}
    assert all(r["remaining"] is None for r in body["limits"])
