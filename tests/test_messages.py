"""POST /v1/messages (Anthropic's Messages API) with the official `anthropic` SDK as the client
and the real SmolLM2 model: whole and streamed messages (the SDK's stream helpers), a tool-use
loop, count_tokens against the prompt tokens the model then reports, and errors in Anthropic's
shape (validation, authentication by `x-api-key`, unknown model, images, in-stream)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import httpx2
import orjson
import pytest

from bench.stub_upstream import StubConfig
from llm_api.api.errors import anthropic_error
from llm_api.api.streaming import event_frames
from llm_api.api.v1.messages.serving import PING, error_event
from llm_api.core.exceptions import RateLimitError, ServiceUnavailableError
from tests.conftest import MODEL, Account
from tests.routing_support import routed_app, stubs

FRESH = {"Cache-Control": "no-cache, no-store"}
WEATHER: dict[str, Any] = {
    "name": "get_weather",
    "description": "Current weather in a city",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 16}},
        "required": ["city"],
    },
}
PNG = {"type": "base64", "media_type": "image/png", "data": "AA=="}
HELLO: list[Any] = [{"role": "user", "content": "Say hello in one short sentence."}]


@pytest.fixture(scope="module")
async def raw(app: Any) -> AsyncIterator[httpx.AsyncClient]:
    """httpx over ASGI with no credentials of its own: each request brings its key."""
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
        yield c


@pytest.fixture(scope="module")
async def transport(app: Any) -> AsyncIterator[httpx2.AsyncClient]:
    """The SDK's own HTTP client (httpx2, since anthropic 2.x) over ASGI, without credentials."""
    async with httpx2.AsyncClient(
        transport=httpx2.ASGITransport(app=app), base_url="http://testserver"
    ) as c:
        yield c


def anthropic_client(transport: httpx2.AsyncClient, key: str) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(
        base_url="http://testserver", api_key=key, http_client=transport, max_retries=0
    )


@pytest.fixture(scope="module")
def sdk(transport: httpx2.AsyncClient, account: Account) -> anthropic.AsyncAnthropic:
    """The anthropic SDK. Version 2.x sends its key as `Authorization: Bearer` (1.x sent
    `x-api-key`, tested with raw requests below) and sends `anthropic-version`."""
    return anthropic_client(transport, account.api_key)


def request(**kw: Any) -> dict[str, Any]:
    return {
        "model": MODEL,
        "max_tokens": 24,
        "messages": HELLO,
        # anthropic 2.x dropped the sampling arguments from its signature; the API takes them.
        "extra_body": {"temperature": 0, "top_k": 40},
        "extra_headers": FRESH,
        **kw,
    }


@pytest.mark.model
async def test_whole_message(sdk: anthropic.AsyncAnthropic) -> None:
    msg = await sdk.messages.create(**request(system="You are terse."))
    assert msg.type == "message" and msg.role == "assistant" and msg.model == MODEL
    assert msg.id.startswith("msg_")
    assert [b.type for b in msg.content] == ["text"]
    assert msg.content[0].text.strip()  # type: ignore[union-attr]
    assert msg.stop_reason in ("end_turn", "max_tokens")
    assert msg.usage.input_tokens > 0 and 0 < msg.usage.output_tokens <= 24

    short = await sdk.messages.create(**request(max_tokens=3))
    assert short.stop_reason == "max_tokens" and short.usage.output_tokens == 3


@pytest.mark.model
async def test_stop_sequence_names_the_one_that_matched(sdk: anthropic.AsyncAnthropic) -> None:
    """A local model's stop string ends the message with `stop_reason: stop_sequence` and the
    string that matched, whole, streamed (the SDK's helper) and replayed from the cache."""
    free = await sdk.messages.create(**request())
    text = free.content[0].text  # type: ignore[union-attr]
    words = text.split()
    assert len(words) >= 3, text
    word = words[2]  # greedy: the same text again, cut before its third word
    stops = ["NEVER-SAID", word]
    whole = await sdk.messages.create(**request(stop_sequences=stops))
    assert whole.stop_reason == "stop_sequence" and whole.stop_sequence == word
    assert whole.content[0].text == text[: text.index(word)]  # type: ignore[union-attr]
    async with sdk.messages.stream(**request(stop_sequences=stops)) as stream:
        final = await stream.get_final_message()
    assert final.stop_reason == "stop_sequence" and final.stop_sequence == word
    cached = request(stop_sequences=stops, extra_headers={})
    await sdk.messages.create(**cached)
    replay = await sdk.messages.with_raw_response.create(**cached)
    assert replay.headers["x-cache"] == "hit"
    assert (await replay.parse()).stop_sequence == word
    # Without a match: the end of turn (or the length limit), and no sequence.
    assert free.stop_reason in ("end_turn", "max_tokens") and free.stop_sequence is None


@pytest.mark.model
async def test_stream_reassembles_to_the_whole_message(sdk: anthropic.AsyncAnthropic) -> None:
    whole = await sdk.messages.create(**request())
    async with sdk.messages.stream(**request()) as stream:
        events = [event async for event in stream]
        kinds = [event.type for event in events]
        final = await stream.get_final_message()
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    start = events[0]
    assert start.type == "message_start"
    assert start.message.usage.input_tokens == whole.usage.input_tokens > 0
    assert "content_block_start" in kinds and "message_delta" in kinds
    assert [(b.type, b.text) for b in final.content if b.type == "text"] == [
        (b.type, b.text) for b in whole.content if b.type == "text"
    ]
    assert len(final.content) == len(whole.content) == 1
    assert final.stop_reason == whole.stop_reason
    assert final.usage.input_tokens == whole.usage.input_tokens
    assert final.usage.output_tokens == whole.usage.output_tokens


@pytest.mark.model
async def test_tool_use_loop(sdk: anthropic.AsyncAnthropic) -> None:
    ask: list[Any] = [{"role": "user", "content": "What is the weather in Paris?"}]
    forced = request(
        messages=ask,
        tools=[WEATHER],
        tool_choice={"type": "tool", "name": "get_weather"},
        max_tokens=160,
    )
    first = await sdk.messages.create(**forced)
    assert first.stop_reason == "tool_use"
    calls = [b for b in first.content if b.type == "tool_use"]
    assert len(calls) == 1
    call = calls[0]
    assert call.name == "get_weather" and isinstance(call.input, dict)
    assert isinstance(call.input["city"], str)  # type: ignore[index]

    # The same call streamed: input_json_delta pieces rebuild the same input.
    async with sdk.messages.stream(**forced) as stream:
        streamed = await stream.get_final_message()
    assert streamed.stop_reason == "tool_use"
    assert [(b.name, b.input) for b in streamed.content if b.type == "tool_use"] == [
        (call.name, call.input)
    ]

    def follow(result: str) -> list[Any]:
        turn = [{"type": "tool_result", "tool_use_id": call.id, "content": result}]
        return ask + [
            {"role": "assistant", "content": [c.model_dump() for c in first.content]},
            {"role": "user", "content": turn},
        ]

    then = request(
        messages=follow("Sunny, 24 C"), tools=[WEATHER], tool_choice={"type": "none"}, max_tokens=40
    )
    answer = await sdk.messages.create(**then)
    assert answer.stop_reason in ("end_turn", "max_tokens")
    assert [b.type for b in answer.content] == ["text"]
    assert answer.content[0].text.strip()  # type: ignore[union-attr]
    # The tool result reached the model's prompt: a longer result, a longer prompt.
    longer = await sdk.messages.count_tokens(
        model=MODEL,
        messages=follow("Sunny, 24 C, a light wind from the west"),
        tools=[WEATHER],  # type: ignore[list-item]
        tool_choice={"type": "none"},
    )
    assert longer.input_tokens > answer.usage.input_tokens


@pytest.mark.model
async def test_count_tokens_is_what_the_model_reports(sdk: anthropic.AsyncAnthropic) -> None:
    extras: list[dict[str, Any]] = [{}, {"tools": [WEATHER], "tool_choice": {"type": "any"}}]
    for extra in extras:
        counted = await sdk.messages.count_tokens(
            model=MODEL, messages=HELLO, system="You are terse.", **extra
        )
        msg = await sdk.messages.create(**request(system="You are terse.", max_tokens=160, **extra))
        assert counted.input_tokens == msg.usage.input_tokens > 0


async def test_errors_in_anthropic_shape(
    sdk: anthropic.AsyncAnthropic,
    raw: httpx.AsyncClient,
    transport: httpx2.AsyncClient,
    account: Account,
) -> None:
    key = {"x-api-key": account.api_key, "anthropic-version": "2023-06-01"}
    r = await raw.post("/v1/messages", json={"model": MODEL, "messages": HELLO}, headers=key)
    assert r.status_code == 400
    body = r.json()
    assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in body["error"]["message"]

    # x-api-key, as Anthropic's 1.x SDKs and most other clients send the key.
    ok = {"model": MODEL, "messages": HELLO, "max_tokens": 2}
    r = await raw.post("/v1/messages", json=ok, headers=key)
    assert r.status_code == 200 and r.json()["type"] == "message"
    r = await raw.post("/v1/messages", json=ok, headers={"x-api-key": "sk-wrong"})
    assert r.status_code == 401
    assert r.json() == {
        "type": "error",
        "error": {"type": "authentication_error", "message": r.json()["error"]["message"]},
    }
    r = await raw.post("/v1/messages", json=ok)
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"

    bad = anthropic_client(transport, "sk-wrong")
    with pytest.raises(anthropic.AuthenticationError) as auth:
        await bad.messages.create(**request())
    assert auth.value.status_code == 401
    assert auth.value.body["error"]["type"] == "authentication_error"  # type: ignore[index]

    with pytest.raises(anthropic.NotFoundError) as missing:
        await sdk.messages.create(**request(model="no-such-model"))
    assert missing.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]

    image = {"type": "image", "source": PNG}
    with pytest.raises(anthropic.BadRequestError) as no_images:
        await sdk.messages.create(**request(messages=[{"role": "user", "content": [image]}]))
    assert no_images.value.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]
    assert "image" in no_images.value.message

    big = {"model": MODEL, "max_tokens": 2, "messages": HELLO, "metadata": {"x": "y" * 3_000_000}}
    r = await raw.post("/v1/messages", json=big, headers=key)
    assert r.status_code == 413 and r.json()["error"]["type"] == "request_too_large"

    # Other families keep OpenAI's error shape, x-api-key authenticates there too.
    r = await raw.post("/v1/chat/completions", json={"model": MODEL}, headers=key)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"


def test_status_mapping() -> None:
    assert anthropic_error(ServiceUnavailableError("busy")) == (
        529,
        {"type": "error", "error": {"type": "overloaded_error", "message": "busy"}},
    )
    assert anthropic_error(RateLimitError("slow down"))[0] == 429


async def _slow_then_fail() -> AsyncIterator[bytes]:
    yield b"event: message_start\ndata: {}\n\n"
    await asyncio.sleep(0.25)
    raise RateLimitError("slow down")


async def test_pings_while_quiet_and_errors_in_stream() -> None:
    frames = [f async for f in event_frames(_slow_then_fail(), 0.05, PING, error_event)]
    assert frames[0].startswith(b"event: message_start")
    assert PING in frames
    last = frames[-1]
    assert last.startswith(b"event: error\ndata: ")
    error = orjson.loads(last.split(b"data: ", 1)[1])
    assert error == {"type": "error", "error": {"type": "rate_limit_error", "message": "slow down"}}


class _NoKey(httpx2.ASGITransport):
    """Auth is off in routed_app (loopback callers need no key), but a key sent is checked:
    the SDK always sends one (as a bearer token), so it is dropped here."""

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        del request.headers["authorization"]
        return await super().handle_async_request(request)


async def test_upstream_model_gets_the_translated_chat_body(tmp_path: Path) -> None:
    """An upstream model is sent the OpenAI chat body the request translates to (tool calls,
    tool results, system, stop, user); the record names the endpoint `messages`; count_tokens
    is a 400 there (no local tokenizer)."""
    async with stubs(StubConfig(tokens=3)) as (stub,):
        entry = {
            "id": "up",
            "backend": "openai",
            "base_url": stub.base_url,
            "capabilities": ["tools", "images"],
        }
        async with routed_app(tmp_path, [entry]) as r:
            transport = httpx2.AsyncClient(transport=_NoKey(app=r.app), base_url="http://127.0.0.1")
            async with transport:
                client = anthropic.AsyncAnthropic(
                    base_url="http://127.0.0.1", api_key="unused", http_client=transport
                )
                history: list[Any] = [
                    {"role": "user", "content": "Weather in Paris?"},
                    {
                        "role": "assistant",
                        "content": [
                            {"type": "text", "text": "Let me look."},
                            {
                                "type": "tool_use",
                                "id": "t1",
                                "name": "get_weather",
                                "input": {"city": "Paris"},
                            },
                        ],
                    },
                    {
                        "role": "user",
                        "content": [
                            {"type": "tool_result", "tool_use_id": "t1", "content": "Sunny"},
                            {"type": "text", "text": "Thanks, and now?"},
                            {"type": "image", "source": PNG},
                        ],
                    },
                ]
                kw: dict[str, Any] = {
                    "model": "up",
                    "max_tokens": 5,
                    "system": [{"type": "text", "text": "Be brief."}],
                    "messages": history,
                    "tools": [WEATHER],
                    "tool_choice": {"type": "any", "disable_parallel_tool_use": True},
                    "stop_sequences": ["END"],
                    "metadata": {"user_id": "u-42"},
                    "extra_headers": FRESH,
                }
                whole = await client.messages.create(**kw)
                async with client.messages.stream(**kw) as stream:
                    final = await stream.get_final_message()
                with pytest.raises(anthropic.BadRequestError) as refused:
                    await client.messages.count_tokens(model="up", messages=HELLO)
    assert whole.content[0].text == final.content[0].text == "tok tok tok "  # type: ignore[union-attr]
    assert whole.usage.output_tokens == final.usage.output_tokens == 3
    assert refused.value.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]
    body = stub.stats.bodies[0]
    assert body["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": "Let me look.",
            "tool_calls": [
                {
                    "id": "t1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "t1", "content": "Sunny"},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Thanks, and now?"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}},
            ],
        },
    ]
    assert body["tools"][0]["function"]["parameters"] == WEATHER["input_schema"]
    assert body["tool_choice"] == "required" and body["parallel_tool_calls"] is False
    assert body["stop"] == ["END"] and body["user"] == "u-42" and body["max_tokens"] == 5
    assert {rec.endpoint for rec in r.records} == {"messages"}
