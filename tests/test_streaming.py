"""Stream framing: SSE (unit tests on api/streaming with hostile model output), the guide's
NDJSON /v1/stream and JSON /v1/generate with the real model."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import httpx
import pytest

from llm_api.api.streaming import (
    _BATCH,
    _MAX_BYTES,
    _batches,
    event_frames,
    ndjson_lines,
    sse_frames,
)
from llm_api.core.exceptions import UpstreamTimeoutError
from llm_api.schemas.chat import ChatCompletionChunk, ChoiceDelta, ChunkChoice
from tests.conftest import MODEL

NO_CACHE = {"Cache-Control": "no-cache, no-store"}
HOSTILE = "a\n\ndata: [DONE]\n\nb\rc\r\n\r\nd: e\n"


def chunk(content: str) -> ChatCompletionChunk:
    return ChatCompletionChunk(
        id="chatcmpl-1",
        created=0,
        model="m",
        choices=[ChunkChoice(index=0, delta=ChoiceDelta(content=content))],
    )


async def items(*chunks: object, fail: Exception | None = None) -> AsyncIterator:
    for c in chunks:
        yield c
    if fail is not None:
        raise fail


def as_bytes(i: int) -> bytes:
    return b"%d" % i


async def collect(frames: AsyncIterator[bytes]) -> bytes:
    return b"".join([f async for f in frames])


def events(raw: bytes) -> list[str]:
    """Split an SSE body the way a client does: events end at a blank line."""
    text = raw.decode()
    assert text.endswith("\n\n")
    return text[:-2].split("\n\n")


async def test_sse_frames_keep_model_output_inside_json() -> None:
    raw = await collect(sse_frames(items(chunk(HOSTILE), chunk("ok")), keepalive=10))
    evs = events(raw)
    assert evs[-1] == "data: [DONE]"
    assert len(evs) == 3  # two chunks, then [DONE]: the output's own "[DONE]" ended nothing
    for ev in evs:
        # One `data:` line per event: no raw CR or LF inside an event.
        assert "\n" not in ev and "\r" not in ev and ev.startswith("data: ")
    first = json.loads(evs[0].removeprefix("data: "))
    assert first["choices"][0]["delta"]["content"] == HOSTILE


async def test_encoded_chunks_and_models_share_a_stream() -> None:
    """The serving encoders hand over each chunk's JSON; a typed model is serialised here."""
    encoded = chunk(HOSTILE).model_dump_json().encode()
    raw = await collect(sse_frames(items(chunk("a"), encoded, chunk("b")), 10))
    evs = events(raw)
    assert len(evs) == 4 and evs[-1] == "data: [DONE]"
    bodies = [json.loads(e.removeprefix("data: ")) for e in evs[:3]]
    assert [b["choices"][0]["delta"]["content"] for b in bodies] == ["a", HOSTILE, "b"]


async def test_sse_error_after_start_is_an_error_frame_then_done() -> None:
    fail = UpstreamTimeoutError("The upstream model server stopped sending tokens.")
    raw = await collect(sse_frames(items(chunk("x"), fail=fail), keepalive=10))
    evs = events(raw)
    assert evs[-1] == "data: [DONE]"
    err = json.loads(evs[-2].removeprefix("data: "))
    assert err == {
        "error": {
            "message": "The upstream model server stopped sending tokens.",
            "type": "server_error",
            "param": None,
            "code": "upstream_timeout",
        }
    }


async def test_sse_unexpected_error_hides_details() -> None:
    raw = await collect(
        sse_frames(items(fail=RuntimeError("/secret/path.py line 3")), keepalive=10)
    )
    assert b"/secret" not in raw
    assert json.loads(events(raw)[0].removeprefix("data: "))["error"]["type"] == "server_error"


async def test_named_events_pass_as_framed_with_keepalives_and_an_error_but_no_done() -> None:
    """The one helper for named events (Responses, Messages): each event's bytes as its
    encoder framed them; by default a keep-alive comment when quiet and the OpenAI error
    object as a `data:` event after the first byte (the Responses API's framing, the bytes
    the `named` mode of sse_frames sent before it was folded in)."""
    first = b'event: response.created\ndata: {"type":"response.created"}\n\n'

    async def quiet_then_fail() -> AsyncIterator[bytes]:
        yield first
        await asyncio.sleep(0.25)
        raise UpstreamTimeoutError("The upstream model server stopped sending tokens.")

    raw = await collect(event_frames(quiet_then_fail(), keepalive=0.1))
    assert raw.startswith(first) and b": keep-alive\n\n" in raw and b"[DONE]" not in raw
    last = events(raw)[-1]
    assert json.loads(last.removeprefix("data: "))["error"]["code"] == "upstream_timeout"
    # Ended normally: exactly the events, nothing added.
    assert await collect(event_frames(items(first, first), keepalive=10)) == first + first


async def test_items_made_together_leave_as_one_batch() -> None:
    async def together() -> AsyncIterator[int]:
        for i in range(3):
            yield i  # no suspension between them

    got = [b async for b in _batches(together(), 10, as_bytes)]
    assert got == [([b"0", b"1", b"2"], True)]


async def test_a_slow_consumer_stops_the_pump_after_a_batch() -> None:
    """Backpressure: the source is not drained ahead of the consumer by more than _BATCH."""
    made = 0

    async def eager() -> AsyncIterator[int]:
        nonlocal made
        for i in range(5 * _BATCH):
            made += 1
            yield i

    ahead, seen, ends = [], [], []
    async for batch, last in _batches(eager(), 10, as_bytes):
        ahead.append(made - len(seen))
        seen.extend(batch)
        ends.append(last)
        await asyncio.sleep(0.01)  # a slow client
    assert seen == [as_bytes(i) for i in range(5 * _BATCH)] and ends[-1] and not any(ends[:-1])
    assert max(ahead) <= _BATCH and len(ahead) >= 5


async def test_a_slow_consumer_stops_the_pump_at_a_byte_bound() -> None:
    """Backpressure in bytes: items of 24 KiB (an upstream read each) stop the pump once
    _MAX_BYTES wait, whatever the item count; a client that does not read holds no more."""
    size = 24 * 1024
    made = 0

    async def large() -> AsyncIterator[bytes]:
        nonlocal made
        while True:
            made += 1
            yield b"x" * size

    async def settled() -> int:
        # The pump awaits nothing but the consumer: once `made` stops moving over a few
        # loop steps, it is paused.
        seen = -1
        while seen != made:
            seen = made
            for _ in range(10):
                await asyncio.sleep(0)
        return made

    batches = _batches(large(), 10, bytes)
    first, _ = await anext(batches)  # taken, and not yet written: the client is slow
    waiting = await settled() - len(first)
    assert waiting * size <= _MAX_BYTES + size  # 3 items, where the item bound alone gave 64
    second, _ = await anext(batches)
    assert len(second) == waiting
    await batches.aclose()


async def test_closing_the_batches_closes_the_source() -> None:
    closed = asyncio.Event()

    async def endless() -> AsyncIterator[int]:
        try:
            yield 1
            await asyncio.sleep(3600)
            yield 2
        finally:
            closed.set()

    batches = _batches(endless(), 10, as_bytes)
    assert await anext(batches) == ([b"1"], False)
    await batches.aclose()  # the client went away
    assert closed.is_set()


async def test_sse_keepalive_while_quiet() -> None:
    async def slow() -> AsyncIterator[ChatCompletionChunk]:
        await asyncio.sleep(0.35)
        yield chunk("late")

    evs = events(await collect(sse_frames(slow(), keepalive=0.1)))
    assert evs[0] == ": keep-alive"  # a comment line: clients ignore it
    assert json.loads(evs[-2].removeprefix("data: "))["choices"][0]["delta"]["content"] == "late"


async def test_ndjson_one_json_per_line() -> None:
    raw = await collect(ndjson_lines(items(chunk(HOSTILE)), keepalive=10))
    lines = raw.decode().split("\n")
    assert lines[-1] == "" and len(lines) == 2
    assert json.loads(lines[0])["choices"][0]["delta"]["content"] == HOSTILE


@pytest.mark.model
async def test_ndjson_stream_endpoint(http: httpx.AsyncClient) -> None:
    async with http.stream(
        "POST",
        "/v1/stream",
        json={"prompt": "Once upon a time", "max_tokens": 8, "temperature": 0},
        headers=NO_CACHE,
    ) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("application/x-ndjson")
        assert r.headers["cache-control"] == "no-cache"
        lines = [line async for line in r.aiter_lines() if line]
    tokens = [json.loads(line) for line in lines]
    assert tokens and all(set(t) == {"token"} and t["token"] for t in tokens)
    generated = await http.post(
        "/v1/generate",
        json={"prompt": "Once upon a time", "max_tokens": 8, "temperature": 0},
        headers=NO_CACHE,
    )
    # Same request at temperature 0: the streamed tokens join to the generated text.
    assert "".join(t["token"] for t in tokens) == generated.json()["text"]


@pytest.mark.model
async def test_generate_endpoint(http: httpx.AsyncClient) -> None:
    r = await http.post(
        "/v1/generate",
        json={"prompt": "The capital of France is", "max_tokens": 6, "temperature": 0},
        headers=NO_CACHE,
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"id", "model", "text", "finish_reason", "usage"}
    assert body["model"] == MODEL and body["text"]
    assert body["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    assert 0 < usage["completion_tokens"] <= 6
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


@pytest.mark.parametrize(
    "body",
    [
        {"prompt": "", "max_tokens": 3},
        {"prompt": "x", "max_tokens": 0},
        {"prompt": "x", "temperature": 9},
        {"prompt": "x", "model": "nope"},
        {"prompt": "x", "api_key": "sk-stolen"},
        {"max_tokens": 3},
    ],
)
async def test_simple_api_rejects_bad_input(http: httpx.AsyncClient, body: dict) -> None:
    for path in ("/v1/generate", "/v1/stream"):
        r = await http.post(path, json=body)
        assert r.status_code in (400, 404), r.text
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
