"""logprobs / top_logprobs through HTTP with the official openai SDK and the real SmolLM2 model:
OpenAI's exact shape, one entry per completion token, the stream's pieces concatenated equal to
the whole answer's, the same tokens and numbers whether the request ran alone or batched with
others, and a 400 naming `logprobs` for a model that does not declare the capability."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import openai
import pytest

from bench.stub_upstream import StubConfig
from tests.conftest import MODEL
from tests.routing_support import routed_app, stubs

pytestmark = pytest.mark.model

# Generation must happen: the response cache would answer a repeated greedy request.
NO_CACHE = {"Cache-Control": "no-cache, no-store"}
PROMPT = "Explain what a compiler does."
OTHERS = [  # different lengths, so their prefill and decode steps interleave with ours
    "Hi.",
    "List three facts about the Moon.",
    "Describe a sunrise in the mountains, with colours and sounds.",
]


def greedy(content: str = PROMPT, **kw: Any) -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 24,
        "temperature": 0,
        "logprobs": True,
        "top_logprobs": 3,
        "extra_headers": NO_CACHE,
        **kw,
    }


def entries(body: dict[str, Any]) -> list[dict[str, Any]]:
    return [t for c in body["choices"] for t in (c["logprobs"] or {}).get("content") or []]


async def test_shape_is_openais(client: openai.AsyncOpenAI) -> None:
    raw = await client.chat.completions.with_raw_response.create(**greedy())
    body = raw.http_response.json()
    [choice] = body["choices"]
    assert set(choice["logprobs"]) == {"content", "refusal"}
    assert choice["logprobs"]["refusal"] is None
    content = choice["logprobs"]["content"]
    # One entry per completion token.
    assert len(content) == body["usage"]["completion_tokens"] > 0
    assert "".join(t["token"] for t in content) == choice["message"]["content"]
    for t in content:
        assert set(t) == {"token", "logprob", "bytes", "top_logprobs"}
        assert isinstance(t["logprob"], float) and t["logprob"] <= 0.0
        assert all(isinstance(b, int) and 0 <= b < 256 for b in t["bytes"])
        assert bytes(t["bytes"]).decode("utf-8", "backslashreplace") == t["token"]
        alts = t["top_logprobs"]
        assert len(alts) == 3
        assert all(set(a) == {"token", "logprob", "bytes"} for a in alts)
        assert [a["logprob"] for a in alts] == sorted((a["logprob"] for a in alts), reverse=True)
        # Greedy: the chosen token is the most likely one, with the same numbers.
        assert alts[0] == {k: t[k] for k in ("token", "logprob", "bytes")}
    # The SDK reads it into its own types.
    parsed = raw.parse()
    assert parsed.choices[0].logprobs is not None
    assert [t.token for t in parsed.choices[0].logprobs.content or []] == [
        t["token"] for t in content
    ]


async def test_pieces_of_characters_keep_their_bytes(client: openai.AsyncOpenAI) -> None:
    """Tokens that split a multi-byte character (this prompt gets emoji back): `token` shows
    the bytes as `\\xNN`, `bytes` has them exactly, and all the bytes make the text."""
    raw = await client.chat.completions.with_raw_response.create(
        **greedy("Emoji list: 😀 😃 😄 😁", max_tokens=12)
    )
    [choice] = raw.http_response.json()["choices"]
    content = choice["logprobs"]["content"]
    assert any("\\x" in t["token"] for t in content), content  # the case under test
    for t in content:
        assert bytes(t["bytes"]).decode("utf-8", "backslashreplace") == t["token"]
        for a in t["top_logprobs"]:
            assert bytes(a["bytes"]).decode("utf-8", "backslashreplace") == a["token"]
    whole = b"".join(bytes(t["bytes"]) for t in content)
    assert whole.decode("utf-8", "replace") == choice["message"]["content"]


async def test_stream_pieces_concatenate_to_the_whole(client: openai.AsyncOpenAI) -> None:
    whole = await client.chat.completions.create(**greedy())
    assert whole.choices[0].logprobs is not None
    stream = await client.chat.completions.create(
        **greedy(), stream=True, stream_options={"include_usage": True}
    )
    chunks = [c async for c in stream]
    pieces = [
        t
        for c in chunks
        for choice in c.choices
        if choice.logprobs is not None
        for t in choice.logprobs.content or []
    ]
    assert pieces == whole.choices[0].logprobs.content
    usage = chunks[-1].usage
    assert usage is not None and len(pieces) == usage.completion_tokens


async def test_without_logprobs_there_are_none(client: openai.AsyncOpenAI) -> None:
    plain = await client.chat.completions.create(**greedy(logprobs=False, top_logprobs=None))
    assert plain.choices[0].logprobs is None
    bare = await client.chat.completions.create(**greedy(top_logprobs=0))
    assert bare.choices[0].logprobs is not None
    content = bare.choices[0].logprobs.content or []
    assert content and all(t.top_logprobs == [] for t in content)


async def test_the_same_alone_and_batched(client: openai.AsyncOpenAI) -> None:
    """Batching must not change a greedy request's tokens or their numbers (short prompts: the
    engine reuses and batches exactly below 256 positions)."""
    alone = await client.chat.completions.create(**greedy())

    async def other(content: str) -> float:
        answer = await client.chat.completions.create(**greedy(content, max_tokens=48))
        assert answer.choices[0].logprobs is not None
        return time.monotonic()

    # The others start first, so ours joins a batch already decoding.
    tasks = [asyncio.create_task(other(c)) for c in OTHERS]
    await asyncio.sleep(0.05)
    started = time.monotonic()
    batched = await client.chat.completions.create(**greedy())
    ended = await asyncio.gather(*tasks)
    assert max(ended) > started  # ours ran while others did

    assert batched.choices[0].message.content == alone.choices[0].message.content
    assert batched.choices[0].logprobs == alone.choices[0].logprobs


async def test_a_model_without_logprobs_refuses_them(tmp_path: Path) -> None:
    async with stubs(StubConfig(tokens=2)) as (stub,):
        entry = {"backend": "openai", "base_url": stub.base_url, "capabilities": ["tools"]}
        models = [{"id": "no-logprobs", **entry}]
        async with routed_app(tmp_path, models) as r:
            for kw in ({"logprobs": True, "top_logprobs": 2}, {"logprobs": True}):
                with pytest.raises(openai.BadRequestError) as refused:
                    await r.client.chat.completions.create(
                        model="no-logprobs",
                        messages=[{"role": "user", "content": "hi"}],
                        max_tokens=2,
                        **kw,  # type: ignore[arg-type]
                    )
                assert refused.value.param == "logprobs"
                assert refused.value.code == "unsupported_parameter"
            with pytest.raises(openai.BadRequestError) as refused:
                await r.client.completions.create(
                    model="no-logprobs", prompt="hi", max_tokens=2, logprobs=1
                )
            assert refused.value.param == "logprobs"
            assert stub.stats.requests == 0
            # The same model answers without them.
            ok = await r.client.chat.completions.create(
                model="no-logprobs", messages=[{"role": "user", "content": "hi"}], max_tokens=2
            )
            assert ok.choices[0].logprobs is None


def check_offsets(text: str, tokens: list[str], offsets: list[int], raws: list[bytes]) -> None:
    """Each legacy `text_offset` is the character of `text` where its token's first byte lies:
    a whole token starts there; a piece of a multi-byte character is part of that character."""
    assert offsets == sorted(offsets)
    for token, offset, raw in zip(tokens, offsets, raws, strict=True):
        char = text[offset].encode()
        if raw[0] & 0xC0 == 0x80:  # continues a character begun by an earlier token
            assert raw in char[1:], (token, offset, text)
        elif len(raw) < len(char):  # begins a character that a later token completes
            assert char.startswith(raw), (token, offset, text)
        else:
            assert text[offset:].encode().startswith(raw), (token, offset, text)


async def test_legacy_offsets_count_characters(client: openai.AsyncOpenAI) -> None:
    """Tokens that are parts of multi-byte characters (an emoji, fullwidth signs) are shown
    with `\\xNN` escapes; their offsets still count the text's characters, streamed or not."""
    kw: dict[str, Any] = {
        "model": MODEL,
        "prompt": "Emoji list: 😀 😃 😄 😁",
        "max_tokens": 12,
        "temperature": 0,
        "logprobs": 1,
        "extra_headers": NO_CACHE,
    }
    raw = await client.completions.with_raw_response.create(**kw)
    whole = raw.http_response.json()["choices"][0]
    lps = whole["logprobs"]
    text = whole["text"]
    assert any("\\x" in t for t in lps["tokens"]), lps["tokens"]  # the case under test
    raws = [_token_bytes(t) for t in lps["tokens"]]
    check_offsets(text.rstrip("\ufffd"), lps["tokens"], lps["text_offset"], raws)

    stream = await client.completions.create(**kw, stream=True)
    offsets = [
        o
        for c in [c async for c in stream]
        for ch in c.choices
        if ch.logprobs
        for o in ch.logprobs.text_offset or []
    ]
    assert offsets == lps["text_offset"]


def _token_bytes(token: str) -> bytes:
    """A legacy token's bytes: `\\xNN` escapes (a piece of a character) or UTF-8 text."""
    return (
        token.encode("latin-1", "backslashreplace").decode("unicode_escape").encode("latin-1")
        if "\\x" in token
        else token.encode()
    )
