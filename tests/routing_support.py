"""Helpers for the routing tests: stub upstreams on loopback and an app whose registry routes to
them, driven by the official openai SDK, with the service's usage records collected."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import yaml
from asgi_lifespan import LifespanManager
from fastapi import FastAPI

from bench.stub_upstream import StubConfig, StubUpstream
from llm_api.main import create_app
from llm_api.services.llm.types import CompletionRecord
from tests.conftest import test_settings
from tests.pipeline_support import listen


@asynccontextmanager
async def stubs(*configs: StubConfig) -> AsyncIterator[list[StubUpstream]]:
    started = [await StubUpstream(c).start() for c in configs]
    try:
        yield started
    finally:
        for s in started:
            await s.stop()


def deployment(stub: StubUpstream | str, **extra: Any) -> dict[str, Any]:
    url = stub if isinstance(stub, str) else stub.base_url
    return {"base_url": url, **extra}


def routed(model_id: str, deployments: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    extra.setdefault("concurrency", 64)  # the default of 1 suits a local model, not a gateway
    return {"id": model_id, "backend": "router", "deployments": deployments, **extra}


@dataclass
class Routed:
    app: FastAPI
    client: openai.AsyncOpenAI
    http: httpx.AsyncClient
    records: list[CompletionRecord] = field(default_factory=list)


@asynccontextmanager
async def routed_app(
    tmp_path: Path, models: list[dict[str, Any]], **settings: Any
) -> AsyncIterator[Routed]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump({"models": models}))
    values: dict[str, Any] = {"models_file": path, "warmup": False, "auth_enabled": False}
    app = create_app(test_settings(tmp_path, **(values | settings)))
    async with LifespanManager(app, startup_timeout=60, shutdown_timeout=30):
        llm = app.state.llm_api.llm
        for _ in range(300):
            if llm.ready:
                break
            await asyncio.sleep(0.05)
        assert llm.ready
        records = listen(app)
        transport = httpx.ASGITransport(app=app)
        # Auth is off on loopback (these tests are about routing): the SDK always sends a
        # bearer token, which an auth-disabled server would still check, so it is dropped.
        async with httpx.AsyncClient(
            transport=transport, base_url="http://127.0.0.1", event_hooks={"request": [_no_auth]}
        ) as http:
            client = openai.AsyncOpenAI(
                base_url="http://127.0.0.1/v1",
                api_key="unused",
                http_client=http,  # type: ignore[arg-type]
                max_retries=0,
            )
            yield Routed(app, client, http, records)


async def _no_auth(request: httpx.Request) -> None:
    request.headers.pop("Authorization", None)


@asynccontextmanager
async def client_for(app: FastAPI, api_key: str) -> AsyncIterator[openai.AsyncOpenAI]:
    """The openai SDK as one account (for a `routed_app` started with auth on)."""
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as http:
        yield openai.AsyncOpenAI(
            base_url="http://127.0.0.1/v1", api_key=api_key, http_client=http, max_retries=0
        )


async def chat(r: Routed, model: str, **kw: Any) -> Any:
    return await r.client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=8, **kw
    )


async def stream_text(r: Routed, model: str, **kw: Any) -> tuple[str, list[Any]]:
    """Stream a chat completion; the text and the raw chunks."""
    stream = await r.client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "hi"}], stream=True, **kw
    )
    chunks = [c async for c in stream]
    return "".join((c.choices[0].delta.content or "") for c in chunks if c.choices), chunks


@asynccontextmanager
async def unanswered_port() -> AsyncIterator[int]:
    """A loopback port whose accept queue is full: new connections never complete, which is
    how a connect timeout looks (the kernel drops SYNs while the listen backlog is full)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(0)
    port = srv.getsockname()[1]
    fillers = []
    for _ in range(3):
        c = socket.socket()
        c.setblocking(False)
        with suppress(BlockingIOError):
            c.connect(("127.0.0.1", port))
        fillers.append(c)
    await asyncio.sleep(0.05)
    try:
        yield port
    finally:
        for c in fillers:
            c.close()
        srv.close()


def closed_port() -> int:
    """A loopback port nobody listens on (connections are refused at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
