"""Tool calling through the official openai SDK, against both kinds of model llm-api serves: a
gateway model whose upstream streams tool calls as OpenAI does (in pieces, parallel calls
interleaved, arguments with multi-byte characters), and the built-in SmolLM2 with `tool_choice`
forced (grammar-constrained, so its arguments must satisfy the tool's schema). Streamed deltas
must reassemble to exactly what the non-streamed call returns, live and on cache replay; the
SDK's helpers (`parse`, `stream`, `pydantic_function_tool`) must work; and a client that goes
away in the middle of a tool call must free the model.

Run: PYTHONPATH=src python -m pytest -q -p no:cacheprovider tests/clients"""

from __future__ import annotations

import time
from typing import Any, Literal

import openai
import pytest
from pydantic import BaseModel, Field

from tests.clients.conftest import STUB_MODEL
from tests.clients.support import (
    FRESH,
    TIME_TOOL,
    WEATHER_TOOL,
    assert_fresh_ids,
    assert_valid_arguments,
    named,
    requests_running,
    streamed_calls,
    whole_calls,
    without_ids,
)
from tests.clients.tool_upstream import ScriptedCall, ToolScript, ToolUpstream, call_id
from tests.conftest import MODEL, LiveServer

pytestmark = pytest.mark.model

# A call forced by a named tool_choice: OpenAI ends it with "stop", "tool_calls" is as good.
NAMED_FINISH = ("tool_calls", "stop")
PARALLEL = [
    ScriptedCall("get_weather", '{"city": "São Paulo", "unit": "celsius"}'),
    ScriptedCall("get_time", '{"city": "東京"}'),
]


class GetWeather(BaseModel):
    """Current weather in a city."""

    city: str = Field(max_length=40)
    unit: Literal["celsius", "fahrenheit"]


class CityWeather(BaseModel):
    city: str = Field(max_length=40)
    temperature_c: int


def user(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


def stream_chunks(sdk: openai.OpenAI, **kw: Any) -> list[Any]:
    with sdk.chat.completions.create(**kw, stream=True) as stream:
        return list(stream)


# --- a gateway model: the upstream's tool calls relayed without loss ---------------------------


def test_upstream_parallel_calls_streamed_reassemble_to_the_whole_answer(
    gateway_sdk: openai.OpenAI, script: ToolUpstream
) -> None:
    script.script = ToolScript(calls=PARALLEL, piece=3, interleave=True)
    kw: dict[str, Any] = {
        "model": STUB_MODEL,
        "messages": user("Weather in São Paulo, and the time in Tokyo?"),
        "tools": [WEATHER_TOOL, TIME_TOOL],
        "tool_choice": "required",
        "parallel_tool_calls": True,
        "temperature": 0,
        "seed": 11,
    }
    whole = gateway_sdk.chat.completions.create(**kw, extra_headers=FRESH)
    chunks = stream_chunks(
        gateway_sdk, **kw, stream_options={"include_usage": True}, extra_headers=FRESH
    )

    sent = script.recorded.bodies[0]
    expected = [
        {
            "index": i,
            "id": call_id(sent, i, c),
            "type": "function",
            "name": c.name,
            "arguments": c.arguments,
        }
        for i, c in enumerate(PARALLEL)
    ]
    assert whole_calls(whole) == expected
    assert whole.choices[0].message.content is None
    assert streamed_calls(chunks) == expected
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    # What the upstream was asked: the tool fields as the client sent them.
    for body in script.recorded.bodies:
        assert body["tools"] == [WEATHER_TOOL, TIME_TOOL]
        assert body["tool_choice"] == "required"
        assert body["parallel_tool_calls"] is True

    # Deterministic (temperature 0, a seed), so cached: a replay carries the same calls.
    for _ in range(2):
        assert whole_calls(gateway_sdk.chat.completions.create(**kw)) == expected
        assert streamed_calls(stream_chunks(gateway_sdk, **kw)) == expected


def test_upstream_tool_loop_with_the_sdks_own_message_objects(
    gateway_sdk: openai.OpenAI, script: ToolUpstream
) -> None:
    """The loop as the SDK's docs write it: the assistant message object goes back as it came
    (with its `refusal`, `annotations`... fields), then one `tool` message per call."""
    script.script = ToolScript(calls=PARALLEL)
    messages: list[Any] = user("Weather in São Paulo, and the time in Tokyo? (loop)")
    first = gateway_sdk.chat.completions.create(
        model=STUB_MODEL, messages=messages, tools=[WEATHER_TOOL, TIME_TOOL]
    )
    calls = first.choices[0].message.tool_calls or []
    assert [c.function.name for c in calls] == ["get_weather", "get_time"]
    messages.append(first.choices[0].message)
    results = {"get_weather": "24 C, clear", "get_time": "09:30"}
    for c in calls:
        messages.append({"role": "tool", "tool_call_id": c.id, "content": results[c.function.name]})

    final = stream_chunks(
        gateway_sdk, model=STUB_MODEL, messages=messages, tools=[WEATHER_TOOL, TIME_TOOL]
    )
    text = "".join(c.choices[0].delta.content or "" for c in final if c.choices)
    assert text == "Tool results: 24 C, clear; 09:30"
    assert [c.choices[0].finish_reason for c in final if c.choices][-1] == "stop"

    history = script.recorded.bodies[-1]["messages"]
    assistant, *tools = history[1:]
    assert [t["id"] for t in assistant["tool_calls"]] == [c.id for c in calls]
    assert [t["function"]["arguments"] for t in assistant["tool_calls"]] == [
        c.arguments for c in PARALLEL
    ]
    assert [(t["role"], t["tool_call_id"]) for t in tools] == [("tool", c.id) for c in calls]


def test_upstream_sdk_tool_helpers_parse_the_arguments(
    gateway_sdk: openai.OpenAI, script: ToolUpstream
) -> None:
    script.script = ToolScript(
        calls=[ScriptedCall("GetWeather", '{"city": "Paris", "unit": "celsius"}')]
    )
    tool = openai.pydantic_function_tool(GetWeather)
    kw: dict[str, Any] = {
        "model": STUB_MODEL,
        "messages": user("Weather in Paris?"),
        "tools": [tool],
    }
    parsed = gateway_sdk.chat.completions.parse(**kw)
    [call] = parsed.choices[0].message.tool_calls or []
    assert call.function.parsed_arguments == GetWeather(city="Paris", unit="celsius")

    with gateway_sdk.chat.completions.stream(**kw) as stream:
        done = [e for e in stream if e.type == "tool_calls.function.arguments.done"]
        final = stream.get_final_completion()
    assert [(e.name, e.parsed_arguments) for e in done] == [
        ("GetWeather", GetWeather(city="Paris", unit="celsius"))
    ]
    [streamed] = final.choices[0].message.tool_calls or []
    assert streamed.id == call.id
    assert streamed.function.parsed_arguments == call.function.parsed_arguments
    assert script.recorded.bodies[0]["tools"][0]["function"]["strict"] is True


# --- the built-in model, tool_choice forced -----------------------------------------------------


def test_local_named_tool_call_streamed_matches_the_whole_answer(sdk: openai.OpenAI) -> None:
    kw: dict[str, Any] = {
        "model": MODEL,
        "messages": user("What is the weather in Paris?"),
        "tools": [WEATHER_TOOL, TIME_TOOL],
        "tool_choice": named("get_weather"),
        "temperature": 0,
        "seed": 7,
        "max_tokens": 200,
    }
    first = sdk.chat.completions.create(**kw, extra_headers=FRESH)
    chunks = stream_chunks(sdk, **kw, extra_headers=FRESH)
    whole = whole_calls(first, NAMED_FINISH)
    streamed = streamed_calls(chunks, NAMED_FINISH)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == first.choices[0].finish_reason
    assert len(whole) == 1 and whole[0]["name"] == "get_weather"
    assert_valid_arguments(whole[0])
    assert_fresh_ids(whole)
    assert_fresh_ids(streamed)
    # Two separate generations mint their own ids; all else is identical.
    assert without_ids(streamed) == without_ids(whole)

    # Deterministic, so cacheable: a replay (`x-cache: hit`) is the stored answer exactly, ids
    # included; a new generation matches in all but its ids.
    stored = whole_calls(sdk.chat.completions.create(**kw), NAMED_FINISH)
    assert without_ids(stored) == without_ids(whole)
    raw = sdk.chat.completions.with_raw_response.create(**kw)
    again = whole_calls(raw.parse(), NAMED_FINISH)
    if raw.headers.get("x-cache") == "hit":
        assert again == stored
    else:
        assert without_ids(again) == without_ids(stored)
    assert without_ids(streamed_calls(stream_chunks(sdk, **kw), NAMED_FINISH)) == without_ids(whole)


def test_local_required_tool_call_is_valid_streamed_and_whole(sdk: openai.OpenAI) -> None:
    kw: dict[str, Any] = {
        "model": MODEL,
        "messages": user("What time is it in Tokyo?"),
        "tools": [WEATHER_TOOL, TIME_TOOL],
        "tool_choice": "required",
        "parallel_tool_calls": False,
        "temperature": 0,
        "seed": 3,
        "max_tokens": 200,
    }
    whole = whole_calls(sdk.chat.completions.create(**kw, extra_headers=FRESH))
    streamed = streamed_calls(stream_chunks(sdk, **kw, extra_headers=FRESH))
    assert len(whole) == 1 and whole[0]["name"] in ("get_weather", "get_time")
    assert_valid_arguments(whole[0])
    assert without_ids(streamed) == without_ids(whole)


def test_local_sdk_helpers_get_validated_objects(sdk: openai.OpenAI) -> None:
    tool = openai.pydantic_function_tool(GetWeather)
    kw: dict[str, Any] = {
        "model": MODEL,
        "messages": user("What is the weather in Paris?"),
        "tools": [tool],
        "tool_choice": named("GetWeather"),
        "temperature": 0,
        "max_tokens": 200,
    }
    parsed = sdk.chat.completions.parse(**kw)
    [call] = parsed.choices[0].message.tool_calls or []
    assert isinstance(call.function.parsed_arguments, GetWeather)

    with sdk.chat.completions.stream(**kw) as stream:
        final = stream.get_final_completion()
    [streamed] = final.choices[0].message.tool_calls or []
    assert streamed.function.parsed_arguments == call.function.parsed_arguments


def test_local_parse_with_a_pydantic_response_format(sdk: openai.OpenAI) -> None:
    """The SDK's other helper (json_schema structured output, no tools): a regression guard."""
    answer = sdk.chat.completions.parse(
        model=MODEL,
        messages=user("Paris is 21 degrees. Give the city and temperature."),
        response_format=CityWeather,
        temperature=0,
        max_tokens=200,
    )
    assert isinstance(answer.choices[0].message.parsed, CityWeather)


# --- cancellation in the middle of a tool call --------------------------------------------------

# A tool whose arguments must hold at least 1500 integers (~3000 tokens): forced by the grammar,
# so the model cannot end the call early, and a generation not stopped holds the one slot for
# minutes.
LONG_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "record_numbers",
        "description": "Record a list of numbers",
        "parameters": {
            "type": "object",
            "properties": {
                "numbers": {"type": "array", "items": {"type": "integer"}, "minItems": 1500}
            },
            "required": ["numbers"],
            "additionalProperties": False,
        },
    },
}


def running_now(server: LiveServer) -> float:
    return requests_running(server.base_url, MODEL)


def wait_for(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        time.sleep(0.05)


def test_closing_a_stream_mid_tool_call_frees_the_model(
    sdk: openai.OpenAI, tool_server: LiveServer
) -> None:
    short: dict[str, Any] = {
        "model": MODEL,
        "messages": user("Hi"),
        "max_tokens": 2,
        "temperature": 0,
        "extra_headers": FRESH,
    }
    start = time.perf_counter()
    sdk.chat.completions.create(**short)
    baseline = time.perf_counter() - start
    wait_for(lambda: running_now(tool_server) == 0, 10, "idle before the test")

    with sdk.chat.completions.create(
        model=MODEL,
        messages=user("List numbers."),
        tools=[LONG_TOOL],
        tool_choice=named("record_numbers"),
        max_tokens=3500,
        temperature=0.7,
        stream=True,
        extra_headers=FRESH,
        timeout=120,
    ) as stream:
        for chunk in stream:
            delta = chunk.choices[0].delta if chunk.choices else None
            if delta is not None and delta.tool_calls:
                break  # the call's first delta: its id and name
            # A forced call comes first: text instead means the tools were ignored.
            assert delta is None or not delta.content, f"text before the forced call: {chunk}"
        else:
            raise AssertionError("the stream ended without a tool-call delta")
        # The generation is running (the gauge is sampled once a second).
        wait_for(lambda: running_now(tool_server) == 1, 5, "the tool call running")
    # The stream is closed: the server must stop generating and release the slot.
    wait_for(lambda: running_now(tool_server) == 0, 10, "the slot released after the close")
    start = time.perf_counter()
    sdk.chat.completions.create(**short)
    elapsed = time.perf_counter() - start
    # Had the tool call gone on, the next request would wait for ~3000 more tokens (minutes).
    assert elapsed < max(5.0, 10 * baseline), (elapsed, baseline)
