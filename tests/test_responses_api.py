"""POST /v1/responses with the official openai SDK (`client.responses`) and the real SmolLM2
model: the whole response, the stream's events in order, the SDK's stream helper, a function
call loop (call, function_call_output, answer), `text.format` json_schema, a greedy stream equal
to the whole answer, and 400s in OpenAI's error shape."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import orjson
import pytest

from bench.stub_upstream import StubConfig, StubUpstream
from tests.clients.support import FRESH
from tests.conftest import MODEL
from tests.routing_support import Routed, deployment, routed_app, stubs

pytestmark = pytest.mark.model

CITY: dict[str, Any] = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 16}},
    "required": ["city"],
    "additionalProperties": False,
}
WEATHER: Any = {
    "type": "function",
    "name": "get_weather",
    "description": "Current weather in a city",
    "parameters": CITY,
    "strict": True,
}


def greedy(**kw: Any) -> dict[str, Any]:
    return {
        "model": MODEL,
        "input": "Say hello.",
        "temperature": 0,
        "max_output_tokens": 16,
        "extra_headers": FRESH,
        **kw,
    }


async def test_whole_response_parses_into_the_sdk_model(client: openai.AsyncOpenAI) -> None:
    resp = await client.responses.create(**greedy(instructions="Be brief.", metadata={"k": "v"}))
    assert resp.object == "response" and resp.id.startswith("resp_")
    assert resp.status in ("completed", "incomplete")
    assert resp.output_text
    [item] = resp.output
    assert item.type == "message" and item.id.startswith("msg_") and item.role == "assistant"
    assert resp.usage is not None and resp.usage.input_tokens > 0
    assert resp.usage.total_tokens == resp.usage.input_tokens + resp.usage.output_tokens
    assert resp.instructions == "Be brief." and resp.metadata == {"k": "v"}
    if resp.status == "incomplete":
        assert resp.incomplete_details is not None
        assert resp.incomplete_details.reason == "max_output_tokens"


async def test_stream_events_in_order_and_equal_to_the_whole_answer(
    client: openai.AsyncOpenAI,
) -> None:
    whole = await client.responses.create(**greedy())
    stream = await client.responses.create(**greedy(), stream=True)
    events = [e async for e in stream]
    kinds = [e.type for e in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        f"response.{whole.status}",
    ]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == whole.output_text
    final = events[-1].response  # type: ignore[union-attr]
    assert final.output_text == whole.output_text
    # Counts agree; cached_tokens may not (the second run reuses the first one's prefix).
    assert final.usage is not None and whole.usage is not None
    assert final.usage.output_tokens == whole.usage.output_tokens
    assert final.usage.input_tokens == whole.usage.input_tokens
    assert final.output[0].id == events[2].item.id  # type: ignore[union-attr]


async def test_stream_helper_final_response(client: openai.AsyncOpenAI) -> None:
    # The helper's final response is only a `response.completed` one: room to finish.
    kw = greedy(input="Reply with one word: hi", max_output_tokens=200)
    async with client.responses.stream(**kw) as stream:
        texts = [e.delta async for e in stream if e.type == "response.output_text.delta"]
        final = await stream.get_final_response()
    assert final.status == "completed" and final.output_text == "".join(texts)


@pytest.mark.parametrize(
    ("choice", "echo"),
    [("required", False), ({"type": "function", "name": "get_weather"}, True)],
)
async def test_function_call_loop(client: openai.AsyncOpenAI, choice: Any, echo: bool) -> None:
    """The model calls, is sent the output, answers. `echo`: the SDK's own output items sent
    back as input (`input += response.output`), ids and statuses included."""
    question: list[Any] = [{"role": "user", "content": "What is the weather in Paris?"}]
    first = await client.responses.create(
        model=MODEL,
        input=question,
        tools=[WEATHER],
        tool_choice=choice,
        temperature=0,
        max_output_tokens=200,
        extra_headers=FRESH,
    )
    calls = [o for o in first.output if o.type == "function_call"]
    assert calls and first.status == "completed"
    call = calls[0]
    assert call.name == "get_weather" and call.id.startswith("fc_") and call.call_id
    jsonschema.validate(orjson.loads(call.arguments), CITY)
    answer = await client.responses.create(
        model=MODEL,
        input=[
            *question,
            *(
                first.output
                if echo
                else [
                    {
                        "type": "function_call",
                        "call_id": call.call_id,
                        "name": call.name,
                        "arguments": call.arguments,
                    }
                ]
            ),
            {"type": "function_call_output", "call_id": call.call_id, "output": "Sunny, 21 C"},
        ],
        tools=[WEATHER],
        temperature=0,
        max_output_tokens=48,
        extra_headers=FRESH,
    )
    assert answer.output_text


async def test_function_calls_streamed_equal_whole(client: openai.AsyncOpenAI) -> None:
    # Two cities: this model makes one call per city, so the stream carries two call items.
    kw = greedy(input="Weather in Rome and in Oslo?", tools=[WEATHER], tool_choice="required")
    kw["max_output_tokens"] = 200
    whole = await client.responses.create(**kw)
    events = [e async for e in await client.responses.create(**kw, stream=True)]
    calls = [o for o in whole.output if o.type == "function_call"]
    done = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert len(calls) == len(done) >= 1
    for call, end in zip(calls, done, strict=True):
        deltas = [
            e.delta
            for e in events
            if e.type == "response.function_call_arguments.delta" and e.item_id == end.item_id
        ]
        assert "".join(deltas) == end.arguments == call.arguments
        jsonschema.validate(orjson.loads(call.arguments), CITY)
    final = events[-1].response  # type: ignore[union-attr]
    assert final.status == whole.status == "completed"
    assert [(o.type, o.name, o.arguments) for o in final.output] == [  # type: ignore[union-attr]
        (o.type, o.name, o.arguments)  # type: ignore[union-attr]
        for o in whole.output
    ]
    assert [e.sequence_number for e in events] == list(range(len(events)))


async def test_json_schema_format_yields_valid_json(client: openai.AsyncOpenAI) -> None:
    resp = await client.responses.create(
        model=MODEL,
        input="Name a city.",
        text={"format": {"type": "json_schema", "name": "city", "schema": CITY, "strict": True}},
        temperature=0,
        max_output_tokens=48,
        extra_headers=FRESH,
    )
    jsonschema.validate(orjson.loads(resp.output_text), CITY)
    assert resp.text.format is not None and resp.text.format.type == "json_schema"


async def test_bad_requests_are_400_naming_param(client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as exc:  # stored responses: test_responses_store
        await client.responses.create(model=MODEL, input="hi", previous_response_id="resp_x")
    assert exc.value.body["param"] == "previous_response_id"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as exc:
        await client.responses.create(
            model=MODEL, input="hi", tools=[WEATHER], tool_choice={"type": "function", "name": "x"}
        )
    assert exc.value.body["param"] == "tool_choice"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as exc:
        await client.responses.create(model=MODEL, input="hi", max_output_tokens=0)
    assert exc.value.body["param"] == "max_output_tokens"  # type: ignore[index]


@asynccontextmanager
async def upstream(
    tmp_path: Path, config: StubConfig
) -> AsyncIterator[tuple[StubUpstream, Routed]]:
    """An app whose model `up` is the stub upstream."""
    async with stubs(config) as (stub,):
        model = {"id": "up", "backend": "openai", **deployment(stub)}
        async with routed_app(tmp_path, [model]) as r:
            yield stub, r


async def test_upstream_model_is_sent_the_chat_body(tmp_path: Path) -> None:
    """An upstream speaks chat completions: it is sent the translated chat body, and the record
    (usage, metrics) names the endpoint `responses`."""
    async with upstream(tmp_path, StubConfig(tokens=3, token="ok ")) as (stub, r):
        resp = await r.client.responses.create(
            model="up",
            instructions="Be brief.",
            input=[{"role": "user", "content": [{"type": "input_text", "text": "hi"}]}],
            max_output_tokens=8,
            temperature=0.5,
        )
        # The stub ends every answer with finish_reason `length`.
        assert resp.output_text == "ok ok ok " and resp.status == "incomplete"
        assert resp.incomplete_details is not None
        assert resp.incomplete_details.reason == "max_output_tokens"
        events = [
            e
            async for e in await r.client.responses.create(
                model="up", input="hi", max_output_tokens=8, stream=True
            )
        ]
        assert events[-1].type == "response.incomplete"
        assert events[-1].response.output_text == "ok ok ok "
        assert events[-1].response.usage is not None
        whole, streamed = stub.stats.bodies
        assert whole["messages"] == [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "hi"},
        ]
        assert whole["max_completion_tokens"] == 8 and whole["temperature"] == 0.5
        assert "input" not in whole and "instructions" not in whole
        assert streamed["stream"] is True
        assert [rec.endpoint for rec in r.records] == ["responses", "responses"]


async def test_upstream_dying_mid_stream_ends_with_response_failed(tmp_path: Path) -> None:
    async with upstream(tmp_path, StubConfig(tokens=6, token="ok ", die_after=2)) as (_, r):
        stream = await r.client.responses.create(model="up", input="hi", stream=True)
        events = [e async for e in stream]
    kinds = [e.type for e in events]
    assert kinds[0] == "response.created" and kinds[-1] == "response.failed"
    assert "response.output_text.delta" in kinds
    failed = events[-1].response  # type: ignore[union-attr]
    assert failed.status == "failed" and failed.error is not None and failed.error.message
    assert [e.sequence_number for e in events] == list(range(len(events)))


async def test_cache_serves_a_repeated_greedy_request(client: openai.AsyncOpenAI) -> None:
    kw = {"model": MODEL, "input": "Name a colour.", "temperature": 0, "max_output_tokens": 8}
    first = await client.responses.with_raw_response.create(**kw)
    second = await client.responses.with_raw_response.create(**kw)
    assert second.headers["x-cache"] == "hit"
    assert first.parse().output_text == second.parse().output_text


async def test_unknown_input_item_is_400_naming_input(client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as exc:
        await client.responses.create(
            model=MODEL,
            input=[{"type": "reasoning", "summary": []}],  # type: ignore[list-item]
        )
    assert str(exc.value.body["param"]).startswith("input")  # type: ignore[index]
    # Content parts are text only (images and files are not translated, whatever the model).
    image = {"type": "input_image", "image_url": "data:image/png;base64,AA=="}
    with pytest.raises(openai.BadRequestError) as exc:
        await client.responses.create(
            model=MODEL,
            input=[{"role": "user", "content": [image]}],  # type: ignore[list-item]
        )
    assert str(exc.value.body["param"]).startswith("input[0].content")  # type: ignore[index]


async def test_stream_is_framed_as_named_events_without_done(http: httpx.AsyncClient) -> None:
    """OpenAI's framing: every event has an `event:` line naming its type, then its data; no
    `data: [DONE]` at the end."""
    body = {"model": MODEL, "input": "Hi", "max_output_tokens": 4, "stream": True}
    async with http.stream("POST", "/v1/responses", json=body, headers=FRESH) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        raw = (await resp.aread()).decode()
    events = [e for e in raw.split("\n\n") if e and not e.startswith(":")]
    assert "[DONE]" not in raw
    for i, event in enumerate(events):
        name, data = event.split("\n")
        assert name.startswith("event: ") and data.startswith("data: ")
        payload = orjson.loads(data[len("data: ") :])
        assert payload["type"] == name[len("event: ") :] and payload["sequence_number"] == i
    assert events[-1].startswith("event: response.")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("conversation", "conv_1"),
        ("prompt", {"id": "pmpt_1"}),
        ("background", True),
        ("top_logprobs", 2),
        ("include", ["message.output_text.logprobs"]),
    ],
)
async def test_fields_that_would_change_the_answer_are_400(
    client: openai.AsyncOpenAI, field: str, value: Any
) -> None:
    with pytest.raises(openai.BadRequestError) as exc:
        await client.responses.create(model=MODEL, input="hi", extra_body={field: value})
    assert exc.value.body["param"] == field  # type: ignore[index]


async def test_fields_an_sdk_sends_are_accepted(client: openai.AsyncOpenAI) -> None:
    """What the Agents SDK and others send that changes nothing here is taken, as OpenAI does."""
    resp = await client.responses.create(
        **greedy(max_output_tokens=2),
        include=["reasoning.encrypted_content"],
        truncation="disabled",
        reasoning={"effort": "low"},
        service_tier="auto",
        prompt_cache_key="k",
        safety_identifier="s",
        parallel_tool_calls=True,
        background=False,
        top_logprobs=0,
    )
    assert resp.status in ("completed", "incomplete")
