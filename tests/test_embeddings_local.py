"""/v1/embeddings on the built-in local embedding model (in-process llama.cpp), end to end with
the official openai SDK (float and base64) and LangChain's OpenAIEmbeddings: vectors, input
forms, the context check on token counts, the per-input cache, a similarity search."""

from __future__ import annotations

import asyncio
import base64
from typing import Any

import httpx
import numpy as np
import openai
import pytest

from llm_api.core import metrics
from llm_api.services.llm.registry import builtin_registry
from tests.conftest import MODEL

pytestmark = pytest.mark.model


def embedding_model() -> str:
    return next(m.id for m in builtin_registry().models if m.kind == "embedding")


def cos(a: Any, b: Any) -> float:
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y)))


def local_backend(app: Any) -> Any:
    return app.state.llm_api.llm.backends[embedding_model()]


async def test_openai_sdk_float_and_base64(client: openai.AsyncOpenAI, app: Any) -> None:
    model = embedding_model()
    texts = ["A cat sits on the mat.", "Stock markets fell sharply today."]
    floats = await client.embeddings.create(model=model, input=texts, encoding_format="float")
    b64 = await client.embeddings.create(model=model, input=texts)  # the SDK's default
    dims = local_backend(app).dimensions
    assert floats.model == model and [d.index for d in floats.data] == [0, 1]
    for f, b in zip(floats.data, b64.data, strict=True):
        assert len(f.embedding) == dims
        assert abs(float(np.linalg.norm(f.embedding)) - 1.0) < 1e-4  # L2-normalised
        assert np.allclose(f.embedding, b.embedding, atol=1e-7)
    usage = floats.usage
    assert usage.prompt_tokens > 4 and usage.total_tokens == usage.prompt_tokens


async def test_token_ids_give_the_same_vector_as_text(
    client: openai.AsyncOpenAI, app: Any, http: httpx.AsyncClient
) -> None:
    model = embedding_model()
    text = "Token ids in, the same vector out."
    ids = local_backend(app).tokenize(text)
    by_text = await client.embeddings.create(model=model, input=text, encoding_format="float")
    resp = await http.post(
        "/v1/embeddings",
        json={"model": model, "input": [ids, ids[:3]], "encoding_format": "base64"},
        headers={"Cache-Control": "no-cache"},
    )
    assert resp.status_code == 200, resp.text
    body = resp.json()
    first = np.frombuffer(base64.b64decode(body["data"][0]["embedding"]), dtype="<f4")
    assert cos(first, by_text.data[0].embedding) > 0.9999
    assert body["usage"]["prompt_tokens"] == len(ids) + 3


async def test_input_longer_than_the_context_is_a_400(app: Any, http: httpx.AsyncClient) -> None:
    backend = local_backend(app)
    long_text = "word " * (backend.context_length + 10)
    resp = await http.post(
        "/v1/embeddings", json={"model": embedding_model(), "input": ["short", long_text]}
    )
    assert resp.status_code == 400
    error = resp.json()["error"]
    assert error["param"] == "input" and error["code"] == "context_length_exceeded"
    assert "input[1]" in error["message"]


async def test_dimensions_and_chat_are_refused(
    client: openai.AsyncOpenAI, http: httpx.AsyncClient
) -> None:
    model = embedding_model()
    resp = await http.post("/v1/embeddings", json={"model": model, "input": "x", "dimensions": 8})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "dimensions"
    with pytest.raises(openai.BadRequestError) as exc:
        await client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "hi"}]
        )
    assert exc.value.body["param"] == "model"  # type: ignore[index]
    not_embedding = await http.post("/v1/embeddings", json={"model": MODEL, "input": "x"})
    assert not_embedding.status_code == 400
    assert not_embedding.json()["error"]["param"] == "model"


async def test_partly_cached_request_embeds_only_the_new_inputs(
    app: Any, http: httpx.AsyncClient
) -> None:
    model = embedding_model()
    backend = local_backend(app)
    seen: list[int] = []
    original = backend.embed

    async def counting(inputs: list[list[int]]) -> list[list[float]]:
        seen.append(len(inputs))
        return await original(inputs)

    backend.embed = counting
    try:
        a = await http.post("/v1/embeddings", json={"model": model, "input": ["p one", "p two"]})
        b = await http.post(
            "/v1/embeddings", json={"model": model, "input": ["p two", "p three", "p one"]}
        )
    finally:
        del backend.embed  # the class's method again
    assert (a.status_code, b.status_code) == (200, 200)
    assert seen == [2, 1]  # the second request computed only "p three"
    assert b.headers["x-cache"] == "partial"
    assert b.json()["data"][2]["embedding"] == a.json()["data"][0]["embedding"]


async def test_concurrent_requests_all_answer_in_order(client: openai.AsyncOpenAI) -> None:
    model = embedding_model()
    texts = [f"concurrent sentence number {i}" for i in range(16)]
    singles = await asyncio.gather(
        *(client.embeddings.create(model=model, input=t, encoding_format="float") for t in texts)
    )
    together = await client.embeddings.create(
        model=model, input=[f"{t} " for t in texts], encoding_format="float"
    )
    for i, single in enumerate(singles):
        # Trailing space: another cache key, the same meaning; batched or not, the same vector.
        assert cos(single.data[0].embedding, together.data[i].embedding) > 0.98


async def test_similarity_search_finds_the_right_document(client: openai.AsyncOpenAI) -> None:
    model = embedding_model()
    docs = [
        "The Eiffel Tower is a wrought-iron lattice tower in Paris, France.",
        "Photosynthesis lets plants turn sunlight, water and carbon dioxide into sugar.",
        "Python is a programming language that emphasises code readability.",
        "Mount Everest is Earth's highest mountain above sea level.",
        "The stock market fell as investors worried about interest rates.",
    ]
    queries = {
        "Which famous landmark is in the French capital?": 0,
        "How do green plants make food from light?": 1,
        "What coding language is known for being easy to read?": 2,
        "What is the tallest peak in the world?": 3,
        "Why did shares drop on Wall Street?": 4,
    }
    vectors = await client.embeddings.create(model=model, input=docs)
    for query, expected in queries.items():
        q = await client.embeddings.create(model=model, input=query)
        scores = [cos(q.data[0].embedding, d.embedding) for d in vectors.data]
        assert int(np.argmax(scores)) == expected, (query, scores)


async def test_langchain_openai_embeddings(app: Any, http: httpx.AsyncClient) -> None:
    from langchain_openai import OpenAIEmbeddings

    account = app.state.test_account
    lc = OpenAIEmbeddings(
        model=embedding_model(),
        base_url="http://testserver/v1",
        api_key=account.api_key,
        http_async_client=http,
        check_embedding_ctx_length=False,  # else it tokenizes with tiktoken for OpenAI models
        max_retries=0,
    )
    docs = await lc.aembed_documents(
        ["Bananas are yellow fruit.", "Rust is a systems programming language."]
    )
    query = await lc.aembed_query("Which fruit is yellow?")
    assert cos(query, docs[0]) > cos(query, docs[1])
    metrics_hits = metrics.EMBEDDING_INPUTS.labels(embedding_model())._value.get()
    assert metrics_hits >= 3


async def test_router_over_the_local_model_and_a_failing_upstream(tmp_path: Any) -> None:
    """A routed embedding model whose deployments are the local model and an upstream that
    fails: the upstream's breaker opens after its failures and every request is answered by the
    local model (retried there, invisibly to the client)."""
    from bench.stub_upstream import StubConfig
    from tests.routing_support import deployment, routed, routed_app, stubs

    builtin = next(m for m in builtin_registry().models if m.kind == "embedding")
    local = builtin.model_dump(mode="json", exclude_unset=True) | {"id": "local-emb"}
    async with stubs(StubConfig(fail_status=500)) as [down]:
        model = routed(
            "emb",
            [{"model": "local-emb"}, deployment(down, weight=1000)],
            kind="embedding",
            routing={"breaker_failures": 2, "breaker_cooldown": 600, "backoff_base": 0},
        )
        async with routed_app(tmp_path, [local, model]) as r:
            direct = await r.client.embeddings.create(model="local-emb", input="x")
            for i in range(6):
                resp = await r.client.embeddings.create(
                    model="emb", input=f"routed {i}", encoding_format="float"
                )
                assert len(resp.data[0].embedding) == len(direct.data[0].embedding) == 384
    assert down.stats.requests == 2  # then its breaker stayed open
