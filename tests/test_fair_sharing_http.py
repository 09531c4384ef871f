"""Fair sharing through the real server and model: a tenant flooding a model does not keep
another tenant's request behind its whole queue, the admin summary shows each tenant's place,
and the `x-llm-api-priority` header lowers a request (or is a 400 when it names no class)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import openai
import pytest
from prometheus_client import REGISTRY

from tests.conftest import create_account, eventually, running_app
from tests.conftest import test_settings as make_settings
from tests.core_apps import SMOLLM_GGUF, write_registry

pytestmark = pytest.mark.model

MODEL = "fair-small"


@pytest.fixture(scope="module")
async def fair_app(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Any]:
    tmp = tmp_path_factory.mktemp("fair")
    registry = write_registry(
        tmp / "models.yaml",
        [
            {
                "id": MODEL,
                "backend": "llama_cpp",
                "gguf": SMOLLM_GGUF,
                "engine": "batched",
                "slots": 2,
                "context_length": 256,
                "max_queue": 16,
            }
        ],
    )
    settings = make_settings(tmp, models_file=registry, cache_enabled=False, warmup=False)
    async with running_app(settings) as app:
        yield app


def sdk(app: Any, api_key: str) -> openai.AsyncOpenAI:
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver")
    return openai.AsyncOpenAI(
        base_url="http://testserver/v1", api_key=api_key, http_client=http, max_retries=0
    )


async def ask(client: openai.AsyncOpenAI, max_tokens: int, **extra: Any) -> str | None:
    reply = await client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Tell me about the sea."}],
        max_tokens=max_tokens,
        temperature=0,
        **extra,
    )
    return reply.choices[0].finish_reason


async def test_two_tenants_both_progress_and_the_summary_shows_the_queue(fair_app: Any) -> None:
    flood_acct = await create_account(fair_app, tier="paid")
    other_acct = await create_account(fair_app)
    admin = await create_account(fair_app, role="admin")
    flood, other = sdk(fair_app, flood_acct.api_key), sdk(fair_app, other_acct.api_key)
    gate = fair_app.state.llm_api.llm.gates[MODEL]

    flooding = [asyncio.create_task(ask(flood, 24)) for _ in range(6)]  # 2 run, 4 wait
    await eventually(lambda: gate.waiting == 4, timeout=60)

    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=fair_app), base_url="http://testserver"
    ) as http:
        summary = (await http.get("/v1/admin/summary", headers=admin.headers)).json()
    [model] = [m for m in summary["models"] if m["id"] == MODEL]
    [tenant] = model["tenants"]
    assert tenant["tenant"] == f"user:{flood_acct.user_id}" and tenant["tier"] == "paid"
    assert tenant["running"] == 2 and tenant["waiting"] == 4 and tenant["position"] == 0
    assert tenant["expected_wait_seconds"] is not None

    # The other tenant goes before the flood's queue, not behind all of it (FIFO would).
    assert await ask(other, 4) == "length"
    flood_waiting = [t.waiting for t in gate.tenants() if t.tenant.endswith(flood_acct.user_id)]
    assert flood_waiting and flood_waiting[0] >= 1
    assert await asyncio.gather(*flooding) == ["length"] * 6
    assert gate.running == 0 and gate.waiting == 0 and gate.tenants() == []


async def test_priority_header_lowers_a_request_and_rejects_unknown_classes(
    fair_app: Any,
) -> None:
    acct = await create_account(fair_app)
    client = sdk(fair_app, acct.api_key)
    labels = {"model_name": MODEL, "priority": "low", "tier": "free"}
    before = REGISTRY.get_sample_value("llm_api:admission_wait_seconds_count", labels) or 0
    low = {"extra_headers": {"x-llm-api-priority": "low"}}
    assert await ask(client, 2, **low) == "length"
    after = REGISTRY.get_sample_value("llm_api:admission_wait_seconds_count", labels)
    assert after == before + 1

    with pytest.raises(openai.BadRequestError) as info:
        await ask(client, 2, extra_headers={"x-llm-api-priority": "urgent"})
    error = info.value.response.json()["error"]
    assert error["param"] == "x-llm-api-priority"
    assert "interactive, low, batch" in error["message"]


async def test_a_keys_priority_ceiling_holds_whatever_the_header_asks(fair_app: Any) -> None:
    acct = await create_account(fair_app)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=fair_app), base_url="http://testserver"
    ) as http:
        made = await http.post("/v1/keys", json={"priority": "batch"}, headers=acct.headers)
        assert made.status_code == 201, made.text
        assert made.json()["priority"] == "batch"
        refused = await http.post("/v1/keys", json={"priority": "urgent"}, headers=acct.headers)
        assert refused.status_code == 400
    client = sdk(fair_app, made.json()["key"])
    labels = {"model_name": MODEL, "priority": "batch", "tier": "free"}
    before = REGISTRY.get_sample_value("llm_api:admission_wait_seconds_count", labels) or 0
    # Asking for more than the key allows runs at the key's ceiling, not above it.
    up = {"extra_headers": {"x-llm-api-priority": "interactive"}}
    assert await ask(client, 2, **up) == "length"
    assert await ask(client, 2) == "length"
    after = REGISTRY.get_sample_value("llm_api:admission_wait_seconds_count", labels)
    assert after == before + 2
