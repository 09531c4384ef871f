"""Upstream faults through the router: each timeout (connect, first token, idle between chunks),
a replica dying mid-stream, usage from the upstream's usage chunk or counted, and no request ever
sent to a URL a client supplied. Real servers on loopback, the official openai SDK."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest

from bench.stub_upstream import StubConfig
from tests.routing_support import (
    Routed,
    chat,
    deployment,
    routed,
    routed_app,
    stream_text,
    stubs,
    unanswered_port,
)

NO_RETRY = {"retries": 0}


async def _sse(r: Routed, model: str) -> list[Any]:
    """Raw SSE frames of a streaming chat request (to see the in-band error frame)."""
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": True}
    resp = await r.http.post("/v1/chat/completions", json=body)
    assert resp.status_code == 200, resp.text
    frames: list[Any] = []
    for line in resp.text.split("\n\n"):
        if line.startswith("data: "):
            data = line[6:]
            frames.append(data if data == "[DONE]" else orjson.loads(data))
    return frames


async def test_connect_timeout_is_504_with_a_record(tmp_path: Path) -> None:
    async with unanswered_port() as port:
        dep = deployment(f"http://127.0.0.1:{port}/v1", connect_timeout=0.3)
        async with routed_app(tmp_path, [routed("m", [dep], routing=NO_RETRY)]) as r:
            t0 = time.perf_counter()
            with pytest.raises(openai.APIStatusError) as exc:
                await chat(r, "m")
            elapsed = time.perf_counter() - t0
    assert exc.value.status_code == 504
    assert exc.value.code == "upstream_timeout"
    assert str(port) not in exc.value.message  # never the upstream's address
    assert 0.25 <= elapsed < 2.0
    assert [(rec.status, rec.completion_tokens) for rec in r.records] == [(504, 0)]


async def test_first_token_timeout_cancels_the_upstream_request(tmp_path: Path) -> None:
    async with stubs(StubConfig(hang=True)) as (a,):
        dep = deployment(a, first_token_timeout=0.3)
        async with routed_app(tmp_path, [routed("m", [dep], routing=NO_RETRY)]) as r:
            t0 = time.perf_counter()
            with pytest.raises(openai.APIStatusError) as exc:
                await stream_text(r, "m")
            elapsed = time.perf_counter() - t0
            await _settle(lambda: a.stats.cancelled == 1)
    assert exc.value.status_code == 504  # nothing was sent yet: a plain HTTP error
    assert 0.25 <= elapsed < 2.0
    assert a.stats.cancelled == 1  # the upstream saw its request cancelled
    assert [(rec.status, rec.stream) for rec in r.records] == [(504, True)]


async def test_idle_timeout_mid_stream_is_an_sse_error_and_a_record(tmp_path: Path) -> None:
    async with stubs(StubConfig(tokens=10, stall_after=3)) as (a,):
        dep = deployment(a, idle_timeout=0.3)
        async with routed_app(tmp_path, [routed("m", [dep], routing={"retries": 3})]) as r:
            frames = await _sse(r, "m")
            await _settle(lambda: a.stats.cancelled == 1)
    texts = [f["choices"][0]["delta"].get("content") for f in frames[:-2]]
    # The role frame, then the 3 tokens sent before the stall (in one delta or several,
    # depending on how the upstream's writes arrive).
    assert texts[0] == "" and "".join(texts[1:]) == "tok " * 3
    error = frames[-2]["error"]
    assert error["code"] == "upstream_timeout" and error["type"] == "server_error"
    assert frames[-1] == "[DONE]"
    assert a.stats.requests == 1  # never retried once a byte had gone out
    assert a.stats.cancelled == 1
    [rec] = r.records
    assert (rec.status, rec.completion_tokens, rec.stream) == (504, 3, True)


async def test_replica_dying_mid_stream_is_an_sse_error_not_a_retry(tmp_path: Path) -> None:
    dies = StubConfig(tokens=10, die_after=4, interval=0.02)  # paced: 4 tokens leave first
    async with stubs(dies, StubConfig(tokens=10)) as (dying, other):
        model = routed("m", [deployment(dying, weight=1000), deployment(other, weight=0.001)])
        async with routed_app(tmp_path, [model]) as r:
            frames = await _sse(r, "m")
            with pytest.raises(openai.APIError):  # the SDK raises on the error frame
                await stream_text(r, "m")
    assert frames[-2]["error"]["code"] == "upstream_error"
    assert frames[-1] == "[DONE]"
    assert other.stats.requests == 0  # no mid-stream retry on the other replica
    assert [(rec.status, rec.completion_tokens) for rec in r.records] == [(502, 4), (502, 4)]


async def test_non_streaming_answer_cut_mid_response_is_retried(tmp_path: Path) -> None:
    """Nothing of a non-streaming answer reaches the client before it is whole, so a replica
    dying part-way through is retried on another replica (the router), and a model with
    nowhere to retry (a plain upstream) falls back to the next model (the service), as failures
    before the first chunk are. A stream cut after its first byte still ends with the in-band
    error (test above)."""
    dies = StubConfig(tokens=10, die_after=4, interval=0.02)
    async with stubs(dies, StubConfig(tokens=3), StubConfig(tokens=2)) as (dying, other, spare):
        models = [
            routed("m", [deployment(dying, weight=1000), deployment(other, weight=0.001)]),
            {"id": "solo", "backend": "openai", "base_url": dying.base_url, "fallbacks": ["spare"]},
            routed("spare", [deployment(spare)]),
        ]
        async with routed_app(tmp_path, models) as r:
            resp = await chat(r, "m")
            assert (resp.model, resp.choices[0].message.content) == ("m", "tok tok tok ")
            assert resp.usage is not None and resp.usage.completion_tokens == 3
            assert (dying.stats.requests, other.stats.requests) == (1, 1)
            resp = await chat(r, "solo")
            assert (resp.model, resp.choices[0].message.content) == ("spare", "tok tok ")
            with pytest.raises(openai.APIError):  # streaming: cut after its first byte
                await stream_text(r, "solo")
    assert (dying.stats.requests, spare.stats.requests) == (3, 1)
    # One record per request, for the answer the client got.
    assert [(rec.model, rec.status, rec.completion_tokens) for rec in r.records] == [
        ("m", 200, 3),
        ("spare", 200, 2),
        ("solo", 502, 4),
    ]


async def test_usage_comes_from_the_upstream_usage_chunk(tmp_path: Path) -> None:
    async with (
        stubs(StubConfig(tokens=5)) as (a,),
        routed_app(tmp_path, [routed("m", [deployment(a)])]) as r,
    ):
        _, chunks = await stream_text(r, "m")  # the client did not ask for usage
        resp = await chat(r, "m")
    # we asked the upstream to stream with usage anyway, for both kinds of client request
    assert all(
        b["stream"] and b["stream_options"] == {"include_usage": True} for b in a.stats.bodies
    )
    assert all(c.usage is None for c in chunks)
    prompt = len(orjson.dumps(a.stats.bodies[0]["messages"])) // 4  # what the stub reports
    assert resp.usage is not None
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens) == (prompt, 5)
    assert [(rec.prompt_tokens, rec.completion_tokens) for rec in r.records] == [(prompt, 5)] * 2


async def test_usage_is_counted_when_the_upstream_reports_none(tmp_path: Path) -> None:
    async with (
        stubs(StubConfig(tokens=6, usage=False)) as (a,),
        routed_app(tmp_path, [routed("m", [deployment(a)])]) as r,
    ):
        _, chunks = await stream_text(r, "m", stream_options={"include_usage": True})
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 6
    assert r.records[0].completion_tokens == 6


@pytest.mark.parametrize(
    "extra",
    [
        {"api_base": "URL"},
        {"base_url": "URL"},
        {"api_key": "sk-x", "api_base": "URL"},
        {"metadata": {"base_url": "URL"}},
        {"extra_body": {"api_base": "URL"}},
    ],
)
async def test_client_supplied_urls_are_never_used(tmp_path: Path, extra: dict) -> None:  # type: ignore[type-arg]
    async with stubs(StubConfig(tokens=1), StubConfig(tokens=1)) as (real, canary):
        body = orjson.loads(orjson.dumps(extra).replace(b"URL", canary.base_url.encode()))
        async with routed_app(tmp_path, [routed("m", [deployment(real)])]) as r:
            with pytest.raises(openai.BadRequestError) as exc:
                await chat(r, "m", extra_body=body)
            with pytest.raises(openai.NotFoundError):  # nor as a model name
                await chat(r, canary.base_url)
    assert exc.value.status_code == 400
    assert canary.stats.requests == 0 and real.stats.requests == 0


async def _settle(cond: object, timeout: float = 2.0) -> None:
    import asyncio

    deadline = time.monotonic() + timeout
    while not cond() and time.monotonic() < deadline:  # type: ignore[operator]
        await asyncio.sleep(0.02)
