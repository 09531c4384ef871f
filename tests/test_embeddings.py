"""POST /v1/embeddings through the gateway: OpenAI's request and response shapes (every input
form, float and base64, `dimensions`), the 400s that name their parameter, upstream routing
(retries, breakers, fallbacks), and the per-input cache.

Every upstream is a real HTTP server on loopback (bench/stub_upstream.py, which embeds a bag of
hashed words); the clients are the official openai SDK and LangChain's OpenAIEmbeddings."""

from __future__ import annotations

import base64
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import numpy as np
import openai
import pytest

from bench.stub_upstream import StubConfig, StubUpstream, stub_embedding
from llm_api.core import metrics
from tests.routing_support import Routed, deployment, routed, routed_app, stubs


def upstream(model_id: str, url: str, **extra: Any) -> dict[str, Any]:
    return {
        "id": model_id,
        "backend": "openai",
        "kind": "embedding",
        "base_url": url,
        "concurrency": 16,
        **extra,
    }


def chat_model(url: str) -> dict[str, Any]:
    return {"id": "chat", "backend": "openai", "base_url": url, "concurrency": 16}


@asynccontextmanager
async def embedding_app(
    tmp_path: Path,
    config: StubConfig | None = None,
    entry: dict[str, Any] | None = None,
    **settings: Any,
) -> AsyncIterator[tuple[StubUpstream, Routed]]:
    """One stub upstream behind an embedding model `emb` (and a chat model `chat`)."""
    async with stubs(config or StubConfig()) as [stub]:
        models = [upstream("emb", stub.base_url, **(entry or {})), chat_model(stub.base_url)]
        async with routed_app(tmp_path, models, **settings) as r:
            yield stub, r


async def post(r: Routed, body: dict[str, Any], **headers: str) -> Any:
    return await r.http.post("/v1/embeddings", json=body, headers=headers)


def cos(a: list[float] | np.ndarray, b: list[float] | np.ndarray) -> float:
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y)))


async def test_sdk_float_and_base64_all_input_forms(tmp_path: Path) -> None:
    async with embedding_app(tmp_path, StubConfig(), cache_enabled=False) as (stub, r):
        texts = ["the cat sat", "a dog ran", "the cat ran"]
        floats = await r.client.embeddings.create(model="emb", input=texts, encoding_format="float")
        b64 = await r.client.embeddings.create(model="emb", input=texts)  # SDK: base64
        one = await r.client.embeddings.create(model="emb", input="the cat sat")
        ids = await r.client.embeddings.create(model="emb", input=[5, 6, 7])
        id_lists = await r.client.embeddings.create(model="emb", input=[[5, 6, 7], [8]])
    assert floats.object == "list" and floats.model == "emb"
    assert [d.index for d in floats.data] == [0, 1, 2]
    for text, d in zip(texts, floats.data, strict=True):
        assert d.object == "embedding"
        assert np.allclose(d.embedding, stub_embedding(text, 64), atol=1e-6)
    # The SDK asked for base64 and decoded it: the same vectors.
    assert stub.stats.bodies[1]["input"] == texts
    for f, b in zip(floats.data, b64.data, strict=True):
        assert np.allclose(f.embedding, b.embedding, atol=1e-7)
    assert np.allclose(one.data[0].embedding, floats.data[0].embedding)
    assert len(ids.data) == 1 and np.allclose(ids.data[0].embedding, stub_embedding([5, 6, 7], 64))
    assert len(id_lists.data) == 2
    assert np.allclose(id_lists.data[1].embedding, stub_embedding([8], 64))
    # Usage is the upstream's input tokens (words for this stub).
    assert floats.usage.prompt_tokens == 9 and floats.usage.total_tokens == 9
    # Sent to the upstream as token ids, not text.
    assert stub.stats.bodies[-1]["input"] == [[5, 6, 7], [8]]
    assert [rec.endpoint for rec in r.records] == ["embeddings"] * 5


async def test_raw_wire_shape_and_base64_is_float32(tmp_path: Path) -> None:
    async with embedding_app(tmp_path, StubConfig(embedding_shuffle=True)) as (stub, r):
        resp = await post(
            r, {"model": "emb", "input": ["one two", "three"], "encoding_format": "base64"}
        )
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert set(body) == {"object", "data", "model", "usage"}
    assert body["usage"] == {"prompt_tokens": 3, "total_tokens": 3, "cost": 0.0}  # unpriced
    # The upstream listed its vectors in reverse order: ours follow `index`.
    for i, text in enumerate(["one two", "three"]):
        item = body["data"][i]
        assert item["index"] == i and item["object"] == "embedding"
        vec = np.frombuffer(base64.b64decode(item["embedding"]), dtype="<f4")
        assert np.allclose(vec, stub_embedding(text, 64), atol=1e-7)


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({"input": ""}, "input", "empty string"),
        ({"input": []}, "input", "empty array"),
        ({"input": ["a", ""]}, "input", "input[1]"),
        ({"input": [[1], []]}, "input", "empty token array"),
        ({"input": ["x"] * 2049}, "input", "2048"),
        ({"input": "hi", "dimensions": 8}, "dimensions", "does not support"),
        ({"input": "hi", "encoding_format": "int8"}, "encoding_format", ""),
        ({"input": "hi", "dimensions": 0}, "dimensions", ""),
        ({"input": [-1]}, "input[0]", ""),
        ({"input": 5}, "input", ""),
        ({"model": "chat", "input": "hi"}, "model", "not an embedding model"),
        ({"model": "nope", "input": "hi"}, "model", "does not exist"),
    ],
)
async def test_bad_requests_name_their_parameter(
    tmp_path: Path, body: dict[str, Any], param: str, words: str
) -> None:
    async with embedding_app(tmp_path) as (stub, r):
        resp = await post(r, {"model": "emb", **body})
    assert resp.status_code in (400, 404), resp.text
    error = resp.json()["error"]
    assert error["param"] == param
    assert words in error["message"]
    assert stub.stats.requests == 0  # refused before any upstream call


async def test_chat_and_completions_refuse_an_embedding_model(tmp_path: Path) -> None:
    async with embedding_app(tmp_path) as (stub, r):
        with pytest.raises(openai.BadRequestError) as chat:
            await r.client.chat.completions.create(
                model="emb", messages=[{"role": "user", "content": "hi"}]
            )
        with pytest.raises(openai.BadRequestError) as completion:
            await r.client.completions.create(model="emb", prompt="hi")
    for exc in (chat.value, completion.value):
        assert exc.body["param"] == "model"  # type: ignore[index]
        assert "is an embedding model" in exc.body["message"]  # type: ignore[index]
    assert stub.stats.requests == 0


async def test_too_long_input_is_a_400_naming_input(tmp_path: Path) -> None:
    """An upstream's context error comes back as 400 `input` (for local models the service
    counts tokens itself: tests/test_embeddings_local.py)."""
    async with embedding_app(tmp_path, StubConfig(context_limit=20)) as (stub, r):
        resp = await post(r, {"model": "emb", "input": ["short", "word " * 50]})
    assert resp.status_code == 400
    assert resp.json()["error"]["param"] == "input"


async def test_one_failing_part_fails_the_request(tmp_path: Path) -> None:
    config = StubConfig(context_limit=20)
    async with embedding_app(tmp_path, config, embedding_upstream_batch=1) as (stub, r):
        resp = await post(r, {"model": "emb", "input": ["short", "word " * 50, "also short"]})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "input"


async def test_malformed_upstream_answer_is_a_502_and_retried_elsewhere(tmp_path: Path) -> None:
    async with embedding_app(tmp_path, StubConfig(embedding_drop_last=True)) as (stub, r):
        resp = await post(r, {"model": "emb", "input": ["a", "b"]})
    assert resp.status_code == 502
    assert resp.json()["error"]["message"] == "The upstream sent a malformed embeddings response."
    async with stubs(StubConfig(embedding_drop_last=True), StubConfig()) as (bad, good):
        model = routed(
            "emb",
            [deployment(bad, weight=1000), deployment(good, weight=0.001)],
            kind="embedding",
            routing={"backoff_base": 0},
        )
        async with routed_app(tmp_path / "routed", [model]) as r:
            ok = await post(r, {"model": "emb", "input": ["a", "b"]})
    assert ok.status_code == 200 and len(ok.json()["data"]) == 2
    assert (bad.stats.requests, good.stats.requests) == (1, 1)


async def test_dimensions_shortens_and_renormalises_matryoshka_models(tmp_path: Path) -> None:
    async with embedding_app(tmp_path, entry={"matryoshka": True}) as (stub, r):
        text = "alpha beta gamma delta epsilon zeta eta theta"
        full = await r.client.embeddings.create(model="emb", input=text)
        short = await r.client.embeddings.create(model="emb", input=text, dimensions=16)
        too_big = await post(r, {"model": "emb", "input": text, "dimensions": 65})
    assert len(full.data[0].embedding) == 64 and len(short.data[0].embedding) == 16
    head = np.asarray(full.data[0].embedding[:16])
    assert math.isclose(float(np.linalg.norm(short.data[0].embedding)), 1.0, rel_tol=1e-5)
    assert np.allclose(short.data[0].embedding, head / np.linalg.norm(head), atol=1e-6)
    assert too_big.status_code == 400 and too_big.json()["error"]["param"] == "dimensions"


async def test_user_field_is_accepted(tmp_path: Path) -> None:
    async with embedding_app(tmp_path) as (stub, r):
        resp = await r.client.embeddings.create(model="emb", input="hi", user="user-123")
    assert len(resp.data) == 1


async def test_large_requests_are_split_into_upstream_parts_in_order(tmp_path: Path) -> None:
    async with embedding_app(tmp_path, embedding_upstream_batch=100) as (stub, r):
        texts = [f"word{i} common" for i in range(2048)]
        resp = await r.client.embeddings.create(model="emb", input=texts, encoding_format="float")
    assert len(stub.stats.bodies) == 21  # 20 parts of 100, one of 48
    assert max(len(b["input"]) for b in stub.stats.bodies) == 100
    assert [d.index for d in resp.data] == list(range(2048))
    for i in (0, 99, 100, 2047):
        assert np.allclose(resp.data[i].embedding, stub_embedding(texts[i], 64), atol=1e-6)
    assert resp.usage.prompt_tokens == 4096


# --- routing ------------------------------------------------------------------------------------


async def test_routed_embeddings_balance_retry_and_break(tmp_path: Path) -> None:
    """A router entry of embedding deployments: requests spread over healthy replicas, a
    failing replica is retried elsewhere (the client never sees its 500) and its breaker opens,
    after which it gets no traffic."""
    failing = StubConfig(fail_status=500)
    async with stubs(StubConfig(), StubConfig(), failing) as (a, b, bad):
        model = routed(
            "emb",
            [deployment(a), deployment(b), deployment(bad)],
            kind="embedding",
            routing={"breaker_failures": 2, "breaker_cooldown": 600, "backoff_base": 0},
        )
        async with routed_app(tmp_path, [model]) as r:
            for i in range(30):
                resp = await r.client.embeddings.create(model="emb", input=f"text {i}")
                assert len(resp.data) == 1
    assert bad.stats.requests == 2  # then its breaker stayed open
    assert a.stats.completed + b.stats.completed == 30
    assert a.stats.completed >= 5 and b.stats.completed >= 5


async def test_rate_limited_replica_is_retried_on_another(tmp_path: Path) -> None:
    async with stubs(StubConfig(fail_status=429, retry_after="30"), StubConfig()) as (busy, ok):
        model = routed(
            "emb",
            [deployment(busy, weight=1000), deployment(ok, weight=0.001)],
            kind="embedding",
            routing={"backoff_base": 0},
        )
        async with routed_app(tmp_path, [model]) as r:
            for i in range(3):
                await r.client.embeddings.create(model="emb", input=f"hello {i}")
    assert busy.stats.requests == 1  # cooling down after its Retry-After
    assert ok.stats.completed == 3


async def test_fallback_model_answers_when_the_first_fails(tmp_path: Path) -> None:
    async with stubs(StubConfig(fail_status=503), StubConfig()) as (down, up):
        models = [
            upstream("emb", down.base_url, fallbacks=["emb-backup"]),
            upstream("emb-backup", up.base_url),
        ]
        async with routed_app(tmp_path, models) as r:
            resp = await r.client.embeddings.create(model="emb", input="hello")
    assert resp.model == "emb-backup"
    assert [rec.model for rec in r.records] == ["emb-backup"]


def test_registry_refuses_mixed_kinds() -> None:
    from pydantic import ValidationError

    from llm_api.services.llm.registry import Registry

    with pytest.raises(ValidationError, match="is not a embedding model"):
        Registry.model_validate(
            {
                "models": [
                    upstream("emb", "http://x/v1", fallbacks=["chat"]),
                    chat_model("http://x/v1"),
                ]
            }
        )


# --- the per-input cache ------------------------------------------------------------------------


async def test_partly_cached_request_computes_only_the_rest(tmp_path: Path) -> None:
    async with embedding_app(tmp_path) as (stub, r):
        first = await post(r, {"model": "emb", "input": ["a b", "c d"]})
        hits = metrics.CACHE_HITS.labels(cache="embedding")._value.get()
        second = await post(r, {"model": "emb", "input": ["c d", "e f", "a b"]})
        third = await post(r, {"model": "emb", "input": ["e f", "a b"]})
        fresh = await post(r, {"model": "emb", "input": ["a b"]}, **{"Cache-Control": "no-cache"})
    assert [b["input"] for b in stub.stats.bodies] == [["a b", "c d"], ["e f"], ["a b"]]
    assert first.headers["x-cache"] == "miss"
    assert second.headers["x-cache"] == "partial"
    assert third.headers["x-cache"] == "hit"
    assert fresh.headers["x-cache"] == "miss"
    assert metrics.CACHE_HITS.labels(cache="embedding")._value.get() - hits == 4
    by_text = {"a b": first.json()["data"][0]["embedding"]}
    assert second.json()["data"][2]["embedding"] == by_text["a b"]
    assert third.json()["data"][1]["embedding"] == by_text["a b"]
    # Usage counts every input, cached or not (the tokens it delivers).
    assert second.json()["usage"]["prompt_tokens"] == 6
    assert third.json()["usage"]["prompt_tokens"] == 4
    assert [rec.cache_hit for rec in r.records] == [False, False, True, False]


# --- real clients -------------------------------------------------------------------------------


async def test_similarity_search_finds_the_right_document(tmp_path: Path) -> None:
    docs = [
        "The Eiffel Tower is a wrought iron tower in Paris, France.",
        "Photosynthesis converts light energy into chemical energy in plants.",
        "The Python programming language emphasises code readability.",
        "Mount Everest is the highest mountain above sea level.",
    ]
    queries = {
        "Which tower stands in Paris?": 0,
        "How do plants turn light into chemical energy?": 1,
        "a programming language that emphasises readability": 2,
        "highest mountain on earth": 3,
    }
    async with embedding_app(tmp_path, StubConfig(embedding_dims=256)) as (stub, r):
        vectors = await r.client.embeddings.create(model="emb", input=docs)
        for query, expected in queries.items():
            q = await r.client.embeddings.create(model="emb", input=query)
            scores = [cos(q.data[0].embedding, d.embedding) for d in vectors.data]
            assert int(np.argmax(scores)) == expected, (query, scores)


async def test_langchain_openai_embeddings(tmp_path: Path) -> None:
    import httpx
    from langchain_openai import OpenAIEmbeddings

    from tests.routing_support import _no_auth

    async with embedding_app(tmp_path, StubConfig(embedding_dims=256)) as (stub, r):
        transport = httpx.ASGITransport(app=r.app)
        hooks = {"request": [_no_auth]}
        async with httpx.AsyncClient(
            transport=transport, base_url="http://127.0.0.1", event_hooks=hooks
        ) as h:
            lc = OpenAIEmbeddings(
                model="emb",
                base_url="http://127.0.0.1/v1",
                api_key="unused",  # type: ignore[arg-type]
                http_async_client=h,
                # Its default counts tokens with tiktoken for OpenAI's own models first.
                check_embedding_ctx_length=False,
                max_retries=0,
            )
            docs = await lc.aembed_documents(["the red apple", "a blue ocean wave"])
            query = await lc.aembed_query("a red apple")
    assert len(docs) == 2 and len(docs[0]) == 256
    assert cos(query, docs[0]) > cos(query, docs[1])
    assert np.allclose(docs[0], stub_embedding("the red apple", 256), atol=1e-6)
