"""Liveness and readiness probes, and the model's bounded FIFO queue (503 + Retry-After)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import MODEL
from tests.core_apps import SMOLLM_GGUF, registry_app


async def test_health_and_ready_when_loaded(http: httpx.AsyncClient) -> None:
    r = await http.get("/health")
    assert r.status_code == 200 and r.json() == {"status": "healthy", "llm_service": True}
    r = await http.get("/ready")
    assert r.status_code == 200 and r.json()["status"] == "ready"


async def test_not_ready_until_models_load(tmp_path: Path) -> None:
    """A model that cannot load: alive, never ready, and requests get 503 with Retry-After."""
    models = [{"id": "broken", "backend": "llama_cpp", "gguf": str(tmp_path / "missing.gguf")}]
    async with registry_app(tmp_path, models) as (app, http, sdk):
        await asyncio.sleep(0.2)  # let the background loader fail
        health = await http.get("/health")
        assert health.status_code == 200
        assert health.json() == {"status": "healthy", "llm_service": False}
        ready = await http.get("/ready")
        assert ready.status_code == 503 and "retry-after" in ready.headers
        with pytest.raises(openai.APIStatusError) as info:
            await sdk.chat.completions.create(
                model="broken", messages=[{"role": "user", "content": "hi"}]
            )
        assert info.value.status_code == 503
        assert info.value.response.headers["retry-after"].isdigit()
        assert str(tmp_path) not in info.value.response.text  # no file paths in bodies


@pytest.mark.model
async def test_ready_only_after_warmup(tmp_path: Path) -> None:
    models = [{"id": MODEL, "backend": "llama_cpp", "gguf": SMOLLM_GGUF, "context_length": 512}]
    async with registry_app(tmp_path, models) as (app, http, _):
        statuses = [(await http.get("/ready")).status_code]
        for _ in range(600):
            if statuses[-1] == 200:
                break
            await asyncio.sleep(0.1)
            statuses.append((await http.get("/ready")).status_code)
        assert statuses[0] == 503  # loading the model and its warm-up take a while
        assert statuses[-1] == 200
        assert app.state.llm_api.llm.ready


@pytest.mark.model
async def test_queue_is_bounded_with_503(tmp_path: Path) -> None:
    """concurrency 1 and max_queue 1: one generates, one waits, the third is refused at once."""
    models = [
        {
            "id": MODEL,
            "backend": "llama_cpp",
            "gguf": SMOLLM_GGUF,
            "context_length": 512,
            "concurrency": 1,
            "max_queue": 1,
        }
    ]
    async with registry_app(tmp_path, models, warmup=False) as (app, _, sdk):
        for _ in range(600):
            if app.state.llm_api.llm.ready:
                break
            await asyncio.sleep(0.1)
        gate = app.state.llm_api.llm.gates[MODEL]

        async def call(max_tokens: int) -> str | None:
            reply = await sdk.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": "Tell me a story."}],
                max_tokens=max_tokens,
                temperature=0,
            )
            return reply.choices[0].finish_reason

        first = asyncio.create_task(call(40))
        while gate.running < 1:
            await asyncio.sleep(0.01)
        second = asyncio.create_task(call(2))
        while gate.waiting < 1:
            await asyncio.sleep(0.01)
        with pytest.raises(openai.APIStatusError) as info:
            await call(2)
        assert info.value.status_code == 503
        assert info.value.response.json()["error"]["code"] == "server_is_overloaded"
        assert int(info.value.response.headers["retry-after"]) >= 1
        assert not first.done()  # refused at once, not after waiting
        assert await first == "length" and await second == "length"
        assert gate.running == 0 and gate.waiting == 0
