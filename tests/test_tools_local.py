"""Tool calls on the local model (issue 23, point 2), driven at the backend: `required` and
named calls are grammar-constrained, so their arguments parse and match the tool's schema
whatever the 135M model would have written; `auto` engages that grammar once the model opens a
call; calls stream as deltas; history with calls and results renders; a cancelled call frees
its slot. Both local engines (batched and one-at-a-time) are exercised."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import jsonschema
import pytest

from llm_api.core.exceptions import InvalidRequestError
from llm_api.services.llm.backends.llama_batched import LlamaBatchedBackend
from llm_api.services.llm.backends.llama_cpp import LlamaCppBackend
from llm_api.services.llm.registry import builtin_registry
from llm_api.services.llm.tools.parser import InvalidToolCallError
from llm_api.services.llm.tools.prompt import CALL_CLOSE, CALL_HEAD
from llm_api.services.llm.types import (
    Frame,
    GenerationRequest,
    Message,
    SamplingParams,
    ToolCall,
    ToolSpec,
)

pytestmark = pytest.mark.model

THREADS = 2
WEATHER = ToolSpec(
    name="get_weather",
    description="Current weather in a city.",
    parameters={
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 40},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        },
        "required": ["city", "unit"],
        "additionalProperties": False,
    },
)
SCHEMAS: dict[str, dict[str, Any]] = {
    "nested": {
        "type": "object",
        "properties": {
            "user": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "maxLength": 20},
                    "address": {
                        "type": "object",
                        "properties": {"zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                        "required": ["zip"],
                    },
                },
                "required": ["name", "address"],
            }
        },
        "required": ["user"],
    },
    "enum": {
        "type": "object",
        "properties": {"color": {"enum": ["red", "green", "blue"]}},
        "required": ["color"],
    },
    "array": {
        "type": "object",
        "properties": {
            "tags": {
                "type": "array",
                "items": {"type": "string", "maxLength": 10},
                "minItems": 1,
                "maxItems": 3,
            }
        },
        "required": ["tags"],
    },
    "number": {
        "type": "object",
        "properties": {
            "amount": {"type": "number", "minimum": 0, "maximum": 100},
            "count": {"type": "integer"},
        },
        "required": ["amount", "count"],
    },
}


@pytest.fixture(scope="module")
async def batched() -> AsyncIterator[LlamaBatchedBackend]:
    config = (
        builtin_registry()
        .models[0]
        .model_copy(update={"id": "tools-batched", "slots": 4, "context_length": 2048})
    )
    backend = LlamaBatchedBackend(config, threads=THREADS)
    await backend.start(warmup=False)
    yield backend
    await backend.aclose()


@pytest.fixture(scope="module")
async def simple() -> AsyncIterator[LlamaCppBackend]:
    config = (
        builtin_registry()
        .models[0]
        .model_copy(update={"id": "tools-simple", "engine": "simple", "context_length": 2048})
    )
    backend = LlamaCppBackend(config, threads=THREADS)
    await backend.start(warmup=False)
    yield backend
    await backend.aclose()


def _request(
    content: str,
    tools: list[ToolSpec],
    *,
    choice: str = "required",
    name: str | None = None,
    parallel: bool = True,
    seed: int = 1,
    temperature: float = 0.7,
    max_tokens: int = 400,
    history: list[Message] | None = None,
) -> GenerationRequest:
    return GenerationRequest(
        request_id="tools-test",
        model="smollm2",
        params=SamplingParams(
            max_tokens=max_tokens, temperature=temperature, top_p=0.95, seed=seed
        ),
        messages=[*(history or []), Message("user", content)],
        tools=tools,
        tool_choice=choice,  # type: ignore[arg-type]
        tool_name=name,
        parallel_tool_calls=parallel,
    )


async def _collect(backend: Any, request: GenerationRequest) -> list[Frame]:
    await backend.prepare(request)
    return [f async for f in backend.generate(request)]


def _calls(frames: list[Frame]) -> list[dict[str, str]]:
    """Reassemble streamed deltas, checking OpenAI's streaming shape on the way."""
    calls: dict[int, dict[str, str]] = {}
    for frame in frames:
        for d in frame.tool_calls or []:
            if d.index not in calls:
                assert d.index == len(calls), "calls are numbered 0, 1, ... in order"
                assert d.id and d.id.startswith("call_") and d.name, "id and name come first"
                calls[d.index] = {"id": d.id, "name": d.name, "arguments": ""}
            else:
                assert d.id is None and d.name is None
            calls[d.index]["arguments"] += d.arguments
    return [calls[i] for i in sorted(calls)]


def _check(frames: list[Frame], tools: list[ToolSpec]) -> list[dict[str, str]]:
    calls = _calls(frames)
    assert calls, "a required call was made"
    assert frames[-1].finish_reason == "tool_calls"
    by_name = {t.name: t for t in tools}
    for call in calls:
        jsonschema.validate(json.loads(call["arguments"]), by_name[call["name"]].parameters)
    assert "<tool_call>" not in "".join(f.text for f in frames)
    assert sum(f.tokens for f in frames) == frames[-1].completion_tokens
    return calls


@pytest.mark.parametrize("kind", sorted(SCHEMAS))
@pytest.mark.parametrize("seed", [1, 2])
async def test_required_call_matches_each_schema(
    batched: LlamaBatchedBackend, kind: str, seed: int
) -> None:
    tool = ToolSpec(name=f"record_{kind}", parameters=SCHEMAS[kind])
    request = _request("Record something for me.", [tool], seed=seed, parallel=False)
    calls = _check(await _collect(batched, request), [tool])
    assert [c["name"] for c in calls] == [tool.name]


async def test_named_function_is_the_one_called(batched: LlamaBatchedBackend) -> None:
    tools = [WEATHER, ToolSpec(name="record_enum", parameters=SCHEMAS["enum"])]
    request = _request(
        "What is the weather in Paris?", tools, choice="function", name="record_enum"
    )
    calls = _check(await _collect(batched, request), tools)
    assert [c["name"] for c in calls] == ["record_enum"]  # one call: named means one


async def test_the_one_at_a_time_engine_makes_the_same_call(
    batched: LlamaBatchedBackend, simple: LlamaCppBackend
) -> None:
    """Same grammar, same sampler chain and seed: both engines write the same call, which also
    checks the one-at-a-time engine's grammar path."""
    out = []
    for backend in (batched, simple):
        request = _request("Weather in Oslo, in celsius?", [WEATHER], seed=7)
        calls = _check(await _collect(backend, request), [WEATHER])
        out.append([(c["name"], c["arguments"]) for c in calls])
    assert out[0] == out[1]


async def test_streamed_arguments_are_the_text_the_model_wrote(
    batched: LlamaBatchedBackend,
) -> None:
    """The deltas reassemble to exactly what the model generated (the raw frames of the same
    seeded request, before parsing): nothing lost, reordered or re-serialised; and arguments
    arrive in several pieces, not held back to the end."""
    tool = ToolSpec(name="record_nested", parameters=SCHEMAS["nested"])
    parsed = await _collect(batched, _request("Record a user.", [tool], seed=3))
    raw_request = _request("Record a user.", [tool], seed=3)
    await batched.prepare(raw_request)
    raw = "".join([f.text async for f in batched._generate(raw_request)])
    calls = _check(parsed, [tool])
    expected = "\n".join(
        f'{CALL_HEAD}"{c["name"]}", "arguments": {c["arguments"]}}}\n{CALL_CLOSE}' for c in calls
    )
    assert raw == expected
    pieces = [d for f in parsed for d in f.tool_calls or [] if d.arguments]
    assert len(pieces) > 3


async def test_parallel_calls_are_indexed_and_single_call_when_off(
    batched: LlamaBatchedBackend,
) -> None:
    tools = [WEATHER, ToolSpec(name="record_enum", parameters=SCHEMAS["enum"])]
    prompt = "Get the weather in Paris and in London, then record the color red."
    counts = []
    for seed in range(1, 4):
        calls = _check(await _collect(batched, _request(prompt, tools, seed=seed)), tools)
        counts.append(len(calls))
        single = await _collect(batched, _request(prompt, tools, seed=seed, parallel=False))
        assert len(_check(single, tools)) == 1
    assert max(counts) >= 2, f"no seed made parallel calls: {counts}"


async def test_auto_engages_the_grammar_once_the_model_calls(
    batched: LlamaBatchedBackend, simple: LlamaCppBackend
) -> None:
    """`auto`: the model may answer or call; this three-shot history makes the 135M model call
    greedily. Its examples all say `celsius`, but the tool now only takes `kelvin`: the call
    says `kelvin` only because the grammar engaged once the model wrote `<tool_call>`."""
    kelvin = ToolSpec(
        name="get_weather",
        parameters={
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"enum": ["kelvin"]}},
            "required": ["city", "unit"],
        },
    )
    history: list[Message] = []
    for i, city in enumerate(["Rome", "Berlin", "Madrid"]):
        args = json.dumps({"city": city, "unit": "celsius"})
        history += [
            Message("user", f"What is the weather in {city}?"),
            Message("assistant", "", tool_calls=[ToolCall(f"call_{i}", "get_weather", args)]),
            Message("tool", '{"temperature": 20}', tool_call_id=f"call_{i}"),
            Message("assistant", f"It is 20 degrees in {city}."),
        ]
    for backend in (batched, simple):
        request = _request(
            "What is the weather in Paris?",
            [kelvin],
            choice="auto",
            temperature=0.0,
            history=history,
        )
        calls = _check(await _collect(backend, request), [kelvin])
        assert [json.loads(c["arguments"])["unit"] for c in calls] == ["kelvin"] * len(calls)


async def test_history_with_calls_and_results_renders(batched: LlamaBatchedBackend) -> None:
    history = [
        Message("user", "Weather in Rome?"),
        Message(
            "assistant",
            "",
            tool_calls=[ToolCall("call_a", "get_weather", '{"city":"Rome","unit":"celsius"}')],
        ),
        Message("tool", '{"temperature": 21}', tool_call_id="call_a"),
    ]
    request = _request("And so?", [WEATHER], choice="none", history=history)
    assert batched._model is not None
    prompt = batched._model.detokenize(batched.tokenize_request(request), special=True).decode()
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"' in prompt
    assert '<tool_response>\n{"temperature": 21}\n</tool_response>' in prompt
    assert "<tools>" not in prompt  # tool_choice none: no tools offered
    frames = await _collect(batched, request)
    assert frames[-1].finish_reason in ("stop", "length") and not _calls(frames)


async def test_a_call_cut_by_max_tokens_is_an_error(batched: LlamaBatchedBackend) -> None:
    request = _request("Record a user.", [ToolSpec("r", SCHEMAS["nested"])], max_tokens=8)
    with pytest.raises(InvalidToolCallError):
        await _collect(batched, request)


async def test_bad_tool_requests_are_400s(batched: LlamaBatchedBackend) -> None:
    with pytest.raises(InvalidRequestError) as named:
        await batched.prepare(_request("x", [WEATHER], choice="function", name="nope"))
    assert named.value.param == "tool_choice"
    with pytest.raises(InvalidRequestError) as schema:
        await batched.prepare(
            _request("x", [ToolSpec("t", {"type": "string", "maxLength": 10**9})])
        )
    assert schema.value.param == "tools"


async def test_cancelling_mid_call_frees_the_slot(batched: LlamaBatchedBackend) -> None:
    engine = batched.engine
    assert engine is not None
    request = _request("Record a user.", [ToolSpec("r", SCHEMAS["nested"])], max_tokens=400)
    await batched.prepare(request)
    stream = batched.generate(request)
    async for frame in stream:
        if frame.tool_calls and any(d.arguments for d in frame.tool_calls):
            break
    assert engine.running == 1
    await stream.aclose()
    assert engine.running == 0
