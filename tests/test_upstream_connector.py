"""The upstream sessions' connector and reader, against real servers on loopback: the aiohttp 3.14
workaround (backends/upstream_connector.py) is in place, flow control still pauses and resumes a
fast upstream, a compressed stream (which we never ask for) is refused rather than passed on as
garbage, and the SSE framings upstreams use all read alike."""

from __future__ import annotations

import asyncio
import gzip

import aiohttp
import pytest
from aiohttp import web

from bench.stub_upstream import StubConfig, StubUpstream
from llm_api.core.exceptions import UpstreamError
from llm_api.services.llm.backends import upstream_connector
from llm_api.services.llm.backends.openai_upstream import OpenAIUpstreamBackend
from llm_api.services.llm.backends.upstream_connector import StreamProtocol
from llm_api.services.llm.registry import ModelConfig
from llm_api.services.llm.types import Frame, GenerationRequest, Message, SamplingParams
from tests.conftest import free_port


def _request(max_tokens: int) -> GenerationRequest:
    return GenerationRequest(
        request_id="r1",
        model="up",
        params=SamplingParams(max_tokens=max_tokens, temperature=0.0, top_p=1.0),
        messages=[Message("user", "hi")],
    )


async def _backend(base_url: str) -> OpenAIUpstreamBackend:
    backend = OpenAIUpstreamBackend(
        ModelConfig(id="up", backend="openai", base_url=base_url, idle_timeout=10)
    )
    await backend.start()
    return backend


async def _collect(
    backend: OpenAIUpstreamBackend, max_tokens: int, pause: float = 0.0
) -> list[Frame]:
    chunks = []
    async for chunk in backend.generate(_request(max_tokens)):
        chunks.append(chunk)
        if pause:
            await asyncio.sleep(pause)  # a slow client: the upstream gets ahead of us
    return chunks


async def test_the_workaround_is_in_place_on_this_aiohttp() -> None:
    """Fails when aiohttp moves on from the minor the workaround was written for: measure the
    new one (bench/RESULTS.md, callgrind) and drop or port StreamProtocol."""
    assert aiohttp.__version__.startswith(upstream_connector.WORKAROUND_FOR)
    connector = upstream_connector.upstream_connector(4)
    try:
        assert isinstance(connector._factory(), StreamProtocol)
    finally:
        await connector.close()


async def test_a_fast_large_stream_is_paused_and_resumed_without_loss(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """30,000 chunks (~3.6 MB) sent to a reader that dawdles after each read: aiohttp's flow
    control pauses the protocol (buffer and chunk-count high-water marks) and StreamProtocol must
    resume it, or the stream would stall. Every token arrives, in order."""
    pauses = 0
    pause = StreamProtocol.pause_reading

    def counting_pause(self: StreamProtocol) -> None:
        nonlocal pauses
        pauses += 1
        pause(self)

    monkeypatch.setattr(StreamProtocol, "pause_reading", counting_pause)
    stub = await StubUpstream(StubConfig(tokens=30_000), keep_bodies=False).start()
    backend = await _backend(stub.base_url)
    try:
        chunks = await asyncio.wait_for(_collect(backend, 30_000, pause=0.02), timeout=60)
    finally:
        await backend.aclose()
        await stub.stop()
    assert pauses > 0
    assert "".join(c.text for c in chunks) == "tok " * 30_000
    assert chunks[-1].finish_reason == "length" and chunks[-1].completion_tokens == 30_000


async def test_we_ask_for_identity_and_refuse_a_compressed_stream() -> None:
    seen: list[str | None] = []
    sse = b'data: {"choices":[{"delta":{"content":"x"},"finish_reason":"stop"}]}\n\n'
    sse += b"data: [DONE]\n\n"

    async def gzipped(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Accept-Encoding"))
        return web.Response(
            body=gzip.compress(sse),
            headers={"Content-Type": "text/event-stream", "Content-Encoding": "gzip"},
        )

    app = web.Application()
    app.router.add_post("/v1/chat/completions", gzipped)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    backend = await _backend(f"http://127.0.0.1:{port}/v1")
    try:
        with pytest.raises(UpstreamError, match="compressed"):
            await _collect(backend, 4)
    finally:
        await backend.aclose()
        await runner.cleanup()
    assert seen == ["identity"]


_TEXT = b'{"choices":[{"delta":{"content":"[DONE] is text"},"finish_reason":null}]}'
_END = b'{"choices":[{"delta":{},"finish_reason":"stop"}]}'


@pytest.mark.parametrize(
    "body",
    [
        b"data: " + _TEXT + b"\r\n\r\ndata: " + _END + b"\r\n\r\ndata: [DONE]\r\n\r\n",
        b"data:" + _TEXT + b"\n\ndata:" + _END + b"\n\ndata:[DONE]\n\n",
        b"data: " + _TEXT + b"\n\ndata: " + _END + b"\n\ndata: [DONE]",  # no final newline
        b": comment\nevent: x\ndata: " + _TEXT + b"\n\ndata:  " + _END + b"  \n\ndata: [DONE]\n",
    ],
    ids=["crlf", "no space", "done at eof", "comments, event lines, padding"],
)
async def test_sse_framing_variants_are_read_alike(body: bytes) -> None:
    """Line endings, the optional space after `data:`, padding and a [DONE] the upstream ends
    without a newline all read the same; `[DONE]` inside a token is text, not the end."""

    async def upstream(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(body)
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_post("/v1/chat/completions", upstream)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    backend = await _backend(f"http://127.0.0.1:{port}/v1")
    try:
        chunks = await _collect(backend, 4)
    finally:
        await backend.aclose()
        await runner.cleanup()
    assert "".join(c.text for c in chunks) == "[DONE] is text"
    assert chunks[-1].finish_reason == "stop"
