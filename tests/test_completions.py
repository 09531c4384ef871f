"""Legacy /v1/completions and /v1/models through the openai SDK, with the real model."""

from __future__ import annotations

import openai
import pytest

from tests.conftest import MODEL

pytestmark = pytest.mark.model
NO_CACHE = {"Cache-Control": "no-cache, no-store"}


async def test_completion(client: openai.AsyncOpenAI) -> None:
    reply = await client.completions.create(
        model=MODEL, prompt="One, two, three,", max_tokens=5, temperature=0, extra_headers=NO_CACHE
    )
    assert reply.object == "text_completion" and reply.id.startswith("cmpl-")
    assert reply.choices[0].text and reply.choices[0].finish_reason == "length"
    assert reply.usage is not None and reply.usage.completion_tokens == 5


async def test_completion_stream_matches_non_streaming(client: openai.AsyncOpenAI) -> None:
    whole = await client.completions.create(
        model=MODEL, prompt="One, two, three,", max_tokens=6, temperature=0, extra_headers=NO_CACHE
    )
    stream = await client.completions.create(
        model=MODEL,
        prompt="One, two, three,",
        max_tokens=6,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_headers=NO_CACHE,
    )
    chunks = [c async for c in stream]
    assert all(c.object == "text_completion" for c in chunks)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


async def test_completion_prompt_list_and_n(client: openai.AsyncOpenAI) -> None:
    reply = await client.completions.create(
        model=MODEL,
        prompt=["Red, green,", "Monday, Tuesday,"],
        max_tokens=3,
        temperature=0,
        n=2,
        extra_headers=NO_CACHE,
    )
    assert [c.index for c in reply.choices] == [0, 1, 2, 3]
    # Prompt-major order: choices 0-1 continue the first prompt, 2-3 the second.
    assert reply.choices[0].text == reply.choices[1].text
    assert reply.choices[2].text == reply.choices[3].text
    assert reply.usage is not None and reply.usage.completion_tokens == 12


async def test_completion_stop(client: openai.AsyncOpenAI) -> None:
    reply = await client.completions.create(
        model=MODEL,
        prompt="1, 2, 3, 4,",
        max_tokens=20,
        temperature=0,
        stop=["7"],
        extra_headers=NO_CACHE,
    )
    assert "7" not in reply.choices[0].text
    assert reply.choices[0].finish_reason == "stop"


async def test_unsupported_feature_fails_loudly(client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        await client.completions.create(model=MODEL, prompt="x", echo=True)
    assert info.value.response.json()["error"]["param"] == "echo"


async def test_models(client: openai.AsyncOpenAI) -> None:
    listed = [m async for m in client.models.list()]
    assert MODEL in [m.id for m in listed]
    card = await client.models.retrieve(MODEL)
    assert card.id == MODEL and card.object == "model"
