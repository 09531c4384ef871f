"""What the tool-client tests share: OpenAI tool definitions, the wire-level check of a streamed
tool call (reassembled by index, id and name once in each call's first delta, arguments in
pieces), and reading the model's running-requests gauge from /metrics."""

from __future__ import annotations

import re
from typing import Any

import httpx
import jsonschema
import orjson

# Generation must happen for these requests, not a replay: `no-cache` skips reading the response
# cache and `no-store` keeps the answer out of it.
FRESH = {"Cache-Control": "no-cache, no-store"}

WEATHER_PARAMETERS: dict[str, Any] = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 24},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TIME_PARAMETERS: dict[str, Any] = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 24}},
    "required": ["city"],
    "additionalProperties": False,
}
WEATHER_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": WEATHER_PARAMETERS,
    },
}
TIME_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "Local time in a city",
        "parameters": TIME_PARAMETERS,
    },
}
SCHEMAS = {"get_weather": WEATHER_PARAMETERS, "get_time": TIME_PARAMETERS}


def named(name: str) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name}}


def whole_calls(completion: Any, finish: tuple[str, ...] = ("tool_calls",)) -> list[dict[str, Any]]:
    """A non-streamed completion's tool calls, as (index, id, type, name, arguments). `finish`:
    the finish reasons allowed (OpenAI ends a call forced by a named `tool_choice` with
    "stop", any other with "tool_calls")."""
    choice = completion.choices[0]
    assert choice.finish_reason in finish, choice
    return [
        {
            "index": i,
            "id": c.id,
            "type": c.type,
            "name": c.function.name,
            "arguments": c.function.arguments,
        }
        for i, c in enumerate(choice.message.tool_calls or [])
    ]


def streamed_calls(
    chunks: list[Any], finish: tuple[str, ...] = ("tool_calls",)
) -> list[dict[str, Any]]:
    """Reassemble streamed tool calls as OpenAI sends them, checking the shape on the way: each
    call's first delta carries its index, id, type "function" and name; later deltas of that
    index carry only argument pieces (a repeated name would be concatenated by clients that
    merge deltas, such as LangChain); one finish reason, from `finish`, ends the stream."""
    calls: dict[int, dict[str, Any]] = {}
    finishes = []
    for chunk in chunks:
        for choice in chunk.choices:
            assert choice.index == 0
            if choice.finish_reason is not None:
                finishes.append(choice.finish_reason)
            for delta in choice.delta.tool_calls or []:
                fn = delta.function
                if delta.index not in calls:
                    assert delta.id, f"first delta of call {delta.index} has no id: {delta}"
                    assert delta.type == "function", delta
                    assert fn is not None and fn.name, f"first delta has no name: {delta}"
                    calls[delta.index] = {
                        "index": delta.index,
                        "id": delta.id,
                        "type": delta.type,
                        "name": fn.name,
                        "arguments": fn.arguments or "",
                    }
                    continue
                assert delta.id in (None, calls[delta.index]["id"]), delta
                assert fn is None or not fn.name, f"name repeated in a later delta: {delta}"
                if fn is not None and fn.arguments:
                    calls[delta.index]["arguments"] += fn.arguments
    assert len(finishes) == 1 and finishes[0] in finish, finishes
    assert sorted(calls) == list(range(len(calls))), f"indices not 0..n-1: {sorted(calls)}"
    return [calls[i] for i in sorted(calls)]


def assert_valid_arguments(call: dict[str, Any]) -> dict[str, Any]:
    """The call's arguments parse as JSON and satisfy its tool's schema."""
    args: dict[str, Any] = orjson.loads(call["arguments"])
    jsonschema.validate(args, SCHEMAS[call["name"]])
    return args


def without_ids(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in c.items() if k != "id"} for c in calls]


def assert_fresh_ids(calls: list[dict[str, Any]]) -> None:
    """Ids a server minted: non-empty strings, one per call."""
    ids = [c["id"] for c in calls]
    assert all(isinstance(i, str) and i for i in ids), ids
    assert len(set(ids)) == len(ids), ids


def requests_running(base_url: str, model: str) -> float:
    """`llm_api:num_requests_running` for one model, from the server's /metrics."""
    text = httpx.get(f"{base_url}/metrics", timeout=10).text
    pattern = (
        rf'^llm_api:num_requests_running\{{[^}}]*model_name="{re.escape(model)}"[^}}]*\}} (\S+)$'
    )
    found = re.search(pattern, text, re.MULTILINE)
    assert found, f"no running-requests gauge for {model} in /metrics"
    return float(found.group(1))
