"""Every body and stream chunk we send for chat, completions, responses (whole, streamed, stored,
input_items), models and errors validates against OpenAI's published OpenAPI description (the
schemas vendored in tests/data/openai_openapi/), taken from the running app: the real model,
the response cache, a stub upstream, the limiter."""

from __future__ import annotations

import copy
import json
from functools import cache
from pathlib import Path
from typing import Any

import httpx
import pytest
from jsonschema import Draft202012Validator

from bench.stub_upstream import StubConfig
from tests.conftest import MODEL, create_account
from tests.rate_limit.conftest import limits_on
from tests.routing_support import routed_app, stubs

SCHEMAS = Path(__file__).parent / "data" / "openai_openapi" / "schemas.json"
NO_CACHE = {"Cache-Control": "no-cache, no-store"}


def _nullable(node: Any) -> Any:
    """OpenAPI 3.0's `nullable: true` (a few stream schemas still use it) as JSON Schema's
    "or null"; every other keyword is JSON Schema 2020-12 already (OpenAPI 3.1)."""
    if isinstance(node, list):
        return [_nullable(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = {k: _nullable(v) for k, v in node.items() if k != "nullable"}
    if node.get("nullable") is True:
        if isinstance(out.get("enum"), list):
            out["enum"] = [*out["enum"], None]
        return {"anyOf": [out, {"type": "null"}]}
    return out


@cache
def _components() -> dict[str, Any]:
    return _nullable(json.loads(SCHEMAS.read_text())["components"])


@cache
def validator(name: str, *, completion_stream: bool = False) -> Draft202012Validator:
    components = copy.deepcopy(_components())
    if completion_stream:
        # The spec gives streamed completions the response schema, whose finish_reason is never
        # null; OpenAI itself sends null on every chunk but a choice's last (as chat chunks do).
        choice = components["schemas"]["CreateCompletionResponse"]["properties"]["choices"]
        reason = choice["items"]["properties"]["finish_reason"]
        choice["items"]["properties"]["finish_reason"] = {"anyOf": [reason, {"type": "null"}]}
    schema = {"$ref": f"#/components/schemas/{name}", "components": components}
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


def conforms(body: Any, name: str, **kw: bool) -> None:
    errors = [
        f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
        for e in validator(name, **kw).iter_errors(body)
    ]
    assert not errors, f"{name}: {errors} in {body}"


def sse_chunks(text: str) -> list[Any]:
    events = [e for e in text.split("\n\n") if e.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    return [json.loads(e.removeprefix("data: ")) for e in events[:-1]]


def chat_body(**kw: Any) -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Say hi"}],
        "max_tokens": 4,
        **kw,
    }


def completion_body(**kw: Any) -> dict[str, Any]:
    return {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 4, **kw}


def test_vendored_schemas_are_valid() -> None:
    for name in ("CreateChatCompletionResponse", "CreateChatCompletionStreamResponse"):
        validator(name)
    # The checks can fail: OpenAI's required keys are enforced.
    with pytest.raises(AssertionError, match="refusal"):
        conforms(
            {
                "id": "x",
                "object": "chat.completion",
                "created": 0,
                "model": "m",
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "hi"},
                        "finish_reason": "stop",
                        "logprobs": None,
                    }
                ],
            },
            "CreateChatCompletionResponse",
        )
    with pytest.raises(AssertionError, match="system_fingerprint"):
        conforms(
            {"id": "x", "object": "text_completion", "created": 0, "model": "m", "choices": []}
            | {"system_fingerprint": None},
            "CreateCompletionResponse",
        )


async def test_chat_completion(http: httpx.AsyncClient) -> None:
    r = await http.post("/v1/chat/completions", json=chat_body(n=2), headers=NO_CACHE)
    assert r.status_code == 200, r.text
    body = r.json()
    conforms(body, "CreateChatCompletionResponse")
    assert body["system_fingerprint"].startswith("fp_")
    assert all(c["message"]["refusal"] is None for c in body["choices"])


async def test_chat_stream_chunks(http: httpx.AsyncClient) -> None:
    body = chat_body(n=2, stream=True, stream_options={"include_usage": True})
    r = await http.post("/v1/chat/completions", json=body, headers=NO_CACHE)
    assert r.status_code == 200, r.text
    chunks = sse_chunks(r.text)
    for chunk in chunks:
        conforms(chunk, "CreateChatCompletionStreamResponse")
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] > 0
    assert {c["choices"][0]["index"] for c in chunks[:-1]} == {0, 1}
    assert {c["system_fingerprint"] for c in chunks} == {chunks[0]["system_fingerprint"]}


async def test_cached_chat_answers(http: httpx.AsyncClient) -> None:
    """Answers from the response cache are built apart from the model's; they conform too."""
    body = chat_body(temperature=0, messages=[{"role": "user", "content": "Name a colour"}])
    for _ in range(2):
        r = await http.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        conforms(r.json(), "CreateChatCompletionResponse")
    assert r.headers["x-cache"] == "hit"
    r = await http.post("/v1/chat/completions", json=body | {"stream": True})
    assert r.headers["x-cache"] == "hit"
    for chunk in sse_chunks(r.text):
        conforms(chunk, "CreateChatCompletionStreamResponse")


async def test_completion(http: httpx.AsyncClient) -> None:
    r = await http.post("/v1/completions", json=completion_body(), headers=NO_CACHE)
    assert r.status_code == 200, r.text
    conforms(r.json(), "CreateCompletionResponse")
    assert r.json()["system_fingerprint"].startswith("fp_")


async def test_completion_stream_chunks(http: httpx.AsyncClient) -> None:
    body = completion_body(stream=True, stream_options={"include_usage": True})
    r = await http.post("/v1/completions", json=body, headers=NO_CACHE)
    assert r.status_code == 200, r.text
    chunks = sse_chunks(r.text)
    for chunk in chunks:
        conforms(chunk, "CreateCompletionResponse", completion_stream=True)
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] > 0
    assert all("usage" not in c for c in chunks[:-1])


async def test_models(http: httpx.AsyncClient) -> None:
    r = await http.get("/v1/models")
    assert r.status_code == 200
    conforms(r.json(), "ListModelsResponse")
    r = await http.get(f"/v1/models/{MODEL}")
    assert r.status_code == 200
    conforms(r.json(), "Model")


async def test_error_bodies(app: Any, http: httpx.AsyncClient, tmp_path: Path) -> None:
    seen = {}
    r = await http.post("/v1/chat/completions", json=chat_body(temperature=5))
    seen[r.status_code] = r.json()
    r = await http.post("/v1/chat/completions", json=chat_body(), headers={"Authorization": ""})
    seen[r.status_code] = r.json()
    r = await http.get("/v1/models/no-such-model")
    seen[r.status_code] = r.json()
    r = await http.delete("/v1/chat/completions")
    seen[r.status_code] = r.json()
    too_big = app.state.llm_api.settings.max_body_bytes + 1
    r = await http.post("/v1/chat/completions", content=b"x" * too_big)
    seen[r.status_code] = r.json()
    async with limits_on(app, tmp_path, tiers={"free": {"requests_per_minute": 1}}):
        acct = await create_account(app)
        for _ in range(2):
            r = await http.post("/v1/chat/completions", json=chat_body(), headers=acct.headers)
        seen[r.status_code] = r.json()
    assert sorted(seen) == [400, 401, 404, 405, 413, 429]
    for body in seen.values():
        conforms(body, "ErrorResponse")


async def test_upstream_model(tmp_path: Path) -> None:
    """Through an OpenAI-compatible upstream: our shapes, not the upstream's, reach the client."""
    async with stubs(StubConfig(tokens=3)) as (stub,):
        models = [{"id": "up", "backend": "openai", "base_url": stub.base_url}]
        async with routed_app(tmp_path, models) as r:
            body = chat_body(model="up")
            got = await r.http.post("/v1/chat/completions", json=body)
            conforms(got.json(), "CreateChatCompletionResponse")
            stream = body | {"stream": True, "stream_options": {"include_usage": True}}
            got = await r.http.post("/v1/chat/completions", json=stream)
            for chunk in sse_chunks(got.text):
                conforms(chunk, "CreateChatCompletionStreamResponse")
            got = await r.http.post("/v1/completions", json=completion_body(model="up"))
            conforms(got.json(), "CreateCompletionResponse")
            got = await r.http.get("/v1/models/up")
            conforms(got.json(), "Model")
            # An upstream that dies mid-stream: the error travels in-band, in the same shape.
            stub.config.die_after = 1
            got = await r.http.post("/v1/chat/completions", json=stream)
            events = [e for e in got.text.split("\n\n") if e.startswith("data: {")]
            error = json.loads(events[-1].removeprefix("data: "))
            conforms(error, "ErrorResponse")


# --- tools, logprobs, prompt details and upstream extras, end to end ----------------------------

CITY_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 16}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}


async def test_local_tool_call(http: httpx.AsyncClient) -> None:
    """A call forced by `tool_choice: required`: the whole message and every chunk (the call's
    first delta with id and name, the argument pieces, the finish chunk) as the spec has them."""
    body = chat_body(
        messages=[{"role": "user", "content": "Weather in Paris?"}],
        tools=[CITY_TOOL],
        tool_choice="required",
        parallel_tool_calls=False,
        temperature=0,
        max_tokens=200,
    )
    r = await http.post("/v1/chat/completions", json=body, headers=NO_CACHE)
    assert r.status_code == 200, r.text
    whole = r.json()
    conforms(whole, "CreateChatCompletionResponse")
    [choice] = whole["choices"]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] is None
    assert [c["function"]["name"] for c in choice["message"]["tool_calls"]] == ["get_weather"]

    stream = body | {"stream": True, "stream_options": {"include_usage": True}}
    r = await http.post("/v1/chat/completions", json=stream, headers=NO_CACHE)
    assert r.status_code == 200, r.text
    chunks = sse_chunks(r.text)
    for chunk in chunks:
        conforms(chunk, "CreateChatCompletionStreamResponse")
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    pieces = [p for d in deltas for p in d.get("tool_calls", [])]
    assert pieces[0]["id"] and pieces[0]["function"]["name"] == "get_weather"
    arguments = "".join(p["function"]["arguments"] for p in pieces)
    assert arguments == choice["message"]["tool_calls"][0]["function"]["arguments"]
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "tool_calls"
    assert chunks[-1]["usage"]["completion_tokens"] == whole["usage"]["completion_tokens"]


async def test_chat_logprobs(http: httpx.AsyncClient) -> None:
    body = chat_body(logprobs=True, top_logprobs=3, temperature=0)
    r = await http.post("/v1/chat/completions", json=body, headers=NO_CACHE)
    assert r.status_code == 200, r.text
    whole = r.json()
    conforms(whole, "CreateChatCompletionResponse")
    content = whole["choices"][0]["logprobs"]["content"]
    assert len(content) == whole["usage"]["completion_tokens"]
    assert all(len(t["top_logprobs"]) == 3 for t in content)

    r = await http.post("/v1/chat/completions", json=body | {"stream": True}, headers=NO_CACHE)
    assert r.status_code == 200, r.text
    chunks = sse_chunks(r.text)
    for chunk in chunks:
        conforms(chunk, "CreateChatCompletionStreamResponse")
    streamed = [
        t for c in chunks for ch in c["choices"] for t in (ch["logprobs"] or {}).get("content", [])
    ]
    assert streamed == content


async def test_completion_logprobs(http: httpx.AsyncClient) -> None:
    body = completion_body(logprobs=2, temperature=0)
    r = await http.post("/v1/completions", json=body, headers=NO_CACHE)
    assert r.status_code == 200, r.text
    whole = r.json()
    conforms(whole, "CreateCompletionResponse")
    lps = whole["choices"][0]["logprobs"]
    assert len(lps["tokens"]) == whole["usage"]["completion_tokens"]
    assert "".join(lps["tokens"]) == whole["choices"][0]["text"]
    assert all(len(alts) == 2 for alts in lps["top_logprobs"])

    r = await http.post("/v1/completions", json=body | {"stream": True}, headers=NO_CACHE)
    assert r.status_code == 200, r.text
    chunks = sse_chunks(r.text)
    joined: dict[str, list[Any]] = {k: [] for k in lps}
    for chunk in chunks:
        conforms(chunk, "CreateCompletionResponse", completion_stream=True)
        for choice in chunk["choices"]:
            for key, values in (choice["logprobs"] or {}).items():
                joined[key].extend(values)
    assert joined == lps


# Long enough that the second request's prompt is mostly a reused prefix.
SYSTEM = " ".join(["You answer questions for a public library; be polite, precise and brief."] * 6)


async def test_usage_with_prompt_details(http: httpx.AsyncClient) -> None:
    """`stream_options.include_usage` on a request whose prompt prefix was reused: the usage
    chunk carries `prompt_tokens_details.cached_tokens`, as the spec has it."""
    usages = []
    for question in ("Where are the atlases?", "When do you open on Sundays?"):
        body = chat_body(
            messages=[
                {"role": "system", "content": SYSTEM},
                {"role": "user", "content": question},
            ],
            stream=True,
            stream_options={"include_usage": True},
        )
        r = await http.post("/v1/chat/completions", json=body, headers=NO_CACHE)
        assert r.status_code == 200, r.text
        chunks = sse_chunks(r.text)
        for chunk in chunks:
            conforms(chunk, "CreateChatCompletionStreamResponse")
        usages.append(chunks[-1]["usage"])
    assert usages[1]["prompt_tokens_details"]["cached_tokens"] > 0, usages


TOOL_ID = "call_up_1"
UPSTREAM_TOOL_STREAM = b"".join(
    b"data: " + json.dumps(c).encode() + b"\n\n"
    for c in [
        {"role": "assistant", "content": None, "refusal": None},
        {"reasoning_content": "The user wants "},
        {"reasoning_content": "the weather."},
        {
            "tool_calls": [
                {
                    "index": 0,
                    "id": TOOL_ID,
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": ""},
                }
            ]
        },
        {"tool_calls": [{"index": 0, "function": {"arguments": '{"city": '}}]},
        {"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]},
        {"refusal": "Partly"},
        {"refusal": " declined."},
    ]
    for c in [
        {
            "id": "chatcmpl-up",
            "object": "chat.completion.chunk",
            "created": 1,
            "model": "up-model",
            "choices": [{"index": 0, "delta": c, "logprobs": None, "finish_reason": None}],
        }
    ]
) + (
    b'data: {"id":"chatcmpl-up","object":"chat.completion.chunk","created":1,"model":"up-model",'
    b'"choices":[{"index":0,"delta":{},"logprobs":null,"finish_reason":"tool_calls"}]}\n\n'
    b'data: {"id":"chatcmpl-up","object":"chat.completion.chunk","created":1,"model":"up-model",'
    b'"choices":[],"usage":{"prompt_tokens":9,"completion_tokens":7,"total_tokens":16,'
    b'"prompt_tokens_details":{"cached_tokens":4,"audio_tokens":0},'
    b'"completion_tokens_details":{"reasoning_tokens":3}}}\n\n'
    b"data: [DONE]\n\n"
)
UPSTREAM_TOOL_ANSWER = {
    "id": "chatcmpl-up",
    "object": "chat.completion",
    "created": 1,
    "model": "up-model",
    "choices": [
        {
            "index": 0,
            "message": {
                "role": "assistant",
                "content": None,
                "refusal": "Partly declined.",
                "reasoning_content": "The user wants the weather.",
                "tool_calls": [
                    {
                        "id": TOOL_ID,
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                    }
                ],
            },
            "logprobs": None,
            "finish_reason": "tool_calls",
        }
    ],
    "usage": {
        "prompt_tokens": 9,
        "completion_tokens": 7,
        "total_tokens": 16,
        "prompt_tokens_details": {"cached_tokens": 4, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 3},
    },
}


async def test_upstream_tool_call_with_extras(tmp_path: Path) -> None:
    """An upstream's tool call with reasoning and a refusal, relayed: what reaches the client
    conforms, streamed and whole, and keeps the call, the extras and the usage details."""
    config = StubConfig(script=UPSTREAM_TOOL_STREAM, answer=UPSTREAM_TOOL_ANSWER)
    async with stubs(config) as (stub,):
        models = [{"id": "up", "backend": "openai", "base_url": stub.base_url}]
        async with routed_app(tmp_path, models) as r:
            body = chat_body(model="up", tools=[CITY_TOOL], tool_choice="required", max_tokens=32)
            stream = body | {"stream": True, "stream_options": {"include_usage": True}}
            got = await r.http.post("/v1/chat/completions", json=stream, headers=NO_CACHE)
            assert got.status_code == 200, got.text
            chunks = sse_chunks(got.text)
            for chunk in chunks:
                conforms(chunk, "CreateChatCompletionStreamResponse")
            deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
            pieces = [p for d in deltas for p in d.get("tool_calls", [])]
            assert pieces[0]["id"] == TOOL_ID
            assert "".join(p["function"]["arguments"] for p in pieces) == '{"city": "Paris"}'
            assert "".join(d.get("reasoning_content", "") for d in deltas) == (
                "The user wants the weather."
            )
            assert "".join(d.get("refusal") or "" for d in deltas) == "Partly declined."
            usage = chunks[-1]["usage"]
            assert usage["prompt_tokens_details"] == {"cached_tokens": 4, "audio_tokens": 0}
            assert usage["completion_tokens_details"] == {"reasoning_tokens": 3}

            got = await r.http.post("/v1/chat/completions", json=body, headers=NO_CACHE)
            assert got.status_code == 200, got.text
            whole = got.json()
            conforms(whole, "CreateChatCompletionResponse")
            message = whole["choices"][0]["message"]
            assert (
                message["tool_calls"]
                == UPSTREAM_TOOL_ANSWER["choices"][0]["message"][  # type: ignore[index]
                    "tool_calls"
                ]
            )
            assert message["refusal"] == "Partly declined."
            assert message["reasoning_content"] == "The user wants the weather."
            assert whole["choices"][0]["finish_reason"] == "tool_calls"
            # The upstream's usage verbatim, plus our `cost` (an unpriced model: 0).
            assert whole["usage"] == {**UPSTREAM_TOOL_ANSWER["usage"], "cost": 0.0}  # type: ignore[dict-item]

            # Replayed from the response cache (deterministic: temperature 0), streamed and
            # whole: the same call, extras and usage details, in the same shapes.
            cached = body | {"temperature": 0}
            for _ in range(2):
                got = await r.http.post("/v1/chat/completions", json=cached)
            assert got.headers["x-cache"] == "hit"
            conforms(got.json(), "CreateChatCompletionResponse")
            assert got.json()["choices"] == whole["choices"]
            assert got.json()["usage"] == whole["usage"]
            got = await r.http.post("/v1/chat/completions", json=cached | stream)
            assert got.headers["x-cache"] == "hit"
            replayed = sse_chunks(got.text)
            for chunk in replayed:
                conforms(chunk, "CreateChatCompletionStreamResponse")
            deltas = [c["choices"][0]["delta"] for c in replayed if c["choices"]]
            pieces = [p for d in deltas for p in d.get("tool_calls", [])]
            assert pieces[0]["id"] == TOOL_ID
            assert "".join(p["function"]["arguments"] for p in pieces) == '{"city": "Paris"}'
            assert "".join(d.get("reasoning_content", "") for d in deltas) == (
                "The user wants the weather."
            )
            assert "".join(d.get("refusal") or "" for d in deltas) == "Partly declined."
            assert replayed[-1]["usage"] == usage


# --- the Responses API ----------------------------------------------------------------------------

RESPONSE_EVENTS = {
    "response.created": "ResponseCreatedEvent",
    "response.in_progress": "ResponseInProgressEvent",
    "response.output_item.added": "ResponseOutputItemAddedEvent",
    "response.content_part.added": "ResponseContentPartAddedEvent",
    "response.output_text.delta": "ResponseTextDeltaEvent",
    "response.output_text.done": "ResponseTextDoneEvent",
    "response.content_part.done": "ResponseContentPartDoneEvent",
    "response.output_item.done": "ResponseOutputItemDoneEvent",
    "response.function_call_arguments.delta": "ResponseFunctionCallArgumentsDeltaEvent",
    "response.function_call_arguments.done": "ResponseFunctionCallArgumentsDoneEvent",
    "response.completed": "ResponseCompletedEvent",
    "response.incomplete": "ResponseIncompleteEvent",
    "response.failed": "ResponseFailedEvent",
}
RESPONSES_TOOL = {
    "type": "function",
    "name": "get_weather",
    "description": "Current weather in a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 16}},
        "required": ["city"],
        "additionalProperties": False,
    },
    "strict": True,
}


def named_events(text: str) -> list[Any]:
    """The Responses API's stream: `event:` and `data:` lines per event, no `[DONE]`."""
    events = [e for e in text.split("\n\n") if e.startswith("event: ")]
    return [json.loads(e.split("\n", 1)[1].removeprefix("data: ")) for e in events]


def events_conform(text: str) -> list[Any]:
    events = named_events(text)
    for event in events:
        conforms(event, RESPONSE_EVENTS[event["type"]])
    return events


@pytest.mark.parametrize(
    "extra",
    [{}, {"tools": [RESPONSES_TOOL], "tool_choice": "required", "max_output_tokens": 200}],
    ids=["text", "function_call"],
)
async def test_responses_whole_streamed_stored_and_listed(
    http: httpx.AsyncClient, extra: dict[str, Any]
) -> None:
    body = {"model": MODEL, "input": "Weather in Paris?", "max_output_tokens": 4, **extra}
    body |= {"instructions": "Be brief.", "metadata": {"k": "v"}, "parallel_tool_calls": False}
    r = await http.post("/v1/responses", json=body, headers=NO_CACHE)
    assert r.status_code == 200, r.text
    whole = r.json()
    conforms(whole, "Response")
    stored = await http.get(f"/v1/responses/{whole['id']}")
    assert stored.status_code == 200 and stored.json() == whole
    items = await http.get(f"/v1/responses/{whole['id']}/input_items")
    conforms(items.json(), "ResponseItemList")
    chained = {**body, "previous_response_id": whole["id"], "input": "And now?"}
    r = await http.post("/v1/responses", json=chained | {"tool_choice": "none"}, headers=NO_CACHE)
    assert r.status_code == 200, r.text
    conforms(r.json(), "Response")
    items = await http.get(f"/v1/responses/{r.json()['id']}/input_items?order=asc&limit=2")
    conforms(items.json(), "ResponseItemList")
    r = await http.post("/v1/responses", json={**body, "stream": True}, headers=NO_CACHE)
    assert r.status_code == 200, r.text
    events = events_conform(r.text)
    assert events[-1]["type"] in ("response.completed", "response.incomplete")


async def test_responses_failed_stream(tmp_path: Path) -> None:
    async with stubs(StubConfig(tokens=6, token="ok ", die_after=2)) as (stub,):
        model = {"id": "up", "backend": "openai", "base_url": stub.base_url}
        async with routed_app(tmp_path, [model]) as r:
            body = {"model": "up", "input": "hi", "stream": True}
            resp = await r.http.post("/v1/responses", json=body)
    events = events_conform(resp.text)
    assert events[-1]["type"] == "response.failed"
