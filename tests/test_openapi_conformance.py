"""Every body and stream chunk we send for chat, completions, models and errors validates against
OpenAI's published OpenAPI description (the schemas vendored in tests/data/openai_openapi/),
taken from the running app: the real model, the response cache, a stub upstream, the limiter."""

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
