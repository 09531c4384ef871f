"""A lone UTF-16 surrogate (`"\\ud800"`) is valid JSON but not valid text: no UTF-8 encoder takes
it, so it failed in the tokenizer or the upstream client as a 500 with tracebacks (issue 22,
item 7). Every text field is now checked where the body is validated: a 400 naming the field,
for local and upstream models alike, and the upstream never sees the request."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from aiohttp import web

from tests.conftest import free_port
from tests.core_apps import SMOLLM_GGUF, registry_app

pytestmark = pytest.mark.model

LOCAL, UPSTREAM = "local", "upstream"
LONE = "\ud800"


@pytest.fixture(scope="module")
async def upstream_hits() -> AsyncIterator[list[bytes]]:
    """An OpenAI-compatible upstream that records what reaches it."""
    hits: list[bytes] = []

    async def chat(request: web.Request) -> web.StreamResponse:
        hits.append(await request.read())
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(
            b'data: {"choices":[{"index":0,"delta":{"content":"ok"},"finish_reason":null}]}\n\n'
            b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n'
            b'data: {"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":1,'
            b'"total_tokens":2}}\n\n'
            b"data: [DONE]\n\n"
        )
        return resp

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_post("/v1/completions", chat)
    runner = web.AppRunner(app, shutdown_timeout=0.5)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    hits.append(str(port).encode())  # hits[0]: where it listens
    yield hits
    await runner.cleanup()


@pytest.fixture(scope="module")
async def http(
    upstream_hits: list[bytes], tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[httpx.AsyncClient]:
    port = upstream_hits[0].decode()
    models: list[dict[str, Any]] = [
        {"id": LOCAL, "backend": "llama_cpp", "gguf": SMOLLM_GGUF, "context_length": 512},
        {"id": UPSTREAM, "backend": "openai", "base_url": f"http://127.0.0.1:{port}/v1"},
    ]
    async with registry_app(tmp_path_factory.mktemp("surrogates"), models) as (app, client, _):
        for _ in range(600):
            if app.state.llm_api.llm.ready:
                break
            await asyncio.sleep(0.1)
        yield client


def chat(model: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "Hi"}], **extra}


async def post(http: httpx.AsyncClient, path: str, body: dict[str, Any]) -> httpx.Response:
    """JSON as clients send it: json.dumps writes a lone surrogate as the escape `\\ud800`
    (httpx's own encoder writes UTF-8, which cannot hold one)."""
    return await http.post(
        path, content=json.dumps(body), headers={"Content-Type": "application/json"}
    )


CHAT_CASES: list[tuple[dict[str, Any], str]] = [
    ({"messages": [{"role": "user", "content": f"Hi {LONE}"}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": "\udfff"}]}, "messages[0].content"),
    (
        {"messages": [{"role": "user", "content": [{"type": "text", "text": LONE}]}]},
        "messages[0].content[0].text",
    ),
    (
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": LONE},
            ]
        },
        "messages[1].content",
    ),
    ({"messages": [{"role": "user", "content": "Hi", "name": LONE}]}, "messages[0].name"),
    ({"stop": LONE}, "stop"),
    ({"stop": ["x", LONE]}, "stop[1]"),
    ({"user": LONE}, "user"),
    ({"metadata": {"note": [LONE]}}, "metadata.note[0]"),
    ({f"extra{LONE}": 1}, "extra\\ud800"),
    (
        {
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"type": "string", "pattern": LONE}},
            }
        },
        "response_format.json_schema.schema.pattern",
    ),
]


@pytest.mark.parametrize("model", [LOCAL, UPSTREAM])
@pytest.mark.parametrize("stream", [False, True])
async def test_lone_surrogates_in_chat_are_400_naming_the_field(
    http: httpx.AsyncClient, upstream_hits: list[bytes], model: str, stream: bool
) -> None:
    before = len(upstream_hits)
    for change, param in CHAT_CASES:
        body = {**chat(model, stream=stream), **change}
        resp = await post(http, "/v1/chat/completions", body)
        assert resp.status_code == 400, (change, resp.text)
        error = resp.json()["error"]
        assert error["param"] == param, change
        assert error["type"] == "invalid_request_error"
        assert "surrogate" in error["message"]
    # A model name is text too (it is echoed in errors and sent upstream).
    resp = await post(http, "/v1/chat/completions", chat(f"{model}{LONE}"))
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "model"
    assert len(upstream_hits) == before  # nothing reached the upstream


@pytest.mark.parametrize("model", [LOCAL, UPSTREAM])
async def test_lone_surrogates_in_prompts_are_400(
    http: httpx.AsyncClient, upstream_hits: list[bytes], model: str
) -> None:
    before = len(upstream_hits)
    for prompt, param in [(f"Once {LONE}", "prompt"), (["ok", LONE], "prompt[1]")]:
        resp = await post(http, "/v1/completions", {"model": model, "prompt": prompt})
        assert resp.status_code == 400, resp.text
        assert resp.json()["error"]["param"] == param
    assert len(upstream_hits) == before


@pytest.mark.parametrize("model", [LOCAL, UPSTREAM])
async def test_valid_non_ascii_text_is_served(
    http: httpx.AsyncClient, upstream_hits: list[bytes], model: str
) -> None:
    """Surrogate pairs (as JSON escapes them: `\\ud83d\\ude00`) and other non-ASCII are text."""
    before = len(upstream_hits)
    body = chat(model, max_tokens=2)
    body["messages"][0]["content"] = "Smile \U0001f600, café, 東京"
    assert "\\ud83d\\ude00" in json.dumps(body)
    resp = await post(http, "/v1/chat/completions", body)
    assert resp.status_code == 200, resp.text
    if model == UPSTREAM:
        assert len(upstream_hits) == before + 1
        assert (
            json.loads(upstream_hits[-1])["messages"][0]["content"]
            == "Smile \U0001f600, café, 東京"
        )
