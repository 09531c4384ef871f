"""Tool calling through HTTP with the official openai SDK and the real SmolLM2 model, for what
tests/clients does not already cover: parallel calls streamed and whole, `parallel_tool_calls:
false`, `tool_choice: none`, a tool result sent back as the SDK's own message objects, and a
400 naming `tools` for a model that does not declare the capability. (Named and single
`required` calls, streamed against whole, are in tests/clients/test_tool_clients.py.)"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jsonschema
import openai
import orjson
import pytest

from bench.stub_upstream import StubConfig
from tests.clients.support import (
    FRESH,
    assert_fresh_ids,
    streamed_calls,
    whole_calls,
    without_ids,
)
from tests.conftest import MODEL
from tests.routing_support import routed_app, stubs

pytestmark = pytest.mark.model

CITY_PARAMETERS: dict[str, Any] = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 16}},
    "required": ["city"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": CITY_PARAMETERS,
    },
}
TWO_CITIES: list[Any] = [{"role": "user", "content": "What is the weather in Paris and in Rome?"}]


def city(call: dict[str, Any]) -> str:
    """The call's `city`, once its arguments are checked against the tool's schema."""
    args = orjson.loads(call["arguments"])
    jsonschema.validate(args, CITY_PARAMETERS)
    assert call["name"] == "get_weather"
    return str(args["city"])


def request(**kw: Any) -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": TWO_CITIES,
        "tools": [WEATHER],
        "temperature": 0,
        "seed": 5,
        "max_tokens": 200,
        "extra_headers": FRESH,
        **kw,
    }


async def chunks_of(client: openai.AsyncOpenAI, **kw: Any) -> list[Any]:
    stream = await client.chat.completions.create(**kw, stream=True)
    return [c async for c in stream]


async def test_parallel_calls_streamed_reassemble_to_the_whole_answer(
    client: openai.AsyncOpenAI,
) -> None:
    kw = request(tool_choice="required", parallel_tool_calls=True)
    whole = whole_calls(await client.chat.completions.create(**kw))
    streamed = streamed_calls(await chunks_of(client, **kw))
    # Two cities asked about: this model calls once per city when it may call more than once.
    assert [c["index"] for c in whole] == [0, 1]
    assert [city(c) for c in whole] == ["Paris", "Rome"]
    assert_fresh_ids(whole)
    assert_fresh_ids(streamed)
    assert without_ids(streamed) == without_ids(whole)


async def test_parallel_tool_calls_false_makes_one_call(client: openai.AsyncOpenAI) -> None:
    kw = request(tool_choice="required", parallel_tool_calls=False)
    answer = await client.chat.completions.create(**kw)
    whole = whole_calls(answer)
    chunks = await chunks_of(client, **kw, stream_options={"include_usage": True})
    streamed = streamed_calls(chunks)
    assert len(whole) == 1 and city(whole[0]) == "Paris"
    assert without_ids(streamed) == without_ids(whole)
    # Generation stops after the call, and the usage is reported in full all the same.
    for usage in (answer.usage, chunks[-1].usage):
        assert usage is not None and usage.prompt_tokens_details is not None, usage
        assert isinstance(usage.prompt_tokens_details.cached_tokens, int)


async def test_tool_choice_none_answers_with_text(client: openai.AsyncOpenAI) -> None:
    kw = request(tool_choice="none", max_tokens=24)
    answer = await client.chat.completions.create(**kw)
    choice = answer.choices[0]
    assert choice.message.tool_calls is None
    assert choice.message.content and choice.finish_reason in ("stop", "length")
    chunks = await chunks_of(client, **kw)
    assert not any(c.choices and c.choices[0].delta.tool_calls for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content


async def test_a_tool_result_round_trip(client: openai.AsyncOpenAI) -> None:
    """The SDK's assistant message object goes back as it came (with its `refusal` and other
    fields), then a `tool` message for its call; the model answers from the result."""
    first = await client.chat.completions.create(
        **request(tool_choice="required", parallel_tool_calls=False)
    )
    message = first.choices[0].message
    [call] = message.tool_calls or []
    messages: list[Any] = [
        *TWO_CITIES,
        message,
        {"role": "tool", "tool_call_id": call.id, "content": "21 C and sunny"},
    ]
    second = await client.chat.completions.create(
        **request(messages=messages, tool_choice="none", max_tokens=60)
    )
    choice = second.choices[0]
    assert choice.message.tool_calls is None and choice.finish_reason == "stop"
    assert choice.message.content and "21" in choice.message.content, choice.message.content
    # The call and its result are in the prompt the model read.
    without = await client.chat.completions.create(**request(tool_choice="none", max_tokens=1))
    assert second.usage is not None and without.usage is not None
    assert second.usage.prompt_tokens > without.usage.prompt_tokens + 10


async def test_a_model_without_tools_refuses_them(tmp_path: Path) -> None:
    async with stubs(StubConfig(tokens=2)) as (stub,):
        entry = {"backend": "openai", "base_url": stub.base_url, "capabilities": ["logprobs"]}
        async with routed_app(tmp_path, [{"id": "no-tools", **entry}]) as r:
            refused: list[tuple[dict[str, Any], str]] = [
                ({"tools": [WEATHER]}, "tools"),
                ({"tools": [WEATHER], "tool_choice": "required"}, "tools"),
                ({"tool_choice": "auto"}, "tool_choice"),
            ]
            for kw, param in refused:
                with pytest.raises(openai.BadRequestError) as error:
                    await r.client.chat.completions.create(
                        model="no-tools", messages=TWO_CITIES, max_tokens=2, **kw
                    )
                assert error.value.param == param
                assert error.value.code == "unsupported_parameter"
            assert stub.stats.requests == 0
            # Without tools (or with them forbidden) the model answers.
            ok = await r.client.chat.completions.create(
                model="no-tools", messages=TWO_CITIES, max_tokens=2, tool_choice="none"
            )
            assert ok.choices[0].message.content
