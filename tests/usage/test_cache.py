"""Response cache rules (issue 5, point 1) on the in-process store, with real users and keys:
hits and misses, what is never cached, tenant isolation, bypass headers, replayed streams."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import openai
import pytest

from llm_api.core import metrics
from llm_api.schemas.chat import ChatCompletionRequest
from llm_api.services.cache.service import CachePolicy
from llm_api.services.llm.types import RequestContext
from tests.conftest import MODEL
from tests.usage.conftest import ROOM, SHORT, Running, chat_body, nonce, running_app

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
async def env(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Running]:
    async with running_app(tmp_path_factory.mktemp("cache")) as running:
        yield running


async def post(env: Running, key: str, body: dict, **headers: str) -> tuple[str, dict]:
    resp = await env.http.post(
        "/v1/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {key}", **headers},
    )
    assert resp.status_code == 200, resp.text
    return resp.headers["x-cache"], resp.json()


async def test_deterministic_request_is_served_from_cache(env: Running) -> None:
    _, key = await env.user()
    body = chat_body("Say hello.")
    first_state, first = await post(env, key, body)
    second_state, second = await post(env, key, body)
    assert (first_state, second_state) == ("miss", "hit")
    assert second["choices"][0]["message"] == first["choices"][0]["message"]
    assert second["usage"] == first["usage"]
    assert second["id"] != first["id"]  # fresh ids: no two clients share a response id


async def test_every_sampling_parameter_is_in_the_key(env: Running) -> None:
    _, key = await env.user()
    base = chat_body("Name a colour.")
    await post(env, key, base)
    for change in (
        {"max_tokens": 63},
        {"stop": [*base["stop"], "zzz"]},
        {"top_p": 0.5},
        {"seed": 7},
        {"presence_penalty": 0.1},
        {"response_format": {"type": "json_object"}},
        {"messages": [{"role": "user", "content": base["messages"][0]["content"] + "!"}]},
    ):
        state, _ = await post(env, key, {**base, **change})
        assert state == "miss", change
    state, _ = await post(env, key, base)
    assert state == "hit"


async def test_non_deterministic_requests_are_never_cached(env: Running) -> None:
    _, key = await env.user()
    body = chat_body(f"Tell a story {nonce()}", temperature=0.9)
    states = [(await post(env, key, body))[0] for _ in range(2)]
    assert states == ["miss", "miss"]
    seeded = {**body, "seed": 1234}  # an explicit seed makes it reproducible: cacheable
    states = [(await post(env, key, seeded))[0] for _ in range(2)]
    assert states == ["miss", "hit"]


@dataclass
class Streamed:
    cache: str
    text: str
    finishes: list[str]
    usage: dict[str, Any]


async def _streamed(client: openai.AsyncOpenAI, endpoint: str, **body: Any) -> Streamed:
    """A streamed request through the SDK: its x-cache, text, finish reasons and usage."""
    create = (
        client.chat.completions.with_raw_response.create
        if endpoint == "chat"
        else client.completions.with_raw_response.create
    )
    raw = await create(stream=True, stream_options={"include_usage": True}, **body)
    text, finishes, usage = "", [], None
    async for chunk in raw.parse():
        for choice in chunk.choices:
            text += (choice.delta.content or "") if endpoint == "chat" else choice.text
            finishes += [choice.finish_reason] if choice.finish_reason else []
        usage = chunk.usage or usage
    assert usage is not None
    return Streamed(raw.headers["x-cache"], text, finishes, usage.model_dump(exclude_none=True))


async def test_answers_cut_at_max_tokens_are_cached_and_replayed_alike(env: Running) -> None:
    """A deterministic answer that ends at `max_tokens` is the whole answer to the request as
    asked: it is stored, whether it was streamed or not, and every replay is the same."""
    _, key = await env.user()
    client = env.client(key)
    # Whole response first: then a whole hit and a streamed hit.
    body = chat_body(f"Write a long essay about rivers {nonce()}", max_tokens=6, stop=None)
    state, first = await post(env, key, body)
    assert (state, first["choices"][0]["finish_reason"]) == ("miss", "length")
    assert first["usage"]["completion_tokens"] == 6
    state, second = await post(env, key, body)
    assert state == "hit"
    assert second["choices"] == first["choices"] and second["usage"] == first["usage"]
    replay = await _streamed(client, "chat", **body)
    assert replay == Streamed(
        "hit", first["choices"][0]["message"]["content"], ["length"], first["usage"]
    )
    # A stream first: then a streamed hit and a whole hit.
    body = chat_body(f"Describe the sea at length {nonce()}", max_tokens=5, stop=None)
    live = await _streamed(client, "chat", **body)
    assert (live.cache, live.finishes) == ("miss", ["length"])
    again = await _streamed(client, "chat", **body)
    assert again == Streamed("hit", live.text, live.finishes, live.usage)
    state, whole = await post(env, key, body)
    assert state == "hit"
    assert whole["choices"][0]["message"]["content"] == live.text
    assert whole["choices"][0]["finish_reason"] == "length"
    assert whole["usage"] == live.usage
    # Legacy completions alike.
    prompt = {"model": MODEL, "prompt": f"Once upon a time {nonce()}", "max_tokens": 4}
    live = await _streamed(client, "completions", temperature=0, **prompt)
    assert (live.cache, live.finishes) == ("miss", ["length"])
    completion = await client.completions.with_raw_response.create(temperature=0, **prompt)
    assert completion.headers["x-cache"] == "hit"
    parsed = completion.parse()
    assert (parsed.choices[0].text, parsed.choices[0].finish_reason) == (live.text, "length")


async def test_errors_are_not_cached(env: Running) -> None:
    _, key = await env.user()
    body = chat_body(f"Hi {nonce()}", max_tokens=10_000_000)  # over the context window
    for _ in range(2):
        resp = await env.http.post(
            "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}
        )
        assert resp.status_code == 400
        assert resp.json()["error"]["code"] == "context_length_exceeded"


async def test_tenants_do_not_share_entries(env: Running) -> None:
    _, alice = await env.user()
    _, bob = await env.user()
    body = chat_body("What is two plus two?")
    assert (await post(env, alice, body))[0] == "miss"
    assert (await post(env, alice, body))[0] == "hit"
    assert (await post(env, bob, body))[0] == "miss"  # same prompt, other tenant
    assert (await post(env, bob, body))[0] == "hit"


async def test_bypass_headers(env: Running) -> None:
    _, key = await env.user()
    body = chat_body("Say yes.")
    # no-store: answered, but not written
    assert (await post(env, key, body, **{"Cache-Control": "no-store"}))[0] == "miss"
    assert (await post(env, key, body))[0] == "miss"  # this one writes
    # no-cache: not read (a fresh answer), even though an entry exists
    assert (await post(env, key, body, **{"Cache-Control": "no-cache"}))[0] == "miss"
    assert (await post(env, key, body, **{"Cache-Control": "max-age=0, no-cache"}))[0] == "miss"
    assert (await post(env, key, body))[0] == "hit"


async def test_replayed_stream_is_parsed_by_the_openai_sdk(env: Running) -> None:
    _, key = await env.user()
    client = env.client(key)
    messages = [{"role": "user", "content": "Count to three."}]
    live = await client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=ROOM,
        stop=SHORT,
        temperature=0,  # type: ignore[arg-type]
    )
    assert live.choices[0].finish_reason == "stop"
    raw = await client.chat.completions.with_raw_response.create(
        model=MODEL,
        messages=messages,  # type: ignore[arg-type]
        max_tokens=ROOM,
        stop=SHORT,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    assert raw.headers["x-cache"] == "hit"
    assert raw.headers["content-type"].startswith("text/event-stream")
    stream = raw.parse()
    roles, text, finishes, usage = [], "", [], None
    async for chunk in stream:
        assert chunk.object == "chat.completion.chunk"
        if chunk.choices:
            delta = chunk.choices[0].delta
            roles += [delta.role] if delta.role else []
            text += delta.content or ""
            finishes += [chunk.choices[0].finish_reason] if chunk.choices[0].finish_reason else []
        if chunk.usage:
            usage = chunk.usage
    assert roles == ["assistant"]
    assert text == live.choices[0].message.content
    assert finishes == ["stop"]
    assert usage is not None and usage.total_tokens == live.usage.total_tokens  # type: ignore[union-attr]


async def test_live_stream_fills_the_cache_for_a_later_whole_response(env: Running) -> None:
    _, key = await env.user()
    client = env.client(key)
    messages = [{"role": "user", "content": "Name a fruit."}]
    stream = await client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=ROOM,
        stop=SHORT,
        temperature=0,
        stream=True,  # type: ignore[arg-type]
    )
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    raw = await client.chat.completions.with_raw_response.create(
        model=MODEL,
        messages=messages,
        max_tokens=ROOM,
        stop=SHORT,
        temperature=0,  # type: ignore[arg-type]
    )
    assert raw.headers["x-cache"] == "hit"
    assert raw.parse().choices[0].message.content == text


async def test_legacy_completions_are_cached_and_replayed(env: Running) -> None:
    _, key = await env.user()
    client = env.client(key)
    prompt = "The capital of France is"
    first = await client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=ROOM, stop=SHORT, temperature=0
    )
    raw = await client.completions.with_raw_response.create(
        model=MODEL, prompt=prompt, max_tokens=ROOM, stop=SHORT, temperature=0, stream=True
    )
    assert first.choices[0].finish_reason == "stop"
    assert raw.headers["x-cache"] == "hit"
    text = "".join([c.choices[0].text async for c in raw.parse() if c.choices])
    assert text == first.choices[0].text


async def test_invalid_request_is_rejected_before_any_lookup(env: Running) -> None:
    _, key = await env.user()
    body = chat_body(f"Hi {nonce()}", n=999)
    resp = await env.http.post(
        "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}
    )
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "n"


async def test_cache_needs_credentials_like_everything_else(env: Running) -> None:
    with pytest.raises(openai.AuthenticationError):
        await env.client("sk-wrong").chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], temperature=0
        )


async def test_cancelled_stream_is_not_cached(env: Running) -> None:
    """A stream the client abandons is never stored (its text is incomplete)."""
    user_id, _ = await env.user()
    responses = env.state.responses
    body = chat_body(f"Write a long story about a cat {nonce()}", max_tokens=64, stop=None)
    request = ChatCompletionRequest.model_validate({**body, "stream": True})
    ctx = RequestContext(request_id=nonce(), user_id=user_id)
    chunks, out = await responses.chat_stream(request, ctx, CachePolicy())
    assert out.cache == "miss"
    seen = [await anext(chunks) for _ in range(3)]  # role chunk and some content
    assert seen[1].text  # a content chunk (TextFrame)
    await chunks.aclose()  # what Starlette does when the client disconnects
    again = RequestContext(request_id=nonce(), user_id=user_id)
    replay, out = await responses.chat_stream(request, again, CachePolicy(write=False))
    assert out.cache == "miss"
    await replay.aclose()


async def test_hits_and_misses_are_counted_in_metrics(env: Running) -> None:
    _, key = await env.user()
    hits = metrics.CACHE_HITS.labels(cache="response")
    misses = metrics.CACHE_MISSES.labels(cache="response")
    before = hits._value.get(), misses._value.get()
    body = chat_body("Say one.")
    await post(env, key, body)
    await post(env, key, body)
    assert (hits._value.get() - before[0], misses._value.get() - before[1]) == (1, 1)
