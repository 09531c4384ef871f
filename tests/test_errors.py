"""Errors arrive as the openai SDK's typed exceptions, carrying OpenAI's error object with `param`
and `code`; FastAPI's 422 `{"detail"}` never leaks."""

from __future__ import annotations

from typing import Any

import httpx
import openai
import pytest

from tests.conftest import MODEL

HI = [{"role": "user", "content": "hi"}]


def error_of(exc: openai.APIStatusError) -> dict[str, Any]:
    body = exc.response.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    assert "detail" not in body
    return body["error"]  # type: ignore[no-any-return]


async def test_unknown_model_is_404(client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        await client.chat.completions.create(model="no-such-model", messages=HI)  # type: ignore[arg-type]
    err = error_of(info.value)
    assert err["code"] == "model_not_found" and err["param"] == "model"
    assert (
        err["message"]
        == "The model `no-such-model` does not exist or you do not have access to it."
    )
    with pytest.raises(openai.NotFoundError):
        await client.models.retrieve("no-such-model")
    with pytest.raises(openai.NotFoundError):
        await client.completions.create(model="no-such-model", prompt="x")


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"temperature": 5}, "temperature"),
        ({"temperature": 1e6}, "temperature"),
        ({"top_p": -1}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": "12"}, "max_tokens"),
        ({"max_tokens": True}, "max_tokens"),
        ({"temperature": "0.5"}, "temperature"),
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"n": 100}, "n"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"stop": [""]}, "stop[0]"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"top_logprobs": 3}, "top_logprobs"),  # without logprobs: true
        ({"top_logprobs": 21}, "top_logprobs"),
        ({"logit_bias": {"50256": -100}}, "logit_bias"),
        ({"functions": [{"name": "f"}]}, "functions"),
        ({"tool_choice": "required"}, "tool_choice"),  # and no tools
        (
            {"tools": [{"type": "function", "function": {"name": "bad name"}}]},
            "tools[0].function.name",
        ),
        ({"seed": 2**70}, "seed"),
        ({"response_format": {"type": "json_schema"}}, "response_format"),
        ({"response_format": {"type": "xml"}}, "response_format.type"),
    ],
)
async def test_bad_parameters_are_400_with_param(
    client: openai.AsyncOpenAI, extra: dict[str, Any], param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        await client.chat.completions.create(model=MODEL, messages=HI, extra_body=extra)  # type: ignore[arg-type]
    err = error_of(info.value)
    assert err["type"] == "invalid_request_error"
    assert err["param"] == param, err


@pytest.mark.parametrize(
    ("messages", "param"),
    [
        ([{"role": "wizard", "content": "hi"}], "messages[0].role"),
        ([{"role": "user", "content": ""}], "messages"),
        ([{"role": "user"}], "messages[0]"),
        ([{"role": "user", "content": 5}], "messages[0].content"),
        ([{"role": "user", "content": []}], "messages[0].content"),
        (
            [{"role": "user", "content": [{"type": "video", "video": {"url": "x"}}]}],
            "messages[0].content[0].type",
        ),
        # A part the model cannot take (SmolLM2 reads text only): the capability check's 400.
        (
            [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
            "messages[0].content[0]",
        ),
        (
            [{"role": "user", "content": [{"type": "text", "text": 5}]}],
            "messages[0].content[0].text",
        ),
        ([{"role": "user", "content": "ok"}, "not a message"], "messages[1]"),
        ([], "messages"),
    ],
)
async def test_bad_messages_are_400_with_param(
    client: openai.AsyncOpenAI, messages: list[Any], param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        await client.chat.completions.create(model=MODEL, messages=messages)
    assert error_of(info.value)["param"] == param


async def test_too_many_messages(client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        await client.chat.completions.create(model=MODEL, messages=HI * 10_000)  # type: ignore[arg-type]
    assert error_of(info.value)["param"] == "messages"


async def test_missing_model_names_it(client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        await client.chat.completions.create(model=None, messages=HI)  # type: ignore[arg-type]
    assert error_of(info.value)["param"] == "model"


async def test_context_length_exceeded(client: openai.AsyncOpenAI) -> None:
    card = await client.models.retrieve(MODEL)
    window = int(card.model_extra["context_length"])  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as info:
        await client.chat.completions.create(model=MODEL, messages=HI, max_tokens=window + 100)  # type: ignore[arg-type]
    err = error_of(info.value)
    assert err["code"] == "context_length_exceeded" and err["param"] == "messages"
    assert str(window) in err["message"] and str(window + 100) in err["message"]
    # A prompt that alone overflows the window, with max_tokens left to its default.
    long = [{"role": "user", "content": "hello " * (window + 10)}]
    with pytest.raises(openai.BadRequestError) as info:
        await client.chat.completions.create(model=MODEL, messages=long)  # type: ignore[arg-type]
    assert error_of(info.value)["code"] == "context_length_exceeded"


async def test_body_over_limit_is_413(client: openai.AsyncOpenAI) -> None:
    huge = [{"role": "user", "content": "x" * (2 * 1024 * 1024)}]
    with pytest.raises(openai.APIStatusError) as info:
        await client.chat.completions.create(model=MODEL, messages=huge)  # type: ignore[arg-type]
    assert info.value.status_code == 413
    assert error_of(info.value)["code"] == "request_too_large"


async def test_chunked_body_over_limit_is_413(http: httpx.AsyncClient) -> None:
    """No Content-Length: the limit is enforced while the body streams in."""

    async def body() -> Any:
        yield b'{"model": "' + MODEL.encode() + b'", "messages": [{"role": "user", "content": "'
        for _ in range(40):
            yield b"x" * 65536
        yield b'"}]}'

    r = await http.post(
        "/v1/chat/completions", content=body(), headers={"Content-Type": "application/json"}
    )
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "request_too_large"


@pytest.mark.parametrize(
    "raw",
    [b"{not json", b"", b'{"model": "x", "messages": [', b"[1, 2]", b'"text"', b"null"],
)
async def test_malformed_json_is_400(http: httpx.AsyncClient, raw: bytes) -> None:
    r = await http.post(
        "/v1/chat/completions", content=raw, headers={"Content-Type": "application/json"}
    )
    assert r.status_code == 400, r.text
    body = r.json()
    assert body["error"]["type"] == "invalid_request_error" and "detail" not in body


async def test_non_finite_numbers_are_400(http: httpx.AsyncClient) -> None:
    for literal in (b"NaN", b"Infinity", b"-Infinity", b"1e400"):
        raw = (
            b'{"model": "' + MODEL.encode() + b'", "messages": [{"role": "user", "content": "hi"}],'
            b' "temperature": ' + literal + b"}"
        )
        r = await http.post(
            "/v1/chat/completions", content=raw, headers={"Content-Type": "application/json"}
        )
        assert r.status_code == 400, (literal, r.text)
        assert r.json()["error"]["param"] == "temperature"


async def test_unknown_route_is_openai_404(http: httpx.AsyncClient) -> None:
    for path in ("/v1/nope", "/nope", "/v1/chat/completions/extra"):
        r = await http.post(path, json={})
        assert r.status_code == 404
        assert r.json()["error"]["type"] == "invalid_request_error"


async def test_wrong_method_is_openai_405(http: httpx.AsyncClient) -> None:
    r = await http.get("/v1/chat/completions")
    assert r.status_code == 405
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert r.headers["allow"] == "POST"
    # One path served by two routes (list and create): Allow names both (RFC 9110 15.5.6).
    r = await http.put("/v1/keys")
    assert r.status_code == 405
    assert r.headers["allow"] == "GET, POST"
    r = await http.post("/v1/files/file-x")
    assert r.status_code == 405
    assert r.headers["allow"] == "GET, DELETE"


async def test_bad_completion_prompt(client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        await client.completions.create(model=MODEL, prompt=[5])  # type: ignore[list-item]
    assert error_of(info.value)["param"] == "prompt[0]"


async def test_bad_json_schema_is_400_fast(client: openai.AsyncOpenAI) -> None:
    schemas: list[dict[str, Any]] = [
        {"type": "object", "properties": {"a": {"$ref": "#/nope"}}},
        # A remote $ref would make llama-cpp-python's converter fetch the URL (SSRF).
        {"type": "object", "properties": {"a": {"$ref": "http://169.254.169.254/latest"}}},
        {"type": "string", "maxLength": 1_000_000},
        {"type": "string", "pattern": "(a+)+"},
    ]
    for schema in schemas:
        with pytest.raises(openai.BadRequestError) as info:
            await client.chat.completions.create(
                model=MODEL,
                messages=HI,  # type: ignore[arg-type]
                response_format={
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": schema},
                },
            )
        assert error_of(info.value)["param"] == "response_format", schema
    # ...and the server still answers.
    reply = await client.chat.completions.create(model=MODEL, messages=HI, max_tokens=1)  # type: ignore[arg-type]
    assert reply.choices[0].finish_reason in ("stop", "length")


async def test_openapi_documents_the_errors_we_send(http: httpx.AsyncClient) -> None:
    """/openapi.json promises what the server does: 400 with the OpenAI error object where
    FastAPI would have said 422, and that object for every other error status (Anthropic's
    error object under /v1/messages)."""
    spec = (await http.get("/openapi.json")).json()
    schemas = spec["components"]["schemas"]
    assert "HTTPValidationError" not in schemas and "ValidationError" not in schemas
    assert schemas["ErrorResponse"]["required"] == ["error"]
    assert set(schemas["ErrorBody"]["properties"]) == {"message", "type", "param", "code"}
    ref = {"$ref": "#/components/schemas/ErrorResponse"}
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            responses = operation["responses"]
            assert "422" not in responses, (method, path)
            schema = responses["default"]["content"]["application/json"]["schema"]
            if path.startswith("/v1/messages"):
                assert schema["properties"]["type"] == {"const": "error"}, path
            else:
                assert schema == ref, (method, path)
    chat = spec["paths"]["/v1/chat/completions"]["post"]["responses"]
    assert chat["400"]["content"]["application/json"]["schema"] == ref
    # And the server does send that 400 for a body FastAPI would have answered with 422.
    r = await http.post("/v1/chat/completions", json={"model": MODEL, "messages": "nope"})
    assert r.status_code == 400
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}


async def test_max_tokens_beyond_32_bits_is_400(http: httpx.AsyncClient) -> None:
    """Bounded in the schema, for every model: an upstream request once failed to serialise
    max_tokens=10**20 and answered 500 (found by tests/test_schemathesis.py)."""
    for path, body in (
        ("/v1/chat/completions", {"messages": HI, "max_tokens": 10**20}),
        ("/v1/chat/completions", {"messages": HI, "max_completion_tokens": 2**31}),
        ("/v1/completions", {"prompt": "hi", "max_tokens": 10**20}),
    ):
        r = await http.post(path, json={"model": MODEL, **body})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] in ("max_tokens", "max_completion_tokens")
