"""`usage.prompt_tokens_details.cached_tokens` through HTTP with the openai SDK and the real
SmolLM2 model. As OpenAI does on chat usage, the field is always there for a local model: the
number of prompt tokens the engine took from a reused prefix (0 when it evaluated the prompt
whole), most of the prompt when a second request shares a long prefix with the first — whole,
and streamed with include_usage.

A prompt's first tokens may match what a slot holds from an unrelated earlier request (the
same few leading words), and the engine reuses those too; so each count is checked against the
engine's own count of reused tokens, not assumed 0."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import openai
import pytest

from tests.conftest import MODEL

pytestmark = pytest.mark.model

NO_CACHE = {"Cache-Control": "no-cache, no-store"}
LIBRARY = "You answer questions for a public library; be polite, precise and brief."


def system() -> str:
    """A long system prompt no earlier request shares: a fresh word ahead of it."""
    return f"Desk {uuid.uuid4().hex[:8]}. " + " ".join([LIBRARY] * 6)


def chat(prompt: str, question: str, **kw: Any) -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": [
            {"role": "system", "content": prompt},
            {"role": "user", "content": question},
        ],
        "max_tokens": 4,
        "temperature": 0,
        "extra_headers": NO_CACHE,
        **kw,
    }


async def streamed_usage(client: openai.AsyncOpenAI, **kw: Any) -> Any:
    stream = await client.chat.completions.create(
        **kw, stream=True, stream_options={"include_usage": True}
    )
    chunks = [c async for c in stream]
    assert chunks[-1].choices == []
    return chunks[-1].usage


@pytest.fixture
def reused(app: Any) -> Callable[[Awaitable[Any]], Awaitable[tuple[Any, int]]]:
    """Run a request; its result and the prompt tokens the engine reused meanwhile."""
    engine = app.state.llm_api.llm.backends[MODEL].engine

    async def run(request: Awaitable[Any]) -> tuple[Any, int]:
        before = engine.prompt_tokens_reused
        result = await request
        return result, engine.prompt_tokens_reused - before

    return run


Reused = Callable[[Awaitable[Any]], Awaitable[tuple[Any, int]]]


def cached(usage: Any) -> int:
    assert usage is not None and usage.prompt_tokens_details is not None, usage
    value = usage.prompt_tokens_details.cached_tokens
    assert isinstance(value, int), usage
    return value


async def test_whole_answers(client: openai.AsyncOpenAI, reused: Reused) -> None:
    prompt = system()
    first, engine_first = await reused(
        client.chat.completions.create(**chat(prompt, "Where are the atlases?"))
    )
    second, engine_second = await reused(
        client.chat.completions.create(**chat(prompt, "When do you open on Sunday?"))
    )
    assert first.usage is not None and second.usage is not None
    assert cached(first.usage) == engine_first < 10
    assert cached(second.usage) == engine_second
    # Most of the shared system prompt (over 90 tokens) came from the first request's cache.
    assert 40 <= cached(second.usage) < second.usage.prompt_tokens


async def test_streamed_usage(client: openai.AsyncOpenAI, reused: Reused) -> None:
    prompt = system()
    first, engine_first = await reused(streamed_usage(client, **chat(prompt, "Where?")))
    second, engine_second = await reused(streamed_usage(client, **chat(prompt, "When?")))
    assert cached(first) == engine_first < 10
    assert cached(second) == engine_second
    assert 40 <= cached(second) < second.prompt_tokens


async def test_legacy_completions(client: openai.AsyncOpenAI, reused: Reused) -> None:
    """The legacy endpoint reports it alike (its usage is the same CompletionUsage)."""
    prompt = system()
    kw: dict[str, Any] = {"model": MODEL, "max_tokens": 4, "extra_headers": NO_CACHE}
    first, engine_first = await reused(
        client.completions.create(prompt=prompt + " Where are the atlases?", **kw)
    )

    async def stream() -> Any:
        chunks = await client.completions.create(
            prompt=prompt + " When do you open on Sunday?",
            stream=True,
            stream_options={"include_usage": True},
            **kw,
        )
        return [c async for c in chunks][-1].usage

    second, engine_second = await reused(stream())
    assert cached(first.usage) == engine_first < 10
    assert second is not None and cached(second) == engine_second
    assert 40 <= cached(second) < second.prompt_tokens
