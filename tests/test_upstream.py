"""The `openai` backend against real servers on loopback: llama-cpp-python's own OpenAI-compatible
server on the same GGUF, and tiny aiohttp servers that hang, stall mid-stream or fail."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import openai
import orjson
import pytest
from aiohttp import web

from tests.conftest import free_port
from tests.core_apps import registry_app

pytestmark = pytest.mark.model

KEY_ENV = "LLM_API_TEST_UPSTREAM_KEY"
KEY = "sk-upstream-secret-7f3a9c"
HI = [{"role": "user", "content": "Name three colours."}]


class Stub:
    """Misbehaving upstreams. Counts the requests each path received."""

    def __init__(self) -> None:
        self.hits: dict[str, int] = {}
        self.auth: list[str | None] = []
        self.port = 0

    async def hang(self, request: web.Request) -> web.StreamResponse:
        self._hit(request)
        await asyncio.sleep(3600)  # accepts, never answers
        raise AssertionError("unreachable")

    async def stall(self, request: web.Request) -> web.StreamResponse:
        self._hit(request)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        chunk = (
            b'data: {"id":"x","object":"chat.completion.chunk","created":0,"model":"m",'
            b'"choices":[{"index":0,"delta":{"content":"Hello"},"finish_reason":null}]}\n\n'
        )
        await resp.write(chunk)
        await asyncio.sleep(3600)  # then nothing, with the connection open
        return resp

    async def fail(self, request: web.Request) -> web.Response:
        self._hit(request)
        return web.json_response(
            {"error": {"message": f"boom at http://127.0.0.1:{self.port}/internal with {KEY}"}},
            status=500,
        )

    async def deny(self, request: web.Request) -> web.Response:
        self._hit(request)
        return web.json_response({"error": {"message": "bad key"}}, status=401)

    async def junk(self, request: web.Request) -> web.StreamResponse:
        """A word, then the line the request's last message names, then a proper end."""
        self._hit(request)
        line = (await request.json())["messages"][-1]["content"].encode()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(
            b'data: {"choices":[{"index":0,"delta":{"content":"Hello"},"finish_reason":null}]}\n\n'
            + b"data: " + line + b"\n\n"
            + b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n'
            + b"data: [DONE]\n\n"
        )  # fmt: skip
        return resp

    def _hit(self, request: web.Request) -> None:
        name = request.path.split("/")[1]
        self.hits[name] = self.hits.get(name, 0) + 1
        self.auth.append(request.headers.get("Authorization"))


@pytest.fixture(scope="module")
async def stub() -> AsyncIterator[Stub]:
    s = Stub()
    app = web.Application()
    for name in ("hang", "stall", "fail", "deny", "junk"):
        app.router.add_post(f"/{name}/v1/chat/completions", getattr(s, name))
        app.router.add_post(f"/{name}/v1/completions", getattr(s, name))
    runner = web.AppRunner(app, shutdown_timeout=0.5)
    await runner.setup()
    s.port = free_port()
    await web.TCPSite(runner, "127.0.0.1", s.port).start()
    yield s
    await runner.cleanup()


@pytest.fixture(scope="module")
async def upstream_api(
    llama_server: str, stub: Stub, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[tuple[httpx.AsyncClient, openai.AsyncOpenAI]]:
    os.environ[KEY_ENV] = KEY
    stub_url = f"http://127.0.0.1:{stub.port}"
    fast: dict[str, Any] = {"first_token_timeout": 1.5, "idle_timeout": 1.0, "connect_timeout": 1}
    models: list[dict[str, Any]] = [
        {
            "id": "upstream-llama",
            "backend": "openai",
            "base_url": llama_server,
            "upstream_model": "smollm2",
            "api_key_env": KEY_ENV,
            "context_length": 2048,
        },
        {"id": "hang", "backend": "openai", "base_url": f"{stub_url}/hang/v1", **fast},
        {"id": "stall", "backend": "openai", "base_url": f"{stub_url}/stall/v1", **fast},
        {
            "id": "fail",
            "backend": "openai",
            "base_url": f"{stub_url}/fail/v1",
            "api_key_env": KEY_ENV,
        },
        {
            "id": "deny",
            "backend": "openai",
            "base_url": f"{stub_url}/deny/v1",
            "api_key_env": KEY_ENV,
        },
        {"id": "junk", "backend": "openai", "base_url": f"{stub_url}/junk/v1", **fast},
        {
            "id": "closed",
            "backend": "openai",
            "base_url": f"http://127.0.0.1:{free_port()}/v1",
            **fast,
        },
    ]
    async with registry_app(tmp_path_factory.mktemp("upstream"), models) as (app, http, sdk):
        for _ in range(100):
            if app.state.llm_api.llm.ready:
                break
            await asyncio.sleep(0.05)
        yield http, sdk
    os.environ.pop(KEY_ENV, None)


def assert_clean(body: str, stub: Stub) -> None:
    """No upstream URL, port or key in anything we send back."""
    assert KEY not in body
    assert f":{stub.port}" not in body and "127.0.0.1" not in body and "/internal" not in body


async def test_upstream_non_streaming(upstream_api: Any) -> None:
    _, sdk = upstream_api
    reply = await sdk.chat.completions.create(
        model="upstream-llama", messages=HI, max_tokens=12, temperature=0
    )
    assert reply.model == "upstream-llama"
    assert reply.choices[0].message.content
    assert reply.choices[0].finish_reason in ("stop", "length")
    # llama_cpp.server reports no usage when streaming: the prompt is estimated, never free.
    assert reply.usage is not None and reply.usage.prompt_tokens > 0
    assert 0 < reply.usage.completion_tokens <= 12


async def test_upstream_streaming(upstream_api: Any) -> None:
    _, sdk = upstream_api
    stream = await sdk.chat.completions.create(
        model="upstream-llama",
        messages=HI,
        max_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [c async for c in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 8


async def test_upstream_legacy_completion(upstream_api: Any) -> None:
    _, sdk = upstream_api
    reply = await sdk.completions.create(
        model="upstream-llama", prompt="One, two, three,", max_tokens=4, temperature=0
    )
    assert reply.choices[0].text and reply.choices[0].finish_reason == "length"


async def test_upstream_hang_is_504(upstream_api: Any, stub: Stub) -> None:
    _, sdk = upstream_api
    for stream in (False, True):
        start = time.perf_counter()
        with pytest.raises(openai.APIStatusError) as info:
            await sdk.chat.completions.create(model="hang", messages=HI, stream=stream)
        assert info.value.status_code == 504
        assert info.value.response.json()["error"]["code"] == "upstream_timeout"
        assert time.perf_counter() - start < 10  # first_token_timeout is 1.5 s
        assert_clean(info.value.response.text, stub)


async def test_upstream_stall_mid_stream(upstream_api: Any, stub: Stub) -> None:
    _, sdk = upstream_api
    # Streaming: the first chunk went out, so the timeout arrives as an SSE error event.
    stream = await sdk.chat.completions.create(model="stall", messages=HI, stream=True)
    got: list[str] = []
    with pytest.raises(openai.APIError) as info:
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                got.append(chunk.choices[0].delta.content)
    assert got == ["Hello"]
    assert "stopped sending tokens" in str(info.value.message)
    # Non-streaming: nothing was sent yet, so it is a plain 504.
    with pytest.raises(openai.APIStatusError) as status:
        await sdk.chat.completions.create(model="stall", messages=HI)
    assert status.value.status_code == 504


async def test_upstream_stall_raw_sse_frames(upstream_api: Any) -> None:
    http, _ = upstream_api
    body = {"model": "stall", "messages": HI, "stream": True}
    async with http.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        frames = [line async for line in r.aiter_lines() if line.startswith("data: ")]
    assert frames[-1] == "data: [DONE]"
    assert '"upstream_timeout"' in frames[-2]


@pytest.mark.parametrize(
    ("line", "ok"),
    [
        # Not a JSON object: the stream cannot be trusted further.
        ("5", False),
        ('"text"', False),
        ("[1, 2]", False),
        ("{not json", False),
        # Decoded with the read's other payloads as one JSON array, these must still fail.
        ('{"choices": []}, {"choices": []}', False),
        ("1], [2", False),
        # An object whose fields have the wrong types: nothing usable in it, skipped.
        ('{"choices": 3}', True),
        ('{"choices": [7, null]}', True),
        ('{"choices": [{"delta": "x", "text": 5}]}', True),
        ('{"usage": {"prompt_tokens": "many", "completion_tokens": -1}, "choices": []}', True),
    ],
)
async def test_a_hostile_upstream_chunk_is_never_a_500(
    upstream_api: Any, line: str, ok: bool
) -> None:
    """Whatever an upstream sends mid-stream, the client gets what came before it and either a
    normal end or an `upstream_error` frame; never our own 500 (`internal_error`)."""
    http, _ = upstream_api
    body = {"model": "junk", "messages": [{"role": "user", "content": line}], "stream": True}
    async with http.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        frames = [line async for line in r.aiter_lines() if line.startswith("data: ")]
    assert frames[-1] == "data: [DONE]"
    assert "internal_error" not in "".join(frames)
    events = [orjson.loads(f[6:]) for f in frames[:-1]]
    text = "".join(
        e["choices"][0]["delta"].get("content") or "" for e in events if e.get("choices")
    )
    assert text == "Hello"
    if ok:
        assert events[-1]["choices"][0]["finish_reason"] == "stop"
    else:
        assert events[-1]["error"]["code"] == "upstream_error"
        assert "malformed" in events[-1]["error"]["message"]


async def test_upstream_500_is_502_without_leaks(upstream_api: Any, stub: Stub) -> None:
    _, sdk = upstream_api
    for stream in (False, True):
        with pytest.raises(openai.InternalServerError) as info:
            await sdk.chat.completions.create(model="fail", messages=HI, stream=stream)
        assert info.value.status_code == 502
        err = info.value.response.json()["error"]
        assert err["code"] == "upstream_error" and err["type"] == "server_error"
        assert_clean(info.value.response.text, stub)
    # The key did reach the upstream, as a bearer token.
    assert f"Bearer {KEY}" in stub.auth


async def test_upstream_rejecting_our_key_is_502(upstream_api: Any, stub: Stub) -> None:
    _, sdk = upstream_api
    with pytest.raises(openai.InternalServerError) as info:
        await sdk.chat.completions.create(model="deny", messages=HI)
    assert info.value.status_code == 502  # not the client's 401: their key was fine
    assert_clean(info.value.response.text, stub)


async def test_upstream_unreachable_is_502(upstream_api: Any, stub: Stub) -> None:
    _, sdk = upstream_api
    with pytest.raises(openai.InternalServerError) as info:
        await sdk.chat.completions.create(model="closed", messages=HI)
    assert info.value.status_code == 502
    assert_clean(info.value.response.text, stub)


async def test_invalid_requests_never_reach_the_upstream(upstream_api: Any, stub: Stub) -> None:
    _, sdk = upstream_api
    before = dict(stub.hits)
    bad: list[dict[str, Any]] = [
        {"temperature": 7},
        {"api_base": "http://evil"},
        {"metadata": {"base_url": "http://evil"}},
        {"stop": ["a", "b", "c", "d", "e"]},
    ]
    for extra in bad:
        with pytest.raises(openai.BadRequestError):
            await sdk.chat.completions.create(model="fail", messages=HI, extra_body=extra)
    assert stub.hits == before
