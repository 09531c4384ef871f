"""GET /v1/admin/summary: the admin dashboard's live numbers, from the gates and the metrics."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path

import httpx
import pytest

from llm_api.services.dashboard import SummaryService
from tests.conftest import MODEL, Account, LiveServer
from tests.web_support import cli_create_user, login

pytestmark = pytest.mark.model


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_summary_refused_without_admin(
    http: httpx.AsyncClient, account: Account, admin_account: Account
) -> None:
    response = await http.get("/v1/admin/summary", headers=account.headers)
    assert response.status_code == 403
    assert response.json()["error"]["type"] == "permission_error"
    response = await http.get("/v1/admin/summary", headers=admin_account.headers)
    assert response.status_code == 200
    assert response.json()["models"][0]["id"] == MODEL


async def test_summary_counts_running_requests_and_tokens(
    live_server: LiveServer, session_tmp: Path
) -> None:
    """Against a real server (the in-process transport buffers whole responses)."""
    suffix = uuid.uuid4().hex[:8]
    admin_email, user_email = f"live-admin-{suffix}@example.com", f"live-{suffix}@example.com"
    cli_create_user(session_tmp / "live", admin_email, admin=True)
    cli_create_user(session_tmp / "live", user_email)
    async with httpx.AsyncClient(base_url=live_server.base_url, timeout=60) as http:
        assert (await http.get("/v1/admin/summary")).status_code == 401
        admin = bearer((await login(http, admin_email))["access_token"])
        user = bearer((await login(http, user_email))["access_token"])
        before = (await http.get("/v1/admin/summary", headers=admin)).json()
        assert before["requests_running"] == 0
        # The built-in registry: the chat model and the embedding model.
        assert [m["id"] for m in before["models"]] == [MODEL, "all-minilm-l6-v2"]
        body = {
            "model": MODEL,
            "messages": [{"role": "user", "content": "Count from one to fifty in words."}],
            "max_tokens": 48,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        seen_running, usage = 0, None
        async with http.stream("POST", "/v1/chat/completions", json=body, headers=user) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if not seen_running:
                    mid = (await http.get("/v1/admin/summary", headers=admin)).json()
                    seen_running = mid["requests_running"]
                if line.startswith("data: {") and '"usage":{' in line:
                    usage = json.loads(line[6:])["usage"]
        assert seen_running == 1, "the summary did not show the request generating"
        assert usage is not None
        for _ in range(50):  # the usage frame precedes the end of the request by a moment
            after = (await http.get("/v1/admin/summary", headers=admin)).json()
            if after["requests_running"] == 0:
                break
            await asyncio.sleep(0.02)
        assert after["requests_running"] == 0
        grown = after["completion_tokens_total"] - before["completion_tokens_total"]
        assert grown == usage["completion_tokens"]
        assert after["tokens_per_second"] > 0
        assert after["window_seconds"] > 0


def test_rate_is_the_counter_slope_over_the_window() -> None:
    from prometheus_client import CollectorRegistry, Counter

    registry = CollectorRegistry()
    counter = Counter("llm_api:generation_tokens", "t", ("model_name",), registry=registry)
    now = [100.0]

    class _NoModels:
        gates: dict[str, object] = {}
        started_at = 0

    service = SummaryService(
        _NoModels(),  # type: ignore[arg-type]
        window_seconds=10,
        clock=lambda: now[0],
        registry=registry,
    )
    assert service.summary().tokens_per_second == 0  # one sample: no slope yet
    for _ in range(10):  # a poll every 2 s at a steady 25 tokens/s
        now[0] += 2
        counter.labels("a").inc(50)
        steady = service.summary()
    assert steady.tokens_per_second == 25
    assert steady.window_seconds == 10
    now[0] += 2
    counter.labels("b").inc(200)  # a second model's burst: 50 + 150 more than steady
    burst = service.summary()
    assert burst.tokens_per_second == (700 - 300) / 10  # since the sample at t=112 (300)
    assert burst.completion_tokens_total == 700
